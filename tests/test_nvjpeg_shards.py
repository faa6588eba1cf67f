"""The torchvision nvJPEG shard backend, run here with ``decode_jpeg(device="cpu")`` (the same batched call and the
same crop/resize/colour code as on CUDA): equal to the CPU shard reader within JPEG-decoder tolerance, picked by
``make_clip_loader`` and by ``--decoder auto`` after DALI and before the CPU reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import video_fixtures as vf

from rest_fast.data import select
from rest_fast.data.shards import PreparedIndex, ShardClipLoader, make_clip_loader, prepare
from rest_fast.data.shards.nvjpeg import NvJpegShardLoader, decode_crop_resize

pytest.importorskip("torchvision")
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    src = tmp_path_factory.mktemp("nvjpeg_videos") / "c"
    src.mkdir()
    vf.write_index_clip(src / "a.mp4", 30, width=66, height=50)
    vf.write_video(src / "b.mp4", (vf.textured_frame(i, 90, 66) for i in range(20)), "h264")
    vf.write_index_clip(src / "c.webm", 7, "vp9", width=65, height=49)
    (src / "bad.mp4").write_text("garbage")
    out = tmp_path_factory.mktemp("nvjpeg_prep") / "out"
    prepare(src.parent, out, frames=12, short_side=48, workers=0, progress=False)
    return PreparedIndex.load(out)


def _levels(clips):
    return (clips * torch.tensor(STD).view(1, 1, 3, 1, 1) + torch.tensor(MEAN).view(1, 1, 3, 1, 1)) * 255.0


@pytest.mark.parametrize("train", [False, True])
def test_matches_the_cpu_reader(index, train):
    common = dict(batch_size=2, mean=MEAN, std=STD, num_frames=5, size=40, train=train, seed=9, shuffle=train,
                  drop_last=False, max_bad_fraction=0.5)
    g = NvJpegShardLoader(index, device="cpu", **common)
    c = ShardClipLoader(index, num_workers=0, **common)
    g.set_epoch(1)
    c.set_epoch(1)
    gb, cb = list(g), list(c)
    assert len(gb) == len(cb) == 2 and len(g.bad_files) == len(c.bad_files) == 1
    for a, b in zip(gb, cb):
        assert a.clips.shape == b.clips.shape and a.clips.dtype == torch.float32
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.frame_indices, b.frame_indices)
        diff = (_levels(a.clips) - _levels(b.clips)).abs()
        assert diff.mean() < 3.0, diff.mean()
    if not train:  # centre crops of an index clip: each decoded frame still says its source frame index
        for b in gb:
            for k, entry in enumerate(b.index.tolist()):
                if index.paths[entry].endswith(("a.mp4", "c.webm")):
                    lv = _levels(b.clips)[k].permute(0, 2, 3, 1).numpy()
                    assert [vf.decode_index(f) for f in lv] == b.frame_indices[k].tolist()


def test_decode_crop_resize_matches_pil():
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [np.clip(vf.textured_frame(i, 70, 52, rng).astype(np.int16), 0, 255).astype(np.uint8) for i in range(3)]
    jpegs = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=95)
        jpegs.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    box = (5, 3, 41, 41)
    out = decode_crop_resize(jpegs, [box], 3, 24, torch.device("cpu"))
    assert out.shape == (1, 3, 24, 24, 3) and out.dtype == torch.uint8
    x, y, w, h = box
    ref = [np.asarray(Image.open(io.BytesIO(bytes(j.numpy()))).convert("RGB").resize(
        (24, 24), Image.BILINEAR, box=(x, y, x + w, y + h))) for j in jpegs]
    diff = (out[0].float() - torch.from_numpy(np.stack(ref)).float()).abs()
    assert diff.mean() < 2.0, diff.mean()
    same = decode_crop_resize(jpegs, [(0, 0, 24, 24)], 3, 24, torch.device("cpu"))  # crop only, no resampling
    dec = [np.asarray(Image.open(io.BytesIO(bytes(j.numpy()))).convert("RGB"))[:24, :24] for j in jpegs]
    assert (same[0].float() - torch.from_numpy(np.stack(dec)).float()).abs().mean() < 1.0


def test_make_clip_loader_and_auto_pick_it(index, monkeypatch, tmp_path):
    from rest_fast.data import PyAVClipLoader, VideoIndex

    kw = dict(batch_size=2, mean=MEAN, std=STD, num_frames=2, size=16)
    assert type(make_clip_loader(index, decoder="nvjpeg", **kw)) is NvJpegShardLoader
    video = VideoIndex.from_paths([str(vf.write_index_clip(tmp_path / "v.mp4", 4))])
    assert type(make_clip_loader(video, decoder="nvjpeg", num_workers=0, **kw)) is PyAVClipLoader  # videos: PyAV
    monkeypatch.setattr(select, "_cuda_device", lambda device: torch.device("cuda", 2))
    monkeypatch.setattr(select, "dali_status", lambda: (False, "nvidia-dali is not importable (x)"))
    c = select.choose_decoder("auto", "cuda:2")
    assert (c.name, c.device_id) == ("nvjpeg", 2) and "nvJPEG" in c.reason, c
    monkeypatch.setattr(select, "nvjpeg_status", lambda: (False, "torchvision is not importable (x)"))
    assert select.choose_decoder("auto", "cuda:2").name == "pyav"
    with pytest.raises(ValueError, match="--decoder nvjpeg: torchvision is not importable"):
        select.choose_decoder("nvjpeg", "cuda:2")
    monkeypatch.setattr(select, "dali_status", lambda: (True, "nvidia-dali 9.9"))
    assert select.choose_decoder("auto", "cuda:2").name == "dali"  # DALI first


@pytest.mark.gpu
def test_nvjpeg_on_cuda_matches_the_cpu_reader(index):
    """nvJPEG on the GPU (the GPU image's decode path): same entries and frames, pixels within tolerance."""
    common = dict(batch_size=2, mean=MEAN, std=STD, num_frames=5, size=40, train=False, drop_last=False,
                  max_bad_fraction=0.5)
    g = list(NvJpegShardLoader(index, device="cuda", **common))
    c = list(ShardClipLoader(index, num_workers=0, **common))
    assert len(g) == len(c) == 2
    for a, b in zip(g, c):
        assert a.clips.is_cuda and a.clips.shape == b.clips.shape
        assert torch.equal(a.index, b.index) and torch.equal(a.frame_indices, b.frame_indices)
        assert (_levels(a.clips.cpu()) - _levels(b.clips)).abs().mean() < 3.0
