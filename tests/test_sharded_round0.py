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
