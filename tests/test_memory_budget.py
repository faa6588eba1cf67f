"""Memory budgets of the blocked ops count the caching allocator's reserved-but-free memory, keep a floor, and the
distributed top-k agrees on one budget across ranks (it picks the strategy and the chunking every rank follows)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rest_fast.ops import memory, topk
from rest_fast.ops.memory import DEFAULT_FLOOR, device_memory_budget, memory_budget
from rest_fast.retrieval import distributed

GiB, MiB = 1 << 30, 1 << 20


def test_budget_counts_reserved_free_memory():
    # mid-run: the driver has 1 GiB free, the allocator caches 6 GiB of which live tensors use 2 GiB
    assert memory_budget(1 * GiB, 6 * GiB, 2 * GiB) == (1 * GiB + 4 * GiB) // 4
    assert memory_budget(8 * GiB, 0, 0) == 2 * GiB  # fresh process: free memory only
    assert memory_budget(4 * GiB, 1 * GiB, 3 * GiB) == 1 * GiB  # never counts allocated > reserved as negative


def test_budget_floor_cap_and_fraction():
    assert memory_budget(0, 0, 0) == DEFAULT_FLOOR == 256 * MiB  # a full device still gets workable chunks
    assert memory_budget(100 * MiB, 0, 0, floor=1) == 25 * MiB
    assert memory_budget(80 * GiB, 0, 0, cap=8 * GiB) == 8 * GiB
    assert memory_budget(8 * GiB, 0, 0, fraction=0.5) == 4 * GiB
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            memory_budget(GiB, 0, 0, fraction=bad)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A GPU with 1 GiB free at the driver and 12 GiB reserved, 4 GiB allocated (no GPU here: stand-ins)."""
    asked = []

    def info(name, value):
        def f(device=None):
            asked.append((name, torch.device(device)))
            return value
        return f

    monkeypatch.setattr(torch.cuda, "mem_get_info", info("mem_get_info", (1 * GiB, 80 * GiB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", info("memory_reserved", 12 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", info("memory_allocated", 4 * GiB))
    return asked


def test_device_budget_reads_the_given_device(fake_cuda):
    dev = torch.device("cuda", 1)
    assert device_memory_budget(dev, cpu=123) == 9 * GiB // 4
    assert {d for _, d in fake_cuda} == {dev} and len(fake_cuda) == 3
    assert device_memory_budget(torch.device("cpu"), cpu=123) == 123


def test_op_budgets_use_it(fake_cuda):
    dev = torch.device("cuda", 0)
    # mem_get_info alone would give 256 MiB (topk's floor) and 256 MiB (a quarter of 1 GiB)
    assert topk._memory_budget(dev) == 9 * GiB // 4
    assert distributed._default_budget(dev) == 9 * GiB // 4
    assert topk._memory_budget(torch.device("cpu")) == 256 * MiB
    assert distributed._default_budget(torch.device("cpu")) == 2 * GiB


def test_distributed_budget_has_a_floor(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * MiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert distributed._default_budget(torch.device("cuda", 0)) == memory.DEFAULT_FLOOR


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.nn.functional.normalize(torch.randn(70, 24, generator=g), dim=1)
        keys = x[:30] if rank == 0 else x[30:]
        q = x[:41] if rank == 0 else x[41:]
        # rank 0 could gather every key, rank 1 only chunks of a few queries: on its own each would pick a
        # different strategy and chunk, and their collectives would not pair up
        budget = 1 << 40 if rank == 0 else 4000
        s, i = distributed.distributed_topk(q, keys, 5, memory_budget=budget)
        rs, ri = topk.topk_similarity_ref(q, x, 5)
        assert topk.topk_mismatch(q, x, s, i, rs, ri) is None
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s on the shared 2-core machine
def test_ranks_agree_on_the_budget():
    mp.spawn(_worker, args=(_port(),), nprocs=2, join=True)
