"""Gradient accumulation (``accum_steps``): an optimiser step over micro-batches equals the whole-batch step.

fp32 on CPU with the tiny captioner: gradients at each optimiser step (a full one, and an epoch's short last one
whose micro-batches are uneven), the logged losses, and the weights after the epoch agree within 1e-6 relative;
captions of different lengths make every micro-batch pad differently. Under DDP the all-reduce runs once per
optimiser step (``no_sync`` on the other micro-batches).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from rest_fast.cache import CaptionCache
from rest_fast.errors import UserError
from rest_fast.models import GARModel
from rest_fast.models.tiny import tiny_blip
from rest_fast.train.accumulate import group_micro_batches, micro_batch_size
from rest_fast.train.distributed import DistEnv
from rest_fast.train.self_train import CaptionLoss, build_optimizer, build_scheduler, self_train_epoch

CAPTIONS = ["a dog runs", "a red square moving left across the whole frame", "someone is", "blue disc spinning",
            "a green triangle growing and shrinking slowly", "left", "a yellow shape changing colour"]


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: a parallel region costs more than it saves on a busy machine
    yield
    torch.set_num_threads(threads)


def _cache(n: int, k: int = 2) -> CaptionCache:
    cache = CaptionCache(n, k)
    ids = np.asarray(cache.intern(CAPTIONS), dtype=np.int32)
    rng = np.random.default_rng(0)
    rows = np.stack([rng.choice(ids, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    cache.set(np.arange(n), rows, np.zeros((n, k), np.float32))
    return cache


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of every parameter's gradient at each step."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@functools.lru_cache(maxsize=1)
def _tiny():
    return tiny_blip(seed=0)  # built once (seconds); every test deep-copies the model


def _fresh_blip():
    blip, tok = _tiny()
    return copy.deepcopy(blip), tok


def _train(accum: int, *, n: int = 11, batch: int = 8, T: int = 2, log_every: int = 1):
    blip, tok = _fresh_blip()
    torch.manual_seed(0)
    model = GARModel(blip, tok, num_frames=T, adapter_layers="all")
    loss_module = CaptionLoss(model, "a video of", label_smoothing=0.2)
    ref = build_optimizer(model, 1e-3, 1e-3, (0.9, 0.98))
    opt = _RecordingAdamW(ref.param_groups, lr=1e-3, betas=(0.9, 0.98))
    sched = build_scheduler(opt, 10, 0, 1e-3, 1e-5)
    clips = torch.randn(n, T, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    micro = micro_batch_size(batch, accum)
    batches = [(order[i:i + micro], clips[order[i:i + micro]]) for i in range(0, n, micro)]
    logs: list[dict] = []
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    stats = self_train_epoch(loss_module, opt, sched, batches, _cache(n), epoch=0, seed=3, env=env, amp="fp32",
                             grad_clip=1.0, log_every=log_every, on_log=logs.append, accum_steps=accum)
    return opt.seen, logs, stats


def _assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    """The whole gradient within 1e-6 relative; each parameter within 1e-6 relative or 1e-6 of the whole gradient's
    norm (the attention key biases have a zero gradient in exact arithmetic: theirs is fp32 noise ~1e-9 of the
    norm, which no relative test per tensor can compare)."""
    assert len(got) == len(want), what
    g_all, w_all = torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want])
    rel = float((g_all - w_all).norm() / w_all.norm())
    assert rel <= 1e-6, (what, rel)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * float(w_all.norm()), msg=f"{what}: param {i}")


def test_accumulated_step_equals_the_whole_batch_step():
    g1, logs1, stats1 = _train(1)
    g4, logs4, stats4 = _train(4)  # micro-batches of 2; the last step: 3 clips = micro-batches of 2 and 1
    assert len(g1) == len(g4) == 2 and stats1["steps"] == stats4["steps"] == 2  # the schedule counts optimiser steps
    for step, (a_step, b_step) in enumerate(zip(g1, g4)):
        _assert_grads_close(b_step, a_step, f"optimiser step {step}")
    assert [r["step_in_epoch"] for r in logs1] == [r["step_in_epoch"] for r in logs4] == [1, 2]
    for r1, r4 in zip(logs1, logs4):
        assert r4["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    assert stats4["loss"] == pytest.approx(stats1["loss"], rel=1e-6)


def test_micro_batches_must_split_the_rank_batch_evenly():
    assert micro_batch_size(8, 4) == 2 and micro_batch_size(8, 1) == 8
    with pytest.raises(UserError, match="accum_steps=3 does not divide"):
        micro_batch_size(8, 3, world_size=2)
    assert [len(g) for g in group_micro_batches(range(7), 3)] == [3, 3, 1]


@pytest.mark.parametrize("static_graph", [False, True])
def test_ddp_all_reduces_once_per_optimiser_step(tmp_path, static_graph):
    """One-process gloo DDP with the trainer's options (bucket views; no static graph when accumulating): the
    communication hook runs on the last micro-batch of each step only, and the gradients still equal the plain
    step's. A static-graph DDP (the trainer's choice without accumulation) syncs every micro-batch of its first
    step (PyTorch cannot record the graph under no_sync), then once per step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rest_fast.train.accumulate import accumulate_gradients
    from rest_fast.train.loop import ddp_options

    env = DistEnv(0, 1, 0, torch.device("cpu"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        blip, tok = _fresh_blip()
        torch.manual_seed(0)
        model = GARModel(blip, tok, num_frames=2, adapter_layers="all")
        options = ddp_options(env, accum_steps=2)
        assert options["static_graph"] is False and ddp_options(env)["static_graph"] is True
        ddp = DDP(CaptionLoss(model, "a video of", 0.2), **{**options, "static_graph": static_graph})
        calls = []

        def hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        clips = torch.randn(4, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        idx = torch.arange(4)
        caps = [CAPTIONS[i] for i in range(4)]
        for step in range(3):
            calls.clear()
            ddp.zero_grad(set_to_none=True)
            accumulate_gradients(ddp, [(idx[:2], clips[:2]), (idx[2:], clips[2:])], caps, device=env.device,
                                 autocast=lambda: torch.autocast("cpu", enabled=False))
            buckets = sorted(set(calls))
            # each bucket is all-reduced once: the first micro-batch ran under no_sync (a static graph is recorded on
            # the first step, which must sync every micro-batch: PyTorch asserts otherwise)
            assert buckets and sorted(calls) == sorted(buckets * (2 if static_graph and step == 0 else 1)), (step, calls)
        acc = [p.grad.clone() for p in ddp.parameters() if p.grad is not None]
        ddp.zero_grad(set_to_none=True)
        ddp(clips, caps).backward()
        whole = [p.grad.clone() for p in ddp.parameters() if p.grad is not None]
        _assert_grads_close(acc, whole, "DDP accumulated vs whole batch")
    finally:
        dist.destroy_process_group()
