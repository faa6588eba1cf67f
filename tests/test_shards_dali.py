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
