"""Round 0 does not depend on the world size (issue 20, done-when): the built-in demo under torchrun
--nproc-per-node 2 and 3 (gloo, CPU) writes captions/round_00.jsonl equal to the single-process run's (same videos,
captions and order; scores within 1e-5), with the caption-feature table sharded: each rank wrote only its own rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train_e2e import _cli, _env

# the demo world and its pretrained models (the defaults), smaller: 16 clips, round 0 and one epoch. One clip per
# captioning / CLIP batch: batches of several clips differ with the world size (each rank batches its own block),
# and the batched models round differently, which is not what this test is about.
DEMO = ["demo_videos_per_class=2", "epochs=1", "epochs_per_round=1", "progress=false", "eval_batch_size=1"]


def _round0(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "captions" / "round_00.jsonl").read_text().splitlines()]


def _same_round0(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["video"], x["index"], x["captions"], x.get("label")) == (y["video"], y["index"], y["captions"],
                                                                             y.get("label"))
        np.testing.assert_allclose(x["scores"], y["scores"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_round0_is_the_same_at_world_sizes_1_2_3(tmp_path):
    single = tmp_path / "single"
    p = _cli([f"--out={single}", *DEMO], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    from rest_fast.cache import CaptionCache

    ref = _round0(single)
    table = sum(np.load(f, mmap_mode="r").shape[0] for f in (single / "features").glob("caption_rows_00.npy"))
    assert table == len(CaptionCache.load(str(single / "cache" / "round_00.rfcc")))
    for world in (2, 3):
        run = tmp_path / f"p{world}"
        env = _env()
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "rest_fast", "train", f"--out={run}", *DEMO]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
        assert (run / "captions" / "initial.jsonl").read_text() == (single / "captions" / "initial.jsonl").read_text()
        # rank 0 wrote the video features from chunks (no rank held every row): the same bytes, the same graph
        assert (run / "features" / "video_clip.npy").read_bytes() == \
            (single / "features" / "video_clip.npy").read_bytes()
        from rest_fast.retrieval import NeighbourGraph
        from rest_fast.train.neighbours import read_rank_graphs

        assert np.array_equal(read_rank_graphs(run / "features" / "neighbours", world).indices.numpy(),
                              NeighbourGraph.load(single / "features" / "neighbours").indices.numpy())
        _same_round0(_round0(run), ref)
        parts = [sum(np.load(f, mmap_mode="r").shape[0]
                     for f in (run / "features").glob(f"caption_rows_00.rank{r:03d}_of{world:03d}.npy"))
                 for r in range(world)]
        assert sum(parts) == table and max(parts) < table  # every caption once, no rank holds the whole table
        rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x).get("kind") == "round"]
        assert rounds[0]["rerank_bytes_sent"] > 0
        assert rounds[0]["tam_pseudo_top1"] == [json.loads(x) for x in (single / "metrics.jsonl").read_text()
                                                .splitlines() if json.loads(x).get("kind") == "round"][0][
                                                    "tam_pseudo_top1"]


def _table(features: Path, world: int, rounds: int) -> np.ndarray:
    """The whole caption-feature table rebuilt from the per-rank files of ``world`` ranks (id j·P + r at row j of r)."""
    parts = [np.concatenate([np.load(features / f"caption_rows_{t:02d}.rank{r:03d}_of{world:03d}.npy")
                             for t in range(rounds + 1)]) for r in range(world)]
    out = np.zeros((sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


@pytest.mark.slow
def test_resume_on_another_world_size_reshards_the_caption_features(tmp_path):
    """Issue 20 item 6: a run made with 2 ranks resumes with 3; the caption features are re-sharded from the saved
    per-rank files (the same bytes, no re-embedding), and the run completes."""
    from test_train_e2e import SMALL, _check_complete_run

    run = tmp_path / "run"
    args = [*SMALL, "eval_batch_size=6"]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"

    def torchrun(world: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "rest_fast", "train", f"--out={run}", *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)

    p = torchrun(2, *args, "epochs=1")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    rnd = json.loads((run / "state.json").read_text())["round"]
    before = _table(run / "features", 2, rnd)
    p = torchrun(3, "--resume", "auto", "epochs=2")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "caption features re-sharded from 2 to 3 ranks" in p.stdout
    np.testing.assert_array_equal(_table(run / "features", 3, rnd), before)
    final = json.loads((run / "state.json").read_text())["round"]
    assert final > rnd  # the resumed run made a round of its own, with the re-sharded table
    _check_complete_run(run, rounds=final, epochs=2, n_videos=12)
