"""DataLoader worker processes start before the DALI pipeline exists: a fork then never copies DALI's live threads
(a lock another thread holds at fork time stays locked forever in the child). DALI's CPU variant stands in for
the GPU pipeline; the pipeline builder records how many worker processes were alive when it ran."""

from __future__ import annotations

import multiprocessing

import pytest
import video_fixtures as vf

pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed (pip install -e .[dali])")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _recording(module, name, monkeypatch):
    seen = []
    real = getattr(module, name)

    def build(*args, **kwargs):
        seen.append(len(multiprocessing.active_children()))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, build)
    return seen


def test_video_loader_forks_workers_before_building_the_pipeline(tmp_path, monkeypatch):
    import rest_fast.data.dali as dali
    from rest_fast.data.index import VideoIndex

    paths = [str(vf.write_index_clip(tmp_path / f"{i}.webm", 6, "vp9", width=65, height=49)) for i in range(2)]
    seen = _recording(dali, "build_pipeline", monkeypatch)
    before = len(multiprocessing.active_children())
    ld = dali.DALIClipLoader(VideoIndex.from_paths(paths), batch_size=2, mean=MEAN, std=STD, num_frames=2, size=16,
                             decoder_device="cpu", num_threads=1, num_workers=1)
    for epoch in range(2):  # workers persist: the second epoch neither forks again nor rebuilds the pipeline
        ld.set_epoch(epoch)
        assert [b.clips.shape[0] for b in ld] == [2]
    assert seen == [before + 1]


def test_shard_loader_forks_workers_before_building_the_pipeline(tmp_path, monkeypatch):
    import rest_fast.data.shards.dali as sdali
    from rest_fast.data.shards import PreparedIndex, prepare

    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    for i in range(2):
        vf.write_index_clip(src / f"{i}.mp4", 6, width=66, height=50)
    prepare(src.parent, tmp_path / "prep", frames=4, short_side=32, workers=0, progress=False)
    seen = _recording(sdali, "build_shard_pipeline", monkeypatch)
    before = len(multiprocessing.active_children())
    ld = sdali.DALIShardLoader(PreparedIndex.load(tmp_path / "prep"), batch_size=2, mean=MEAN, std=STD, num_frames=2,
                               size=16, decoder_device="cpu", num_threads=1, num_workers=1)
    assert [b.clips.shape[0] for b in ld] == [2]
    assert seen == [before + 1]
