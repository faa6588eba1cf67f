"""distributed_topk over gloo with 2 CPU processes: both strategies vs the single-process reference."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from gloo_spawn import spawn_gloo

from rest_fast.ops.topk import topk_mismatch, topk_similarity_ref
from rest_fast.retrieval import distributed_topk
from rest_fast.retrieval.distributed import choose_strategy


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=g) @ torch.randn(5, 24, generator=g) + 0.05 * torch.randn(90, 24, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    x[40] = x[7]  # an exact tie across the two key shards
    return x


def _worker(rank: int, world: int, port: int) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # the per-rank search is the reference here; kernels are tested apart
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = _data()
        kcut, qcut = 33, 58  # uneven shards
        keys = x[:kcut] if rank == 0 else x[kcut:]
        qrows = slice(0, qcut) if rank == 0 else slice(qcut, 90)
        q, ex = x[qrows], torch.arange(90)[qrows].clone()
        ex[::4] = -1
        for k in (1, 20, 40, 89):  # 40 and 89 exceed rank 0's shard (33 keys): small-shard path
            rs, ri = topk_similarity_ref(q, x, k, exclude=ex)
            for strategy in ("gather_keys", "shard_keys", "ring", "auto"):
                s, i = distributed_topk(q, keys, k, exclude=ex, strategy=strategy, query_chunk=16)
                msg = topk_mismatch(q, x, s, i, rs, ri, exclude=ex)
                assert msg is None, f"rank {rank} k={k} {strategy}: {msg}"
        # No exclude, fp16.
        s, i = distributed_topk(q.half(), keys.half(), 90, strategy="shard_keys")
        rs, ri = topk_similarity_ref(q.half(), x.half(), 90)
        assert topk_mismatch(q.half(), x.half(), s, i, rs, ri) is None
        # Errors are raised on every rank (no rank left waiting in a collective).
        with pytest.raises(ValueError, match="exceeds"):
            distributed_topk(q, keys, 90, exclude=ex)
        bad_q = q.clone()
        if rank == 1:
            bad_q[0, 0] = float("nan")
        with pytest.raises(ValueError):
            distributed_topk(bad_q, keys, 3)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_topk_gloo_two_processes():
    spawn_gloo(_worker, 2, lambda port, _attempt: (2, port))  # retried once if a worker dies of a signal


def test_single_process_falls_back():
    x = _data()
    s, i = distributed_topk(x[:10], x, 5, exclude=torch.arange(10))
    rs, ri = topk_similarity_ref(x[:10], x, 5, exclude=torch.arange(10))
    assert topk_mismatch(x[:10], x, s, i, rs, ri, exclude=torch.arange(10)) is None


def test_choose_strategy():
    assert choose_strategy(240_000, 512, 2, 1 << 30) == "gather_keys"
    assert choose_strategy(240_000, 512, 2, 100 << 20) == "ring"


def _ring_check(rank: int, world: int, group, x: torch.Tensor) -> None:
    """Uneven key and query shards, a rank with no keys and no queries (world 3), chunks of 4 keys."""
    cuts = {1: [0, 90], 2: [0, 37, 90], 3: [0, 50, 50, 90]}[world]
    lo, hi = cuts[rank], cuts[rank + 1]
    q, keys = x[lo:hi], x[lo:hi]
    ex = torch.arange(lo, hi)
    ex[::3] = -1
    d = x.shape[1]
    for k in (1, 7, 30):
        budget = 2 * (hi - lo) * k * 8 * 3 + 4 * 2 * d * 4 * 2  # 4 key rows per chunk on the fullest rank
        s, i = distributed_topk(q, keys, k, exclude=ex, strategy="ring", memory_budget=budget, group=group)
        assert s.shape == i.shape == (hi - lo, k)
        if hi > lo:
            rs, ri = topk_similarity_ref(q, x, k, exclude=ex)
            assert topk_mismatch(q, x, s, i, rs, ri, exclude=ex) is None, (rank, world, k)
            _assert_ties_to_lower_index(s, i, (rank, world, k))


def _assert_ties_to_lower_index(scores: torch.Tensor, ids: torch.Tensor, where) -> None:
    """Equal scores come in ascending id order. (The tie is judged on the scores the path computed: a CPU GEMM may
    round the dot products of two identical keys 1 ulp apart depending on the block shape, e.g. MKL on AMD Zen 4,
    and then the higher one rightly comes first; topk_mismatch accepts either order within its tolerance.)"""
    same = scores[:, 1:] == scores[:, :-1]
    assert not bool((same & (ids[:, 1:] < ids[:, :-1])).any()), where


def _graph_check(rank: int, root: str, x: torch.Tensor) -> None:
    """The trainer's neighbour graph at 3 ranks: each rank saves and memory-maps only its own rows."""
    import numpy as np

    from rest_fast.retrieval import NeighbourGraph
    from rest_fast.train.distributed import DistEnv
    from rest_fast.train.neighbours import neighbour_graph, rank_graph_dir, read_rank_graphs

    env = DistEnv(rank=rank, world_size=3, local_rank=rank, device=torch.device("cpu"))
    rows = neighbour_graph(x, 9, env, cache_dir=root)
    lo, hi = int(env.shard(90)[0]), int(env.shard(90)[-1]) + 1
    ref = NeighbourGraph.build(x, 9)
    part = NeighbourGraph.load(rank_graph_dir(f"{root}/neighbours", rank, 3))
    assert part.n == hi - lo  # only this rank's rows on disk
    np.testing.assert_array_equal(rows, part.indices.numpy())
    # the one-process graph, up to the order of scores equal within float32 rounding (x[40] == x[7]: see
    # _assert_ties_to_lower_index)
    own = torch.arange(lo, hi)
    assert topk_mismatch(x[lo:hi], x, part.scores, part.indices, ref.scores[lo:hi], ref.indices[lo:hi],
                         exclude=own) is None
    _assert_ties_to_lower_index(part.scores, part.indices, rank)
    meta = rank_graph_dir(f"{root}/neighbours", rank, 3) / "meta.json"
    before = meta.stat().st_mtime_ns
    again = neighbour_graph(x, 9, env, cache_dir=root)  # resumed: loaded (memory-mapped), not rebuilt
    assert meta.stat().st_mtime_ns == before
    np.testing.assert_array_equal(again, rows)
    dist.barrier()
    if rank == 0:
        joined = read_rank_graphs(f"{root}/neighbours", 3)
        assert topk_mismatch(x, x, joined.scores, joined.indices, ref.scores, ref.indices,
                             exclude=torch.arange(90)) is None


def _ring_worker(rank: int, port: int, root: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        x = _data()
        # world sizes 1 and 2 as sub-groups of the 3 processes ({0, 2}: group ranks differ from global ranks)
        for world, group in {1: dist.new_group([0]), 2: dist.new_group([0, 2]), 3: None}.items():
            r = dist.get_rank(group)
            if r >= 0:
                _ring_check(r, world, group, x)
            dist.barrier()
        _graph_check(rank, root, x)
    finally:
        dist.destroy_process_group()


def test_ring_topk_world_sizes_1_2_3(tmp_path):
    spawn_gloo(_ring_worker, 3, lambda port, _attempt: (port, str(tmp_path)))
