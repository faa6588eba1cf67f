"""Paper-faithful trainer options (issue 14, item 16): Ω may include the video itself (H=1 = the "self-training
only" ablation), and the caption round after the final epoch is skipped unless asked for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rest_fast.run.config import DEMO_PRESET, TrainConfig
from rest_fast.train.distributed import DistEnv
from rest_fast.train.neighbours import neighbour_graph

ENV1 = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _feats(n: int = 7, d: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_neighbour_graph_include_self(tmp_path):
    v = _feats()
    own = neighbour_graph(v, 1, ENV1, cache_dir=tmp_path / "a", include_self=True)
    assert own.shape == (7, 1) and own.dtype == np.int32 and (own[:, 0] == np.arange(7)).all()
    others = neighbour_graph(v, 3, ENV1, cache_dir=tmp_path / "b")
    both = neighbour_graph(v, 4, ENV1, cache_dir=tmp_path / "c", include_self=True)
    assert (both[:, 0] == np.arange(7)).all() and (both[:, 1:] == others).all()
    full = neighbour_graph(v, 7, ENV1, cache_dir=tmp_path / "d", include_self=True)  # H = N allowed with self
    assert all(sorted(r) == list(range(7)) for r in full.tolist())
    with pytest.raises(ValueError, match=r"\[1, 7\]"):
        neighbour_graph(v, 8, ENV1, cache_dir=tmp_path / "e", include_self=True)
    with pytest.raises(ValueError):
        neighbour_graph(v, 7, ENV1, cache_dir=tmp_path / "f")  # self excluded: at most N-1


def test_caption_rounds_skip_the_one_after_the_final_epoch():
    c = TrainConfig()
    assert c.num_rounds == 6 and c.caption_rounds == 5 and not c.final_caption_round
    assert TrainConfig(final_caption_round=True).caption_rounds == 6
    assert TrainConfig(epochs=25).caption_rounds == 2  # rounds after epochs 10 and 20; none after 25
    assert DEMO_PRESET["final_caption_round"] is True  # the demo shows its final captions (it has no eval step)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_self_training_only_run(tmp_path):
    """H=1 with the video itself: every pseudo-caption of round 0 is one of the video's OWN initial captions,
    and with final_caption_round off no round follows the last epoch."""
    from rest_fast.cli import main

    run = tmp_path / "run"
    args = ["train", f"--out={run}", "demo_videos_per_class=2", "demo_frames=8", "num_frames=2", "epochs=2",
            "epochs_per_round=1", "batch_size=6", "num_beams=1", "max_length=8", "min_length=2",
            "prompts=[a video of, someone is]", "progress=false", "num_neighbours=1",
            "neighbours_include_self=true", "final_caption_round=false"]
    assert main(args) == 0
    rounds = [r["round"] for r in _jsonl(run / "metrics.jsonl") if r.get("kind") == "round"]
    assert rounds == [0, 1]  # epochs=2, R=1: the round after epoch 2 is skipped
    assert json.loads((run / "state.json").read_text())["epoch"] == 2
    initial = {r["video"]: set(r["captions"]) for r in _jsonl(run / "captions" / "initial.jsonl")}
    for rec in _jsonl(run / "captions" / "round_00.jsonl"):
        assert rec["captions"] and set(rec["captions"]) <= initial[rec["video"]], rec["video"]
    # the finished run is complete: a resume has nothing left to do
    assert main([*args, "--resume", "auto"]) == 0
    assert [r["round"] for r in _jsonl(run / "metrics.jsonl") if r.get("kind") == "round"] == [0, 1]
