"""The bench harness's timing logic without a GPU: a fake timer stands in for CUDA events, so the repeat
count and the spread a long CUDA step gets are checked here (``do_bench(rep=100)`` took one repeat)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def harness(monkeypatch):
    # harness sets REST_FAST_STRICT=1 unless set: keep that out of the rest of the test session.
    monkeypatch.setenv("REST_FAST_STRICT", "0")
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("harness")


class FakeStep:
    """A step that 'takes' the given times in turn (ms), read by a fake timer; counts every call."""

    def __init__(self, times_ms):
        self.times, self.calls, self.timed = list(times_ms), 0, 0

    def __call__(self):
        self.calls += 1

    def timer(self, fn, n):
        out = []
        for _ in range(n):
            fn()
            out.append(self.times[self.timed % len(self.times)])
            self.timed += 1
        return out


def test_long_cuda_step_gets_at_least_five_timed_repeats_after_warmup(harness):
    step = FakeStep([150.0, 170.0, 140.0, 160.0, 155.0, 300.0])
    t = harness.time_fn(step, device="cuda", warmup=1, timer=step.timer)  # the CUDA path, its timer faked
    assert t.reps == 5 == step.timed and step.calls == 1 + 5
    assert (t.min_ms, t.median_ms, t.max_ms) == (140.0, 155.0, 170.0)
    assert t.p20_ms == 150.0 and t.p80_ms == 160.0
    assert harness.MIN_REPS >= 5


def test_short_steps_fill_min_time_and_respect_max_reps(harness):
    step = FakeStep([2.0])
    t = harness.time_fn(step, device="cuda", warmup=3, min_time_s=0.1, max_reps=500, timer=step.timer)
    assert t.reps == 50 and step.calls == 3 + 50  # 0.1 s / 2 ms
    t = harness.time_fn(step, device="cuda", warmup=0, min_time_s=10, max_reps=20, timer=step.timer)
    assert t.reps == 20
    # An explicit cap below MIN_REPS (a very slow CPU baseline) wins.
    assert harness.time_fn(step, warmup=0, max_reps=2, timer=step.timer).reps == 2


def test_repeats_for(harness):
    assert harness.repeats_for(500.0, min_time_s=0.5) == 5
    assert harness.repeats_for(0.01, min_time_s=0.5, max_reps=50) == 50
    assert harness.repeats_for(10.0, min_time_s=0.2, max_reps=50) == 20
    assert harness.repeats_for(10.0, min_time_s=0.0, max_reps=3) == 3


def test_cpu_timer_runs_real_steps(harness):
    calls = []
    t = harness.time_fn(lambda: calls.append(1), warmup=2, min_time_s=0.0)
    assert t.reps == 5 and len(calls) == 7
    assert 0 <= t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms <= t.max_ms


def test_fused_path_asserts_the_kernels_ran(harness, monkeypatch):
    from rest_fast.ops import rerank_captions

    v, c = torch.randn(3, 8), torch.randn(10, 8)
    cand = torch.randint(0, 10, (3, 6), dtype=torch.int32)
    with harness.fused_path("rerank_captions", "cpu", expect=True):  # interpreted kernels (conftest)
        rerank_captions(v, c, cand, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference serves: a row labelled fused must fail
    with pytest.raises(AssertionError, match="did not run"):
        with harness.fused_path("rerank_captions", "cpu", expect=True):
            rerank_captions(v, c, cand, 2)
    with harness.fused_path("rerank_captions", "cpu"):  # CPU rows expect nothing by default
        rerank_captions(v, c, cand, 2)


def test_bench_results_folder_from_the_environment(harness, monkeypatch, tmp_path):
    monkeypatch.setenv("REST_FAST_BENCH_RESULTS", str(tmp_path))
    try:
        assert importlib.reload(harness).RESULTS_DIR == tmp_path
    finally:
        monkeypatch.delenv("REST_FAST_BENCH_RESULTS")
        assert importlib.reload(harness).RESULTS_DIR == BENCH / "results"
