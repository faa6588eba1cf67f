"""Exact re-rank over a caption table sharded by rank (rest_fast.retrieval.sharded_rerank) against the
single-process rerank_captions, with gloo on CPU at world sizes 1, 2 and 3: uneven video and caption shards, a rank
with no videos, videos whose candidates all live on other ranks, a tie across owners, repeats and empty slots,
several chunks per rank (small budget), a candidate function instead of a matrix; and the trainer's retrieval update
(round 0 with initial captions, then a round with pending captions) with caption features sharded over 3 ranks
against the same update in one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from gloo_spawn import spawn_gloo

from rest_fast.ops.rerank import rerank_captions_ref
from rest_fast.retrieval.sharded_rerank import ShardedIds, bytes_per_video, sharded_rerank

N, C, D, L = 41, 230, 24, 19


def _data(world: int):
    g = torch.Generator().manual_seed(world)
    table = torch.randn(C, D, generator=g)
    table = (table / table.norm(dim=1, keepdim=True)).half()
    table[7 + world] = table[100]  # equal features, different owners (world > 1): the lower id wins the tie
    videos = torch.randn(N, D, generator=g)
    videos = (videos / videos.norm(dim=1, keepdim=True)).half()
    videos[5] = table[100]
    cand = torch.randint(-1, C, (N, L), generator=g)
    cand[5, :2] = torch.tensor([7 + world, 100])
    cand[6] = -1  # no candidate at all: -inf / -1 padding
    cand[8, :3] = torch.tensor([3, 3, 3])
    cand[8, 3:] = -1  # one distinct candidate, k = 3
    return table, videos, cand


def _splits(world: int) -> list[tuple[int, int]]:
    if world == 1:
        return [(0, N)]
    if world == 2:
        return [(0, 17), (17, N)]
    return [(0, 23), (23, 23), (23, N)]  # rank 1 has no videos


def _check(rank: int, world: int, group) -> None:
    table, videos, cand = _data(world)
    lo, hi = _splits(world)[rank]
    mine = cand[lo:hi].clone()
    if world > 1 and hi > lo:  # the first video's candidates all live on other ranks
        mine[0] = torch.where(mine[0] % world == rank, -1, mine[0])
    shard = table[rank::world]  # local row j = global id j * world + rank
    budget = bytes_per_video(L, D, 2, world, 3) * 4  # 4 videos per chunk: several chunks per rank
    for k in (3, 1):
        s, i, stats = sharded_rerank(videos[lo:hi], mine, shard, k, budget_bytes=budget, group=group)
        rs, ri = rerank_captions_ref(videos[lo:hi], table, mine, k)
        assert torch.equal(i, ri.long()), (rank, world, k, i, ri)
        assert torch.equal(torch.isinf(s), torch.isinf(rs))
        fin = torch.isfinite(rs)
        assert torch.allclose(s[fin], rs[fin], atol=1e-5, rtol=0)
        assert stats["chunks"] == -(-max(b - a for a, b in _splits(world)) // 4)
        assert stats["peak_chunk_bytes"] <= budget
        assert (stats["bytes_sent"] > 0) == (world > 1)
        if world > 1 and hi > lo and k == 3:
            assert i[0].ge(0).any() and not bool((i[0][i[0] >= 0] % world == rank).any())
        if rank == 0 and k == 3 and world > 1:
            assert int(i[5, 0]) == min(7 + world, 100)  # the tie across owners goes to the lower id
    # the candidates as a function of the row range (built per chunk)
    s, i, _ = sharded_rerank(videos[lo:hi], lambda a, b: mine[a:b].numpy(), shard, 3, budget_bytes=budget,
                             group=group, width=L)
    rs, ri = rerank_captions_ref(videos[lo:hi], table, mine, 3)
    assert torch.equal(i, ri.long())


class _PerTextEncoder:
    """CLIP-text stand-in: a unit vector that depends on the text alone (not on the batch)."""

    dim = 16

    def encode_text(self, texts):
        import zlib

        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def _trainer_update(env, n: int = 23, m: int = 6, h: int = 4, k: int = 3):
    """Round 0 (initial captions) and round 1 (a pending caption per video) of the trainer's retrieval update with
    the caption features of ``env``'s rank only; returns the slots after each round and the stats."""
    import numpy as np

    from rest_fast.cache import CaptionCache
    from rest_fast.train.features import CaptionFeatures
    from rest_fast.train.retrieval_update import retrieval_update

    rng = np.random.default_rng(7)
    g = torch.Generator().manual_seed(7)
    video = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1).half()
    flat = [f"caption {j}" for j in rng.integers(0, 40, size=n * m)]  # captions repeat within and across videos
    nb = np.stack([rng.choice(np.delete(np.arange(n), i), h, replace=False) for i in range(n)]).astype(np.int32)
    rows = nb[env.shard(n)] if env.distributed else nb  # the trainer passes only this rank's rows
    enc = _PerTextEncoder()
    cache = CaptionCache(n, k)
    initial = np.asarray(cache.intern(flat), dtype=np.int32).reshape(n, m)
    feats = CaptionFeatures(16, torch.device("cpu"), rank=env.rank, world_size=env.world_size)
    out = []
    for r in range(2):
        if r == 1:
            cache.add_pending(np.arange(n), cache.intern([f"generated {i % 9}" for i in range(n)]))
        feats.update(cache, enc, env, batch_size=5)
        stats = retrieval_update(cache, video, feats.valid, rows, k, env, initial_ids=initial if r == 0 else None,
                                 budget_bytes=3000)
        out.append((*cache.get(np.arange(n)), stats))
    return out


def _check_trainer_update(rank: int) -> None:
    from rest_fast.train.distributed import DistEnv

    one = _trainer_update(DistEnv(0, 1, 0, torch.device("cpu")))
    three = _trainer_update(DistEnv(rank, 3, rank, torch.device("cpu")))
    for (ids1, s1, st1), (ids3, s3, st3) in zip(one, three):
        assert (ids1 == ids3).all(), (rank, ids1, ids3)
        fin = ids1 >= 0
        assert abs(s1[fin] - s3[fin]).max() <= 1e-5
        assert st1["distinct_captions"] == st3["distinct_captions"] and st3["rerank_bytes_sent"] > 0
        assert st3["rerank_chunks"] > 1  # the budget cut the rank's videos into several chunks


def _worker(rank: int, port: int) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        # world sizes 1 and 2 as sub-groups of the 3 processes (group ranks differ from global ranks for {0, 2})
        groups = {1: dist.new_group([0]), 2: dist.new_group([0, 2]), 3: None}
        for world, group in groups.items():
            r = dist.get_rank(group)
            if r >= 0:
                _check(r, world, group)
            dist.barrier()
        _check_trainer_update(rank)  # the trainer's round 0 and round 1 with sharded caption features, 3 ranks
    finally:
        dist.destroy_process_group()


def test_sharded_rerank_matches_single_process_at_world_sizes_1_2_3():
    spawn_gloo(_worker, 3, lambda port, _attempt: (port,))


def test_sharded_ids_round_trip():
    ids = ShardedIds(3)
    g = torch.arange(20)
    assert torch.equal(ids.to_global(ids.local(g), 0)[ids.owner(g) == 0], g[g % 3 == 0])
    assert torch.equal(ids.owner(torch.tensor([0, 1, 2, 3, 7])), torch.tensor([0, 1, 2, 0, 1]))
