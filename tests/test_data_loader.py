"""PyAV loader: the batch contract, determinism across worker counts, bad-file recovery and threshold."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import video_fixtures as vf

from rest_fast.data import (
    BadFilesReport,
    PyAVClipLoader,
    TooManyBadFiles,
    VideoIndex,
    read_clip,
    sample_seed,
)

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_videos")
    paths = []
    for i in range(6):
        codec = ["h264", "vp9", "mjpeg"][i % 3]
        ext = vf.CODECS[codec][2]
        paths.append(str(vf.write_index_clip(root / f"c{i}.{ext}", 10 + 3 * i, codec, width=34, height=26)))
    bad = root / "bad.mp4"
    bad.write_text("not a video")
    return paths, str(bad)


def _batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def test_batch_contract_and_normalisation(clips):
    paths, _ = clips
    idx = VideoIndex.from_paths(paths, labels=list(range(6)))
    loader = PyAVClipLoader(idx, batch_size=4, num_frames=4, size=16, mean=MEAN, std=STD, num_workers=0)
    bs = _batches(loader)
    assert len(bs) == len(loader) == 2
    b = bs[0]
    assert b.clips.shape == (4, 4, 3, 16, 16) and b.clips.dtype == torch.float32
    assert b.labels.tolist() == [0, 1, 2, 3] and b.index.tolist() == [0, 1, 2, 3]
    raw, fidx = read_clip(paths[1], 4, size=16, return_indices=True)
    want = (raw.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(b.clips[1], want)
    assert b.frame_indices[1].tolist() == fidx
    assert len(loader.bad_files) == 0


def test_same_seed_same_batches_any_workers(clips):
    paths, _ = clips
    idx = VideoIndex.from_paths(paths)
    kw = dict(batch_size=3, num_frames=4, size=12, mean=MEAN, std=STD, train=True, seed=11)
    a = _batches(PyAVClipLoader(idx, num_workers=0, **kw), epoch=2)
    b = _batches(PyAVClipLoader(idx, num_workers=2, **kw), epoch=2)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.frame_indices, y.frame_indices)
        assert torch.equal(x.clips, y.clips)
        assert (x.labels == -1).all()
    # per-entry results equal read_clip with the documented seed
    e = int(a[0].index[0])
    want = read_clip(paths[e], 4, size=12, train=True, seed=sample_seed(11, 2, e))
    torch.testing.assert_close(a[0].clips[0], (want.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1))
                               / torch.tensor(STD).view(1, 3, 1, 1))
    c = _batches(PyAVClipLoader(idx, num_workers=0, **kw), epoch=3)
    assert not all(torch.equal(x.frame_indices, y.frame_indices) for x, y in zip(a, c))


def test_bad_file_resampled_and_reported(clips, tmp_path):
    paths, bad = clips
    idx = VideoIndex.from_paths(paths + [bad], labels=[0] * 6 + [9])
    kw = dict(batch_size=7, num_frames=2, size=8, mean=MEAN, std=STD, max_bad_fraction=0.2)
    loader = PyAVClipLoader(idx, num_workers=0, **kw)
    (b,) = _batches(loader)
    assert int(b.index[6]) != 6 and int(b.labels[6]) == 0  # replaced, and the label follows the replacement
    assert loader.bad_files.rows() == [(bad, "cannot open: Invalid data found when processing input", 1)]
    (b2,) = _batches(PyAVClipLoader(idx, num_workers=1, **kw))
    assert torch.equal(b.index, b2.index) and torch.equal(b.clips, b2.clips)  # deterministic resample
    loader.bad_files.write(tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "bad_files.json").read_text())
    assert rows == [{"path": bad, "reason": "cannot open: Invalid data found when processing input", "count": 1}]
    assert (tmp_path / "run" / "bad_files.tsv").read_text().splitlines()[0] == "path\treason\tcount"


def test_too_many_bad_files_stops(clips, tmp_path):
    paths, bad = clips
    bads = []
    for i in range(3):
        shutil.copy(bad, tmp_path / f"b{i}.mp4")
        bads.append(str(tmp_path / f"b{i}.mp4"))
    idx = VideoIndex.from_paths(paths + bads)
    loader = PyAVClipLoader(idx, batch_size=3, num_frames=2, size=8, mean=MEAN, std=STD, num_workers=0)
    with pytest.raises(TooManyBadFiles, match=r"bad \(> max_bad_fraction=0.05\)"):
        _batches(loader)


def test_missing_files_count_as_bad(clips, tmp_path):
    paths, _ = clips
    idx = VideoIndex.from_paths(paths + [str(tmp_path / "gone.mp4")], skip_missing=True)
    loader = PyAVClipLoader(idx, batch_size=6, num_frames=2, size=8, mean=MEAN, std=STD, num_workers=0,
                            max_bad_fraction=0.2)
    assert loader.bad_files.rows() == [(str(tmp_path / "gone.mp4"), "missing file", 1)]
    assert len(_batches(loader)) == 1
    strict = PyAVClipLoader(idx, batch_size=6, num_frames=2, size=8, mean=MEAN, std=STD, num_workers=0)
    with pytest.raises(TooManyBadFiles):
        _batches(strict)


def test_sharding_and_shuffle(clips):
    paths, _ = clips
    idx = VideoIndex.from_paths(paths)
    seen = []
    for rank in range(2):
        ld = PyAVClipLoader(idx, batch_size=3, num_frames=1, size=8, mean=MEAN, std=STD, num_workers=0, train=True,
                            seed=3, rank=rank, world_size=2, drop_last=False)
        seen += [int(i) for b in _batches(ld) for i in b.index]
    assert sorted(seen) == list(range(6))


def test_argument_errors(clips):
    idx = VideoIndex.from_paths(clips[0])
    with pytest.raises(ValueError, match="batch_size"):
        PyAVClipLoader(idx, batch_size=0, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="mean and std"):
        PyAVClipLoader(idx, batch_size=2, mean=(0.5,), std=STD)
    with pytest.raises(ValueError, match="rank"):
        PyAVClipLoader(idx, batch_size=2, mean=MEAN, std=STD, rank=2, world_size=2)


def test_report_merge_and_summary():
    r = BadFilesReport()
    r.add("a", "x")
    r.add("a", "y")
    o = BadFilesReport()
    o.add("b", "z", 3)
    r.merge(o)
    assert r.rows() == [("b", "z", 3), ("a", "x", 2)]
    assert "2 bad file(s)" in r.summary()


def _worker_pids(loader):
    it = loader._loader._iterator
    return [w.pid for w in it._workers] if it is not None else []


def test_workers_persist_across_epochs(clips):
    paths, _ = clips
    ld = PyAVClipLoader(VideoIndex.from_paths(paths[:3]), batch_size=2, num_frames=2, size=16, mean=MEAN, std=STD,
                        num_workers=1, train=True, seed=3)
    first = _batches(ld, 0)
    pids = _worker_pids(ld)
    second = _batches(ld, 1)
    assert pids and _worker_pids(ld) == pids and all(p is not None for p in pids)  # forked once, reused
    again = PyAVClipLoader(VideoIndex.from_paths(paths[:3]), batch_size=2, num_frames=2, size=16, mean=MEAN, std=STD,
                           num_workers=0, train=True, seed=3)
    for a, b in zip(first + second, _batches(again, 0) + _batches(again, 1)):  # epochs still differ and match
        assert torch.equal(a.clips, b.clips) and torch.equal(a.index, b.index)


def _hang_on(path_part):
    """A ``ClipDataset.read`` that never returns for paths containing ``path_part`` (a hung decoder)."""
    from rest_fast.data.loader import ClipDataset

    real = ClipDataset.read

    def read(self, path, seed):
        if path_part in str(path):
            import time

            while True:  # a decoder stuck in a loop / a blocking read
                time.sleep(0.05)
        return real(self, path, seed)

    return read


@pytest.mark.parametrize("num_workers", [0, 1])
def test_hung_decoder_becomes_a_counted_bad_file(clips, monkeypatch, num_workers):
    from rest_fast.data.loader import ClipDataset

    paths, _ = clips
    monkeypatch.setattr(ClipDataset, "read", _hang_on("c1."))
    ld = PyAVClipLoader(VideoIndex.from_paths(paths[:3]), batch_size=3, num_frames=2, size=16, mean=MEAN, std=STD,
                        num_workers=num_workers, decode_timeout_s=0.3, max_bad_fraction=0.5)
    (b,) = _batches(ld)
    assert b.clips.shape == (3, 2, 3, 16, 16) and int(b.index[1]) != 1  # the entry was replaced
    (row,) = ld.bad_files.rows()
    assert row[0] == paths[1] and row[1] == "decoding took longer than decode_timeout_s=0.3" and row[2] >= 1


def test_colour_on_device_equals_colour_in_workers(clips):
    paths, _ = clips
    kw = dict(batch_size=3, num_frames=3, size=16, mean=MEAN, std=STD, num_workers=0, train=True, seed=5)
    a = _batches(PyAVClipLoader(VideoIndex.from_paths(paths), colour_on_device=False, **kw), 2)
    b = _batches(PyAVClipLoader(VideoIndex.from_paths(paths), colour_on_device=True, **kw), 2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.clips, y.clips, atol=1e-6, rtol=0)  # identical uint8 -> identical floats
        assert torch.equal(x.index, y.index)


def test_stream_epoch_reaches_persistent_workers(tmp_path):
    """ShardClipLoader(stream=True) with workers kept across epochs still reads each epoch's own order."""
    from rest_fast.data.shards import PreparedIndex, ShardClipLoader, prepare

    src = tmp_path / "v" / "c"
    src.mkdir(parents=True)
    for i in range(4):
        vf.write_index_clip(src / f"{i}.webm", 5 + i, "vp9", width=32, height=24)
    prepare(src.parent, tmp_path / "prep", frames=4, short_side=24, workers=0, progress=False, shard_size=1)
    idx = PreparedIndex.load(tmp_path / "prep")
    kw = dict(batch_size=4, mean=MEAN, std=STD, num_frames=2, size=16, train=True, seed=1, stream=True,
              shuffle_buffer=2, drop_last=False)
    kept = ShardClipLoader(idx, num_workers=1, **kw)
    ref = ShardClipLoader(idx, num_workers=0, **kw)
    orders = []
    for epoch in range(3):
        (a,), (b,) = _batches(kept, epoch), _batches(ref, epoch)
        assert torch.equal(a.index, b.index) and torch.equal(a.clips, b.clips)
        orders.append(a.index.tolist())
    assert len({tuple(o) for o in orders}) > 1  # the epoch changed the order inside the kept worker
