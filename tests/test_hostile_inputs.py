"""Inputs that crashed, hung or vanished (issue 23, items 4-8 and the messages of item 10): absurd list labels,
huge or endless ``--config`` files, FIFOs / dangling links / device links as videos, a BOM in a list file,
duplicate YAML keys and repeated ``key=value``, ``train --data FIFO``, ``--resume auto`` with fewer epochs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from rest_fast.cli import main
from rest_fast.data.index import VideoIndex
from rest_fast.errors import UserError


def _clip(path: Path, seed: int = 0) -> Path:
    from eval_fixtures import write_clip

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_clip(path, "growing", seed=seed, frames=4, size=32)


def _one_line(capsys, command: str) -> str:
    """The one error line on stderr (a model's progress bars may come before it), no traceback."""
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if "error" in ln.lower()]
    assert "Traceback" not in text and len(err) == 1 and err[0].startswith(f"rest-fast {command}: error: "), text
    return err[0]


# ---------------------------------------------------------------------------------------------- item 4
@pytest.mark.parametrize("label", ["99999999999999999999", "300000000"])
def test_absurd_list_labels_are_refused_before_any_class_list_is_built(label, tmp_path, capsys):
    _clip(tmp_path / "a.mp4")
    _clip(tmp_path / "b.mp4", seed=1)
    lst = tmp_path / "list.txt"
    lst.write_text(f"a.mp4 0\nb.mp4 {label}\n")
    with pytest.raises(UserError, match=f"label {label} is absurd for a list of 2 distinct labels"):
        VideoIndex.from_list(lst, tmp_path)
    # through the CLI: one line, and the failed start leaves no run folder
    rc = main(["train", f"--data={lst}", f"--out={tmp_path / 'run'}", "--blip=tiny", "--clip=tiny",
               "clip_pretrained=none", "progress=false"])
    assert rc == 2 and f"label {label}" in _one_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_list_labels_are_bounded_by_a_class_file_and_sparse_ones_still_work(tmp_path):
    _clip(tmp_path / "a.mp4")
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 7\n")
    with pytest.raises(UserError, match="label 7 is beyond the 3 classes"):
        VideoIndex.from_list(lst, tmp_path, class_names=["x", "y", "z"])
    lst.write_text("a.mp4 -3\n")
    with pytest.raises(UserError, match="negative"):
        VideoIndex.from_list(lst, tmp_path)
    lst.write_text("a.mp4 399\n")  # a subset of Kinetics-400: label 399 of 400 classes is fine
    assert VideoIndex.from_list(lst, tmp_path).labels == [399]


# ---------------------------------------------------------------------------------------------- item 5
def test_a_config_larger_than_a_few_mb_is_refused_before_parsing(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# padding\n" * 600_000 + b"epochs: 3\n")  # 6 MB of valid YAML
    assert main(["train", "--config", str(big), "--print-config"]) == 2
    assert "holds more than 4 MB" in _one_line(capsys, "train")


def test_config_dev_zero_is_refused_not_read_forever(tmp_path):
    def limit():  # an unbounded read fails fast here instead of eating the machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-m", "rest_fast", "train", "--config", "/dev/zero", "--print-config"],
                       env=env, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip() == "rest-fast train: error: --config /dev/zero holds more than 4 MB: not a config file"


# ---------------------------------------------------------------------------------------------- item 6
def _odd_entries(folder: Path) -> dict[str, str]:
    """A FIFO, a dangling link and a link to a device, each named like a video; their expected reasons."""
    os.mkfifo(folder / "pipe.mp4")
    os.symlink(folder / "gone.mp4", folder / "dangling.mp4")
    os.symlink("/dev/null", folder / "device.mp4")
    return {"pipe.mp4": "a named pipe (FIFO), not a video file", "dangling.mp4": "dangling symbolic link",
            "device.mp4": "a symbolic link to '/dev/null', a device, not a video file"}


def test_fifos_dangling_and_device_links_are_counted_bad_files(tmp_path, capsys):
    data = tmp_path / "videos"
    _clip(data / "growing" / "g0.mp4")
    _clip(data / "growing" / "g1.mp4", seed=1)
    expected = _odd_entries(data / "growing")
    index = VideoIndex.from_folder(data)
    assert len(index) == 2 and sorted(Path(p).name for p in index.missing) == sorted(expected)
    for p in index.missing:
        assert expected[Path(p).name] in index.bad_reasons[p]
    lst = tmp_path / "list.txt"  # the same entries named by a list file
    lst.write_text("".join(f"growing/{n} 0\n" for n in ["g0.mp4", *expected]))
    listed = VideoIndex.from_list(lst, data, skip_missing=True)
    assert len(listed) == 1 and sorted(Path(p).name for p in listed.missing) == sorted(expected)
    # prepare counts them in bad_files.tsv with their reasons (and never opens the FIFO: no hang)
    out = tmp_path / "prep"
    assert main(["prepare", "--data", str(data), "--out", str(out), "--frames", "2", "--workers", "0",
                 "--no-progress"]) == 0
    assert "2 videos in 1 shard(s), 3 bad" in capsys.readouterr().out
    rows = [ln.split("\t") for ln in (out / "bad_files.tsv").read_text().splitlines()[1:]]
    reasons = {Path(r[0]).name: r[1] for r in rows}
    assert set(reasons) == set(expected) and all(expected[n] in reasons[n] for n in expected), reasons


def test_train_data_fifo_says_what_it_is(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    assert main(["train", f"--data={tmp_path / 'fifo'}", f"--out={tmp_path / 'run'}"]) == 2
    line = _one_line(capsys, "train")
    assert "named pipe (FIFO)" in line and "does not exist" not in line, line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- item 7
def test_a_list_file_with_a_bom_keeps_its_first_entry(tmp_path):
    _clip(tmp_path / "a.mp4")
    _clip(tmp_path / "b.mp4", seed=1)
    lst = tmp_path / "list.txt"
    lst.write_bytes("\ufeffa.mp4 0\nb.mp4 1\n".encode())
    index = VideoIndex.from_list(lst, tmp_path, skip_missing=True)
    assert [Path(p).name for p in index.paths] == ["a.mp4", "b.mp4"] and not index.missing


# ---------------------------------------------------------------------------------------------- item 8
def test_duplicate_yaml_keys_are_refused_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nk: 3\nepochs: 5\n")
    assert main(["train", "--config", str(cfg), "--print-config"]) == 2
    line = _one_line(capsys, "train")
    assert "key 'epochs' appears twice (lines 1 and 3)" in line, line


def test_a_repeated_override_keeps_the_last_and_says_so(capsys):
    assert main(["train", "epochs=2", "k=2", "epochs=3", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert "\nepochs: 3\n" in out
    assert err.strip() == "rest-fast train: note: epochs given 2 times (2, then 3): the last, 3, is used"


# ---------------------------------------------------------------------------------------------- item 10
def test_resume_with_fewer_epochs_is_refused_not_called_complete(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".rest_fast_run").write_text("{}")
    (run / "config.yaml").write_text("blip: tiny\nclip: tiny\nepochs: 2\n")
    (run / "state.json").write_text(json.dumps({"epoch": 2, "round": 1, "checkpoint": None}))
    assert main(["train", "--out", str(run), "--resume", "auto", "epochs=1"]) == 2
    line = _one_line(capsys, "train")
    assert "epochs=1 is fewer than the run's 2" in line and "already complete" not in line, line
