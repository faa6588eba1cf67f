"""Checkpoints that survive clusters: stop signals, mid-epoch checkpoints, round 0 in chunks.

The slow test stops the trainer with SIGTERM twice — during round 0's initial captions, then mid-epoch — through
the deterministic test hook (``REST_FAST_TEST_SIGNAL``: the process signals itself at a given point), resumes with
``--resume auto`` each time, and finds the losses of metrics.jsonl, the final weights and every
captions/round_XX.jsonl identical to a run that was never stopped. The others check the pieces in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rest_fast.train.distributed import DistEnv
from rest_fast.train.preempt import (
    PREEMPTED_EXIT_CODE,
    Control,
    ImmediateExit,
    StopSignals,
    drop_mid_epoch_checkpoints,
    is_mid_epoch,
    maybe_signal_self,
    mid_epoch_name,
)

# 12 clips, 2 epochs of 6 optimiser steps (2 micro-batches each), eval batches of 4 (3 per pass)
ARGS = ["demo_videos_per_class=2", "demo_frames=8", "num_frames=2", "epochs=2", "epochs_per_round=1",
        "batch_size=2", "accum_steps=2", "eval_batch_size=4", "num_beams=1", "max_length=8", "min_length=2",
        "num_neighbours=4", "progress=false", "blip=tiny", "clip=tiny", "clip_pretrained=none", "k=3", "log_every=1",
        "threads=1"]


def _train(args: list[str], hook: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    env.pop("REST_FAST_TEST_SIGNAL", None)
    if hook:
        env["REST_FAST_TEST_SIGNAL"] = hook
    return subprocess.run([sys.executable, "-m", "rest_fast", "train", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def _losses(run: Path) -> list[tuple]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["kind"], r["epoch"], r["step"], r["loss"]) for r in recs if r["kind"] in ("step", "epoch")]


@pytest.mark.slow
def test_sigterm_in_round0_and_mid_epoch_then_resume_is_identical(tmp_path):
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    p = _train([f"--out={ref}", *ARGS])
    assert p.returncode == 0, p.stderr[-3000:]

    run = tmp_path / "run"
    # 0. SIGTERM after the second eval batch of the CLIP video features: 8 videos' features saved as a chunk
    p = _train([f"--out={run}", *ARGS], hook="features:2")
    assert p.returncode == PREEMPTED_EXIT_CODE, p.stderr[-3000:]
    assert "stopped by SIGTERM during round 0 (CLIP video features of 8" in p.stderr and "--resume auto" in p.stderr
    assert [c.name for c in (run / "features" / "video_parts").glob("videos_*")] == ["videos_00000000_00000008.npy"]
    # 1. resume; SIGTERM after round 0's second caption batch: the 8 captioned videos are saved as a chunk
    p = _train([f"--out={run}", "--resume", "auto", *ARGS], hook="round0:2")
    assert p.returncode == PREEMPTED_EXIT_CODE, p.stderr[-3000:]
    assert "stopped by SIGTERM during round 0 (initial captions of 8" in p.stderr
    assert not (run / "features" / "video_parts").exists()  # the features are cached whole: chunks dropped
    assert [c.name for c in sorted((run / "captions" / "initial_parts").glob("videos_*"))] == [
        "videos_00000000_00000008.jsonl"]
    assert not (run / "state.json").exists()
    # 1b. resume; two signals after step 2: the second exits at once (128 + SIGTERM), nothing half-written
    p = _train([f"--out={run}", "--resume", "auto", *ARGS], hook="step:2:SIGTERM:2")
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["checkpoint"] is None  # round 0 done, no epoch yet
    assert not list((run / "checkpoints").iterdir())
    # 2. resume; mid-epoch checkpoints every step (save_every_minutes is a runtime key); SIGTERM after step 7
    #    (epoch 2, step 1): the checkpoint of that step is written, the older mid-epoch ones are gone
    p = _train([f"--out={run}", "--resume", "auto", *ARGS, "save_every_minutes=0.00001"], hook="step:7")
    assert p.returncode == PREEMPTED_EXIT_CODE, p.stderr[-3000:]
    assert "stopped by SIGTERM in epoch 2 after step 1" in p.stderr
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0001_step_000001"]
    assert json.loads((run / "state.json").read_text())["checkpoint"] == "checkpoints/epoch_0001_step_000001"
    assert not (run / "captions" / "initial_parts").exists()  # round 0 complete: its chunks are dropped
    # 3. resume to the end
    p = _train([f"--out={run}", "--resume", "auto", *ARGS])
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]

    assert _losses(run) == _losses(ref) and len(_losses(ref)) == 14  # 12 step records, 2 epoch records
    w_ref = load_file(str(ref / "checkpoints" / "epoch_0002" / "model.safetensors"))
    w_run = load_file(str(run / "checkpoints" / "epoch_0002" / "model.safetensors"))
    assert w_ref.keys() == w_run.keys() and all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    for name in ["initial.jsonl", *(f"round_{r:02d}.jsonl" for r in range(3))]:
        assert (run / "captions" / name).read_text() == (ref / "captions" / name).read_text(), name


@pytest.mark.slow
def test_torchrun_two_ranks_stop_and_resume_identically(tmp_path):
    """torchrun x2 (gloo), accumulating: both ranks stop together in round 0 and mid-epoch (each rank exits 75,
    the agent 1), and the resumed run ends where the uninterrupted one does, bit for bit."""
    from safetensors.torch import load_file

    args = [a for a in ARGS if not a.startswith("batch_size")] + ["batch_size=4", "eval_batch_size=2"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rest_fast", "train"]

    def run(out: Path, extra: list[str], hook: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
        env.pop("REST_FAST_TEST_SIGNAL", None)
        if hook:
            env["REST_FAST_TEST_SIGNAL"] = hook
        return subprocess.run([sys.executable, *torchrun, f"--out={out}", *extra, *args], env=env,
                              capture_output=True, text=True, timeout=600)

    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run(ref, []).returncode == 0
    p = run(out, [], hook="round0:2")
    assert p.returncode != 0 and p.stderr.count("stopped by SIGTERM during round 0") == 1, p.stderr[-3000:]
    assert "exitcode: 75" in p.stderr
    p = run(out, ["--resume", "auto", "save_every_minutes=0.00001"], hook="step:4")
    assert p.stderr.count("stopped by SIGTERM in epoch 2 after step 1") == 1, p.stderr[-3000:]
    p = run(out, ["--resume", "auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(out) == _losses(ref)
    w_ref = load_file(str(ref / "checkpoints" / "epoch_0002" / "model.safetensors"))
    w_run = load_file(str(out / "checkpoints" / "epoch_0002" / "model.safetensors"))
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    for name in ["initial.jsonl", *(f"round_{r:02d}.jsonl" for r in range(3))]:
        assert (out / "captions" / name).read_text() == (ref / "captions" / name).read_text(), name


def test_second_signal_exits_at_once():
    with StopSignals() as sig:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert sig.received == signal.SIGUSR1 and sig.signame == "SIGUSR1"
        with pytest.raises(ImmediateExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not sig._handle  # handlers restored


def test_control_saves_on_the_timer_and_stops_on_a_signal(monkeypatch):
    import rest_fast.train.preempt as preempt

    env = DistEnv(0, 1, 0, torch.device("cpu"))
    sig = StopSignals()
    now = [100.0]
    monkeypatch.setattr(preempt.time, "monotonic", lambda: now[0])
    ctl = Control(env, sig, save_every_minutes=2)
    assert ctl.decide() == (False, False)
    now[0] += 119
    assert ctl.decide() == (False, False)
    now[0] += 1
    assert ctl.decide() == (True, False) and ctl.decide(timed=False) == (False, False)
    ctl.saved()
    assert ctl.decide() == (False, False)
    sig.received = signal.SIGTERM
    assert ctl.decide() == (True, True)
    assert Control(env, StopSignals(), save_every_minutes=0).decide() == (False, False)  # 0 = epoch ends only


def test_test_hook_signals_only_at_its_point(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, s: sent.append(s))
    monkeypatch.setenv("REST_FAST_TEST_SIGNAL", "step:3:SIGUSR1")
    for k in range(1, 6):
        maybe_signal_self("step", k)
        maybe_signal_self("round0", k)
    assert sent == [signal.SIGUSR1]
    monkeypatch.setenv("REST_FAST_TEST_SIGNAL", "round0:2:SIGTERM:2")
    for k in range(1, 4):
        maybe_signal_self("round0", k)
    assert sent == [signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM]


def test_mid_epoch_checkpoint_names_sort_between_epochs(tmp_path):
    names = ["epoch_0002", mid_epoch_name(2, 5), mid_epoch_name(2, 17), "epoch_0003", mid_epoch_name(3, 1)]
    assert sorted(names) == names and [is_mid_epoch(n) for n in names] == [False, True, True, False, True]
    for n in names:
        (tmp_path / n).mkdir()
    drop_mid_epoch_checkpoints([tmp_path / n for n in names], keep=tmp_path / mid_epoch_name(3, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0002", "epoch_0003", mid_epoch_name(3, 1)]


def test_truncate_keeps_the_steps_up_to_a_mid_epoch_checkpoint(tmp_path):
    from rest_fast.run.rundir import RunDir
    from rest_fast.train.loop import _truncate_run

    run = RunDir(tmp_path)
    recs = [{"kind": "step", "epoch": 1, "step": 3}, {"kind": "epoch", "epoch": 1, "step": 3},
            *({"kind": "step", "epoch": 2, "step": s} for s in (4, 5, 6))]
    for r in recs:
        run.append_metric(r)
    _truncate_run(run, 1, 0, mid_epoch_step=5)
    assert [(r["kind"], r["step"]) for r in run.read_metrics()] == [("step", 3), ("epoch", 3), ("step", 4), ("step", 5)]
    _truncate_run(run, 1, 0)
    assert [(r["kind"], r["step"]) for r in run.read_metrics()] == [("step", 3), ("epoch", 3)]


def test_sampler_starts_mid_epoch_in_the_same_order():
    from rest_fast.data.loader import _EpochSampler

    for world, rank in ((1, 0), (2, 1)):
        s = _EpochSampler(11, shuffle=True, seed=4, rank=rank, world_size=world)
        s.epoch = 3
        full = list(s)
        s.start = 4
        assert list(s) == full[4:] and len(s) == len(full) - 4


def test_round0_chunks_continue_from_the_block_start(tmp_path):
    import numpy as np

    from rest_fast.train.round0_chunks import CaptionChunks, FeatureChunks, done_prefix, prepare_parts

    env = DistEnv(0, 1, 0, torch.device("cpu"))
    folder = tmp_path / "parts"
    prepare_parts(folder, "k1", env)
    caps, feats = CaptionChunks(folder), FeatureChunks(folder)
    caps.write(0, [["a"], ["b"]])
    caps.write(2, [["c"]])
    caps.write(5, [["x"]])  # not continuing the prefix: ignored
    assert done_prefix(caps, 0, 6) == [["a"], ["b"], ["c"]]
    assert done_prefix(caps, 0, 2) == [["a"], ["b"]]
    assert done_prefix(caps, 3, 6) == []
    rows = [np.arange(3, dtype=np.float32) + k for k in range(4)]
    feats.write(0, rows[:3])
    feats.write(3, rows[3:])
    got = done_prefix(feats, 0, 4)
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, rows))
    assert len(done_prefix(caps, 0, 6)) == 3  # each store reads its own files
    prepare_parts(folder, "k1", env)  # same key: kept
    assert len(done_prefix(caps, 0, 6)) == 3
    prepare_parts(folder, "k2", env)  # other videos or captioner: dropped
    assert done_prefix(caps, 0, 6) == [] and done_prefix(feats, 0, 4) == []


def test_mid_epoch_resume_needs_the_same_world_size():
    from rest_fast.errors import UserError
    from rest_fast.run.precision import StepScaler
    from rest_fast.train.training_state import TrainingStateMixin

    t = TrainingStateMixin()
    t.env, t.scaler = DistEnv(0, 1, 0, torch.device("cpu")), StepScaler("fp32", "cpu")
    counters = {"window": [1.5, 1.0], "total": [4.0, 2.0]}
    with pytest.raises(UserError, match="written by 2 process"):
        t._load_step_state({"step_in_epoch": 3, "counters": {0: counters, 1: counters}, "rng": {}})
    t._load_step_state({"step_in_epoch": 3, "counters": {0: counters}, "rng": {}})
    assert t._take_mid_epoch_resume() == (3, {**counters, "rng": None})
    assert t._take_mid_epoch_resume() == (0, None)  # once
    t._load_step_state({"step": 6})  # an epoch checkpoint: the next epoch starts at its beginning
    assert t._take_mid_epoch_resume() == (0, None)
