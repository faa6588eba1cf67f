"""Prepared clip shards: prepare (layout, bad files, kill + resume), readers vs the direct video path."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import video_fixtures as vf  # noqa: E402

from rest_fast.data import read_clip  # noqa: E402
from rest_fast.data.clip import clip_rng  # noqa: E402
from rest_fast.data.decode import draw_offsets, read_frames_reference, sample_indices  # noqa: E402
from rest_fast.data.loader import PyAVClipLoader, sample_seed  # noqa: E402
from rest_fast.data.shards import (  # noqa: E402
    PreparedIndex,
    ShardClipLoader,
    is_prepared_dir,
    load_index,
    make_clip_loader,
    parse_size,
    prepare,
    read_prepared_clip,
    read_sample,
)

FRAMES = 16
SHORT = 40
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _dataset(root: Path) -> Path:
    """Two class folders of index clips (N above and below F, several codecs, a rotation) + bad files."""
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    vf.write_index_clip(a / "h264_40.mp4", 40, width=66, height=50)
    vf.write_index_clip(a / "gop_60.mp4", 60, width=64, height=48, options={"g": "10", "bf": "3", "sc_threshold": "0"})
    vf.write_index_clip(a / "short_12.mp4", 12, width=80, height=60)
    vf.write_index_clip(b / "vp9_16.webm", 16, "vp9", width=65, height=49)
    vf.write_index_clip(b / "mjpeg_9.avi", 9, "mjpeg", width=65, height=49)
    vf.write_index_clip(b / "rot_10.mp4", 10, width=64, height=48, rotation=90)
    (b / "text.mp4").write_text("not a video\n" * 10)
    (b / "zero.mp4").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = _dataset(tmp_path_factory.mktemp("videos"))
    out = tmp_path_factory.mktemp("prep") / "out"
    res = prepare(src, out, frames=FRAMES, short_side=SHORT, quality=90, workers=2, shard_size="20kB",
                  progress=False)
    return src, out, res


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size(512) == 512
    assert parse_size("1.5k") == 1500
    with pytest.raises(ValueError, match="shard_size"):
        parse_size("big")


def test_layout_index_and_bad_files(prepared):
    src, out, res = prepared
    assert is_prepared_dir(out) and not is_prepared_dir(src)
    assert res.num_videos == 6 and res.num_bad == 2 and res.num_shards >= 2  # 20 kB shards: several
    info = json.loads((out / "prepared.json").read_text())
    assert info["frames"] == FRAMES and info["class_names"] == ["a", "b"] and info["labelled"]
    bad = {Path(r["path"]).name: r["reason"] for r in json.loads((out / "bad_files.json").read_text())}
    assert set(bad) == {"text.mp4", "zero.mp4"} and "empty" in bad["zero.mp4"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    index = PreparedIndex.load(out)
    assert [Path(p).name for p in index.paths] == ["gop_60.mp4", "h264_40.mp4", "short_12.mp4", "mjpeg_9.avi",
                                                   "rot_10.mp4", "vp9_16.webm"]
    assert index.labels == [0, 0, 0, 1, 1, 1] and len(index.missing) == 2
    for i, e in enumerate(index.entries):
        n = {"gop_60.mp4": 60, "h264_40.mp4": 40, "short_12.mp4": 12, "mjpeg_9.avi": 9, "rot_10.mp4": 10,
             "vp9_16.webm": 16}[Path(e["path"]).name]
        jpegs, meta = read_sample(index, i)
        assert meta["num_decoded"] == e["num_decoded"] == n
        assert e["frames"] == len(jpegs) == min(n, FRAMES)
        assert meta["frame_indices"] == sorted(set(sample_indices(n, FRAMES)))
        assert meta["label"] == index.labels[i] and meta["path"] == e["path"] and meta["fps"] > 0
        assert min(meta["height"], meta["width"]) == SHORT or max(meta["height"], meta["width"]) < 80
        assert index.position(e["key"]) == i and index.position(e["path"]) == i and index.position(e["id"]) == i


def test_shards_are_plain_webdataset(prepared):
    _, out, _ = prepared
    wds = pytest.importorskip("webdataset")

    index = PreparedIndex.load(out)
    urls = [str(out / s) for s in json.loads((out / "prepared.json").read_text())["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        seen[sample["__key__"]] = sample
    assert sorted(seen) == sorted(e["key"] for e in index.entries)
    for e in index.entries:
        s = seen[e["key"]]
        frames = sorted(k for k in s if k.endswith(".jpg"))
        assert frames == [f"{k:03d}.jpg" for k in range(e["frames"])]
        assert json.loads(s["json"])["frame_indices"] == read_sample(index, index.position(e["key"]))[1]["frame_indices"]
        with tarfile.open(out / e["shard"]) as tf:  # the recorded byte range starts at the sample's first header
            first = next(m for m in tf.getmembers() if m.name.startswith(e["key"] + "."))
            assert first.offset == e["offset"]


def _resize_ref(a: np.ndarray, h: int, w: int) -> np.ndarray:
    x = torch.from_numpy(a).permute(2, 0, 1)[None].double()
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).numpy()


def test_stored_frames_match_direct_decoding(prepared):
    """Every stored JPEG vs the reference decoder's frame at its source index (resized in float64)."""
    from PIL import Image

    _, out, _ = prepared
    index = PreparedIndex.load(out)
    for i, path in enumerate(index.paths):
        jpegs, meta = read_sample(index, i)
        ref, ref_idx = read_frames_reference(path, FRAMES)
        ref = dict(zip(ref_idx, ref))
        for k, src in enumerate(meta["frame_indices"]):
            got = np.asarray(Image.open(io.BytesIO(jpegs[k])).convert("RGB")).astype(np.float64)
            want = _resize_ref(ref[src], meta["height"], meta["width"])
            assert got.shape == want.shape
            err = np.abs(got - want)
            assert err.mean() < 4.0, (path, k, err.mean())
            if "rot" not in path:  # the code is laid out in coded (unrotated) pixels
                assert vf.decode_index(got) == src


@pytest.mark.parametrize("train", [False, True])
def test_exact_frame_selection(prepared, train):
    """Index-coded clips: the frames read back are the source frames the reader reports, which are the
    stored frames at sample_indices(M, T) of the per-sample seed; for N <= F they equal read_clip's."""
    _, out, _ = prepared
    index = PreparedIndex.load(out)
    T = 8
    for i, path in enumerate(index.paths):
        seed = sample_seed(3, 1, i)
        clip, idx = read_prepared_clip(index, i, T, size=32, train=train, seed=seed, return_indices=True)
        assert clip.shape == (T, 32, 32, 3) and clip.dtype == torch.uint8
        _, meta = read_sample(index, i)
        offsets = draw_offsets(T, clip_rng(seed)) if train else None
        want = [meta["frame_indices"][k] for k in sample_indices(len(meta["frame_indices"]), T, train=train,
                                                                 offsets=offsets)]
        assert idx == want
        if not train and "rot" not in path:  # augmentations may blur the code; rotation moves it
            assert [vf.decode_index(f.numpy()) for f in clip] == idx
        if meta["num_decoded"] <= FRAMES:
            _, direct_idx = read_clip(path, T, size=32, train=train, seed=seed, return_indices=True)
            assert idx == direct_idx


def test_eval_clips_close_to_direct_path(prepared):
    """N <= F: the same frames, so the eval clip differs from read_clip's only by JPEG + resampling."""
    _, out, _ = prepared
    index = PreparedIndex.load(out)
    for i, path in enumerate(index.paths):
        if index.entries[i]["num_decoded"] > FRAMES:
            continue
        got = read_prepared_clip(index, i, 8, size=32).float()
        want = read_clip(path, 8, size=32).float()
        assert (got - want).abs().mean() < 6.0, path


def test_loader_contract_and_determinism(prepared):
    _, out, _ = prepared
    index = load_index(out)
    assert isinstance(index, PreparedIndex)
    kw = dict(batch_size=4, mean=MEAN, std=STD, num_frames=8, size=32, train=True, seed=5, drop_last=False,
              max_bad_fraction=0.5)
    runs = []
    for workers, stream, on_device in ((0, False, False), (2, False, False), (2, True, False), (0, True, True)):
        loader = make_clip_loader(index, num_workers=workers, stream=stream, shuffle_buffer=3,
                                  colour_on_device=on_device, **kw)
        assert isinstance(loader, ShardClipLoader)
        loader.set_epoch(2)
        got = {}
        for b in loader:
            assert b.clips.dtype == torch.float32 and b.clips.shape[1:] == (8, 3, 32, 32)
            assert b.frame_indices.shape == (b.clips.shape[0], 8)
            for k in range(b.clips.shape[0]):
                j = int(b.index[k])
                assert int(b.labels[k]) == index.labels[j]
                got[j] = (b.clips[k], b.frame_indices[k])
        assert sorted(got) == list(range(len(index)))
        assert len(loader.bad_files) == 2  # prepare's bad files are reported
        runs.append(got)
    for j in range(len(index)):
        for other in runs[1:]:
            torch.testing.assert_close(runs[0][j][0], other[j][0], rtol=0, atol=0)
            assert torch.equal(runs[0][j][1], other[j][1])
    # normalisation: entry 0 equals the uint8 clip of the same seed, normalised
    u8 = read_prepared_clip(index, 0, 8, size=32, train=True, seed=sample_seed(5, 2, 0))
    want = (u8.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(runs[0][0][0], want, rtol=1e-5, atol=1e-5)


def test_stream_ranks_cover_everything(prepared):
    _, out, _ = prepared
    index = PreparedIndex.load(out)
    seen = []
    for rank in range(2):
        loader = ShardClipLoader(index, batch_size=2, mean=MEAN, std=STD, num_frames=4, size=16, train=True,
                                 num_workers=0, stream=True, rank=rank, world_size=2, drop_last=False,
                                 max_bad_fraction=0.5)
        got = [int(j) for b in loader for j in b.index]
        assert len(got) == 3
        seen += got
    assert sorted(seen) == list(range(6))


def test_factory_routes_videos_and_unfinished_dirs(prepared, tmp_path):
    src, out, _ = prepared
    vids = load_index(src)
    assert not isinstance(vids, PreparedIndex) and len(vids) == 8
    loader = make_clip_loader(vids, batch_size=2, mean=MEAN, std=STD, num_workers=0, stream=True)
    assert isinstance(loader, PyAVClipLoader)
    part = tmp_path / "part"
    prepare(src, part, frames=4, short_side=32, workers=0, progress=False, max_videos=2)
    assert not is_prepared_dir(part)
    with pytest.raises(ValueError, match="did not finish"):
        load_index(part)
    with pytest.raises(ValueError, match="other settings"):
        prepare(src, part, frames=5, short_side=32, workers=0, progress=False)
    res = prepare(src, part, frames=4, short_side=32, workers=0, progress=False)
    assert res.resumed_from == 2 and res.num_videos == 6 and is_prepared_dir(part)


_KILLABLE = textwrap.dedent("""
    import importlib, sys, time
    P = importlib.import_module("rest_fast.data.shards.prepare")  # the module, not the function
    slow = P.encode_video
    def encode(*a, **k):  # slow enough to be killed mid-way
        time.sleep(0.3)
        return slow(*a, **k)
    P.encode_video = encode
    P.prepare(sys.argv[1], sys.argv[2], frames=8, short_side=32, workers=1, shard_size=1, progress=False)
""")


def test_kill_and_resume_gives_identical_output(tmp_path):
    src = tmp_path / "v"
    (src / "c").mkdir(parents=True)
    for k in range(10):
        vf.write_index_clip(src / "c" / f"v{k}.mp4", 12 + k, width=48, height=40)
    (src / "c" / "v5.mp4").write_text("broken")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(src), str(killed)], start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = killed / "manifest.json"
            if m.exists() and json.loads(m.read_text())["next"] >= 3:
                break
            assert proc.poll() is None, "prepare ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its decoding worker
    finally:
        proc.wait()
    assert not is_prepared_dir(killed)
    nxt = json.loads((killed / "manifest.json").read_text())["next"]
    assert 3 <= nxt < 10
    for shard in killed.glob("shard-*.tar"):  # whatever carries a shard name is a complete tar
        with tarfile.open(shard) as tf:
            assert tf.getmembers()
    res = prepare(src, killed, frames=8, short_side=32, workers=1, shard_size=1, progress=False)
    assert res.resumed_from == nxt and res.num_bad == 1 and res.num_videos == 9
    prepare(src, clean, frames=8, short_side=32, workers=0, shard_size=1, progress=False)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in clean.iterdir())
    for name in ["index.jsonl", "bad_files.tsv"] + [p.name for p in clean.glob("shard-*.tar")]:
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        prepare(tmp_path, tmp_path / "o", frames=0)
    with pytest.raises(ValueError, match="quality"):
        prepare(tmp_path, tmp_path / "o", quality=0)
    with pytest.raises(FileNotFoundError, match="data="):
        prepare(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="not a prepared directory"):
        PreparedIndex.load(tmp_path)


def test_read_clip_any_routes_registered_paths(prepared):
    from rest_fast.data.shards import read_clip_any, register_prepared

    src, out, _ = prepared
    index = PreparedIndex.load(out)
    path = index.paths[1]
    direct = read_clip_any(path, 4, size=24)  # not registered yet: the video file
    torch.testing.assert_close(direct, read_clip(path, 4, size=24), rtol=0, atol=0)
    register_prepared(index)
    torch.testing.assert_close(read_clip_any(path, 4, size=24), read_prepared_clip(index, 1, 4, size=24),
                               rtol=0, atol=0)


def test_cli_prepare(tmp_path, capsys):
    from rest_fast.cli import main

    src = tmp_path / "v" / "c"
    src.mkdir(parents=True)
    vf.write_index_clip(src / "a.mp4", 9, width=48, height=40)
    (src / "b.mp4").write_text("broken")
    lst = tmp_path / "list.txt"
    lst.write_text("v/c/a.mp4 3\nv/c/b.mp4 1\n")
    out = tmp_path / "out"
    assert main(["prepare", "--data", str(lst), "--out", str(out), "--frames", "4", "--short-side", "32",
                 "--workers", "0", "--shard-size", "1MB", "--no-progress"]) == 0
    assert "1 videos in 1 shard(s), 1 bad" in capsys.readouterr().out
    index = load_index(out)
    assert index.labels == [3] and index.entries[0]["frames"] == 4 and index.info["shard_size"] == 10**6


@pytest.mark.gpu
def test_loader_on_cuda_applies_colour_on_device(prepared):
    _, out, _ = prepared
    index = PreparedIndex.load(out)
    kw = dict(batch_size=3, mean=MEAN, std=STD, num_frames=8, size=32, train=True, seed=1, num_workers=0,
              drop_last=False, max_bad_fraction=0.5)
    gpu = list(ShardClipLoader(index, device="cuda", **kw))
    cpu = list(ShardClipLoader(index, device="cpu", **kw))
    for a, b in zip(gpu, cpu):
        assert a.clips.is_cuda and torch.equal(a.index, b.index)
        # colour ops in float32 on another device: rounding to uint8 may differ by one level
        assert (a.clips.cpu() - b.clips).abs().max() * 0.25 * 255 <= 1.01
