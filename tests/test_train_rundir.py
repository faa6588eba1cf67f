"""Run directory: atomic writes, checkpoints that exist only complete, tolerant metrics, pruning."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rest_fast.run.rundir import (
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    capture_rng,
    read_jsonl,
    restore_rng,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert sorted(os.listdir(p.parent)) == ["f.json"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, b"new")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_metrics_torn_line_is_skipped_and_filter_rewrites(tmp_path):
    run = RunDir(tmp_path)
    run.append_metric({"kind": "epoch", "epoch": 1, "loss": 2.0})
    run.append_metric({"kind": "epoch", "epoch": 2, "loss": 1.5})
    with open(run.metrics_path, "a") as f:
        f.write('{"kind": "epoch", "ep')  # a kill mid-append
    recs = run.read_metrics()
    assert [r["epoch"] for r in recs] == [1, 2]
    run.filter_metrics(lambda r: r["epoch"] <= 1)
    assert [r["epoch"] for r in read_jsonl(run.metrics_path)] == [1]
    assert run.metrics_path.read_text().endswith("\n")


def test_metrics_reader_survives_the_file_vanishing_after_a_check(tmp_path, monkeypatch):
    """A reader polling a live run (a dashboard, the kill-and-resume test) may look just as a resume replaces the log:
    a file that is gone by the time it is opened reads as empty, never FileNotFoundError."""
    from pathlib import Path

    gone = tmp_path / "metrics.jsonl"
    monkeypatch.setattr(Path, "exists", lambda self: True)  # the check saw it; the open does not
    assert read_jsonl(gone) == []
    assert read_jsonl(str(gone)) == []


def test_checkpoint_round_trip_prune_and_temp_cleanup(tmp_path):
    run = RunDir(tmp_path)
    sd = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3)}
    for e in (1, 2, 3):
        run.save_checkpoint(e, {k: v * e for k, v in sd.items()}, {"step": e, "rng": capture_rng()}, {"round": 0})
    (tmp_path / "checkpoints" / ".epoch_0004.xyz").mkdir()  # a checkpoint killed while being written
    assert [p.name for p in run.list_checkpoints()] == ["epoch_0001", "epoch_0002", "epoch_0003"]
    run.prune_checkpoints(2)
    assert [p.name for p in run.list_checkpoints()] == ["epoch_0002", "epoch_0003"]
    assert not list((tmp_path / "checkpoints").glob(".epoch_*"))
    model, train_state, meta = RunDir.load_checkpoint(run.checkpoint_dir(3))
    assert torch.equal(model["w"], sd["w"] * 3) and train_state["step"] == 3
    assert {k: v for k, v in meta.items() if k != "sha256"} == {"round": 0, "epoch": 3}
    assert set(meta["sha256"]) == {"model.safetensors", "train_state.pt"}
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        RunDir.load_checkpoint(tmp_path / "checkpoints" / "epoch_0009")


def test_rng_capture_restore():
    state = capture_rng()
    a = torch.rand(3)
    restore_rng(state)
    assert torch.equal(torch.rand(3), a)


def test_state_round_trip(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_state() is None
    run.write_state({"epoch": 3, "round": 1, "checkpoint": "checkpoints/epoch_0003"})
    st = run.read_state()
    assert st["epoch"] == 3 and st["round"] == 1 and "time" in st
