"""VideoIndex builders: split files, class folders, explicit paths, missing files."""

from __future__ import annotations

import pytest

from rest_fast.data import VideoIndex


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_from_list_labels_and_spaces(tmp_path):
    for rel in ["val/a.mp4", "val/b c.mp4", "val/d.avi"]:
        _touch(tmp_path / rel)
    lst = tmp_path / "split.txt"
    lst.write_text("# comment\nval/a.mp4 0\n\nval/b c.mp4 3\nval/d.avi 1\n")
    idx = VideoIndex.from_list(lst, tmp_path)
    assert len(idx) == 3 and idx.labels == [0, 3, 1]
    assert idx[1].path == str(tmp_path / "val/b c.mp4") and idx[1].label == 3
    sub = idx[1:]
    assert len(sub) == 2 and sub.labels == [3, 1]
    assert [it.label for it in idx] == [0, 3, 1]


def test_from_list_unlabelled_and_mixed(tmp_path):
    _touch(tmp_path / "a.mp4")
    _touch(tmp_path / "b.mp4")
    (tmp_path / "l.txt").write_text("a.mp4\nb.mp4\n")
    idx = VideoIndex.from_list(tmp_path / "l.txt", tmp_path)
    assert idx.labels is None and idx[0].label is None
    (tmp_path / "m.txt").write_text("a.mp4 1\nb.mp4\n")
    with pytest.raises(ValueError, match="some lines have a label"):
        VideoIndex.from_list(tmp_path / "m.txt", tmp_path)


def test_missing_files(tmp_path):
    _touch(tmp_path / "a.mp4")
    lines = "a.mp4 0\n" + "".join(f"gone{i}.mp4 1\n" for i in range(7))
    (tmp_path / "l.txt").write_text(lines)
    with pytest.raises(FileNotFoundError, match=r"(?s)7 of 8 .*gone0\.mp4") as e:
        VideoIndex.from_list(tmp_path / "l.txt", tmp_path)
    assert "gone4.mp4" in str(e.value) and "gone6.mp4" not in str(e.value)  # first few only
    idx = VideoIndex.from_list(tmp_path / "l.txt", tmp_path, skip_missing=True)
    assert len(idx) == 1 and idx.labels == [0] and len(idx.missing) == 7
    with pytest.raises(FileNotFoundError, match="1 of 2"):
        VideoIndex.from_paths([tmp_path / "a.mp4", tmp_path / "zz.mp4"])
    assert len(VideoIndex.from_paths([tmp_path / "a.mp4", tmp_path / "zz.mp4"], skip_missing=True)) == 1


def test_from_folder(tmp_path):
    for rel in ["walk/1.mp4", "walk/sub/2.mkv", "run/3.avi", "run/notes.txt", "jump/4.webm"]:
        _touch(tmp_path / rel)
    idx = VideoIndex.from_folder(tmp_path)
    assert idx.class_names == ["jump", "run", "walk"]
    assert sorted(zip([p.split("/")[-1] for p in idx.paths], idx.labels)) == [
        ("1.mp4", 2), ("2.mkv", 2), ("3.avi", 1), ("4.webm", 0)]
    with pytest.raises(FileNotFoundError):
        VideoIndex.from_folder(tmp_path / "nope")


def test_from_paths_labels_mismatch(tmp_path):
    _touch(tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="labels"):
        VideoIndex.from_paths([tmp_path / "a.mp4"], [0, 1])


def test_real_split_file_format(tmp_path):
    """The official split files shipped as package data parse (relative path + label per line)."""
    from importlib.resources import files

    split = files("rest_fast") / "assets" / "splits" / "hmdb_splits_val1.txt"
    head = split.read_text().splitlines(keepends=True)[:5]
    (tmp_path / "s.txt").write_text("".join(head))
    for line in head:
        _touch(tmp_path / line.rsplit(maxsplit=1)[0])
    idx = VideoIndex.from_list(tmp_path / "s.txt", tmp_path)
    assert len(idx) == 5 and idx.labels is not None


def test_from_folder_flat_is_unlabelled(tmp_path):
    """REST is label-free: a flat folder of videos is a valid training set (issue 14, item 1)."""
    for rel in ["b.mp4", "a.MKV", "notes.txt", ".hidden.mp4"]:
        _touch(tmp_path / rel)
    (tmp_path / ".cache").mkdir()  # a hidden or video-less sub-folder does not make the folder labelled
    (tmp_path / "thumbs").mkdir()
    idx = VideoIndex.from_folder(tmp_path)
    assert [p.split("/")[-1] for p in idx.paths] == ["a.MKV", "b.mp4"]
    assert idx.labels is None and idx.class_names is None and idx.num_unlabelled == 2
    assert idx[0].label is None


def test_from_folder_mixed_warns_and_marks_unlabelled(tmp_path):
    from rest_fast.data.index import UNLABELLED

    for rel in ["walk/1.mp4", "run/2.mp4", "loose1.mp4", "loose2.avi"]:
        _touch(tmp_path / rel)
    with pytest.warns(UserWarning, match="2 of 4 videos .* unlabelled"):
        idx = VideoIndex.from_folder(tmp_path)
    assert idx.class_names == ["run", "walk"]
    assert [(p.split("/")[-1], y) for p, y in zip(idx.paths, idx.labels)] == [
        ("2.mp4", 0), ("1.mp4", 1), ("loose1.mp4", UNLABELLED), ("loose2.avi", UNLABELLED)]
    assert idx.num_unlabelled == 2 and idx[2].label is None and idx[0].label == 0
    sub = idx.labelled()
    assert len(sub) == 2 and sub.labels == [0, 1] and sub.class_names == ["run", "walk"]
    assert "2 unlabelled" in repr(idx)


def test_from_folder_without_videos_is_a_user_error(tmp_path):
    from rest_fast.errors import UserError

    (tmp_path / "walk").mkdir()
    _touch(tmp_path / "readme.txt")
    with pytest.raises(UserError, match="no video files"):
        VideoIndex.from_folder(tmp_path)
    (tmp_path / "l.txt").write_text("# empty\n\n")
    with pytest.raises(UserError, match="lists no videos"):
        VideoIndex.from_list(tmp_path / "l.txt", tmp_path)
