"""DALI reader of prepared shards on CPU (libjpeg-turbo) vs the CPU shard reader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import video_fixtures as vf  # noqa: E402

pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed (pip install -e .[dali])")

from rest_fast.data.shards import PreparedIndex, ShardClipLoader, prepare  # noqa: E402
from rest_fast.data.shards.dali import DALIShardLoader  # noqa: E402

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    src = tmp_path_factory.mktemp("dali_shard_videos") / "c"
    src.mkdir()
    vf.write_index_clip(src / "a.mp4", 30, width=66, height=50)
    vf.write_video(src / "b.mp4", (vf.textured_frame(i, 90, 66) for i in range(20)), "h264")
    vf.write_index_clip(src / "c.webm", 7, "vp9", width=65, height=49)
    (src / "bad.mp4").write_text("garbage")
    out = tmp_path_factory.mktemp("dali_shard_prep") / "out"
    prepare(src.parent, out, frames=12, short_side=48, workers=0, progress=False)
    return PreparedIndex.load(out)


def _levels(clips):
    m = torch.tensor(MEAN).view(1, 1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 1, 3, 1, 1)
    return (clips * s + m) * 255.0


@pytest.mark.parametrize("train", [False, True])
def test_dali_cpu_matches_cpu_reader(index, train):
    common = dict(batch_size=2, mean=MEAN, std=STD, num_frames=5, size=40, train=train, seed=9, shuffle=train,
                  drop_last=False, max_bad_fraction=0.5)
    d = DALIShardLoader(index, decoder_device="cpu", num_threads=1, **common)
    c = ShardClipLoader(index, num_workers=0, **common)
    d.set_epoch(1)
    c.set_epoch(1)
    db, cb = list(d), list(c)
    assert len(db) == len(cb) == 2 and len(d.bad_files) == len(c.bad_files) == 1
    for a, b in zip(db, cb):
        assert a.clips.shape == b.clips.shape and a.clips.dtype == torch.float32
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.frame_indices, b.frame_indices)
        diff = (_levels(a.clips) - _levels(b.clips)).abs()
        assert diff.mean() < 3.0, diff.mean()


def test_dali_rejects_bad_arguments(index):
    with pytest.raises(ValueError, match="batch_size"):
        DALIShardLoader(index, batch_size=0, mean=MEAN, std=STD, decoder_device="cpu")
    with pytest.raises(ValueError, match="decoder_device"):
        DALIShardLoader(index, batch_size=1, mean=MEAN, std=STD, decoder_device="gpu")._pipe(1)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True])
def test_dali_mixed_nvjpeg_matches_cpu_reader(index, train):
    """nvJPEG on the GPU, crop/resize on the GPU, colour ops on the GPU: same entries, indices, close pixels."""
    common = dict(batch_size=3, mean=MEAN, std=STD, num_frames=6, size=40, train=train, seed=4, drop_last=False,
                  max_bad_fraction=0.5)
    d = list(DALIShardLoader(index, decoder_device="mixed", device="cuda", **common))
    c = list(ShardClipLoader(index, num_workers=0, **common))
    for a, b in zip(d, c):
        assert a.clips.is_cuda and a.clips.shape == b.clips.shape
        assert torch.equal(a.index, b.index) and torch.equal(a.frame_indices, b.frame_indices)
        assert (_levels(a.clips.cpu()) - _levels(b.clips)).abs().mean() < 3.0


def test_dali_webdataset_reader_reads_the_shards(index):
    """The shards are plain WebDataset: DALI's own fn.readers.webdataset reads every sample."""
    import io
    import json

    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from PIL import Image

    from rest_fast.data.shards import read_sample

    paths = [str(Path(index.root) / s) for s in index.info["shards"]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        js, first = fn.readers.webdataset(paths=paths, ext=["json", "000.jpg"], missing_component_behavior="error")
        return js, fn.decoders.image(first, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    seen = set()
    for _ in range(len(index)):
        js, img = p.run()
        meta = json.loads(bytes(np.array(js[0])))
        k = index.position(meta["path"])
        seen.add(k)
        jpegs, ours = read_sample(index, k)
        assert meta == ours
        want = np.asarray(Image.open(io.BytesIO(jpegs[0])).convert("RGB")).astype(float)
        assert np.abs(np.array(img[0]).astype(float) - want).mean() < 1.0
    assert seen == set(range(len(index)))


@pytest.mark.parametrize("shuffle", [False, True])
def test_dali_stream_through_webdataset_reader(index, shuffle):
    """stream=True: fn.readers.webdataset order, every entry once per epoch, each clip identical to the
    random-access DALI loader's clip of that entry (same seed, epoch)."""
    common = dict(batch_size=2, mean=MEAN, std=STD, num_frames=5, size=40, train=True, seed=3, shuffle=shuffle,
                  drop_last=False, max_bad_fraction=0.5, decoder_device="cpu", num_threads=1)
    st = DALIShardLoader(index, stream=True, shuffle_buffer=2, **common)
    ra = DALIShardLoader(index, **common)
    for epoch in (0, 1):
        st.set_epoch(epoch)
        ra.set_epoch(epoch)
        got = {int(j): (b.clips[k], b.frame_indices[k]) for b in st for k, j in enumerate(b.index)}
        want = {int(j): (b.clips[k], b.frame_indices[k]) for b in ra for k, j in enumerate(b.index)}
        assert sorted(got) == list(range(len(index))) and len(st) == 2
        for j in got:
            torch.testing.assert_close(got[j][0], want[j][0], rtol=0, atol=0)
            assert torch.equal(got[j][1], want[j][1])
    with pytest.raises(ValueError, match="full PreparedIndex"):
        DALIShardLoader(index[:2], stream=True, **common)


def test_dali_workers_and_prefetch_give_the_same_batches(index):
    kw = dict(batch_size=2, mean=MEAN, std=STD, num_frames=4, size=24, train=True, seed=4, drop_last=False,
              max_bad_fraction=0.5, decoder_device="cpu", num_threads=1)
    sync = DALIShardLoader(index, num_workers=0, prefetch=1, **kw)
    fast = DALIShardLoader(index, num_workers=1, prefetch=3, **kw)
    for epoch in (0, 1):
        sync.set_epoch(epoch)
        fast.set_epoch(epoch)
        for a, b in zip(list(sync), list(fast), strict=True):
            assert torch.equal(a.index, b.index) and torch.equal(a.frame_indices, b.frame_indices)
            assert torch.equal(a.clips, b.clips)
    assert len(fast.bad_files) == 1
