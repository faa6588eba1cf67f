"""The caption cache sharded over ranks (rest_fast.cache.sharded) against the one-process CaptionCache, with gloo on
CPU at world sizes 1, 2 and 3: the same global ids for the same interning order (normalised duplicates across
ranks, repeats within a call, captions seen in an earlier call), texts fetched from their owners, slots, pending
captions, candidates, the seeded sample, no rank holding every string, and the round files: reloaded on the same
world size, re-sharded to another one, read from a one-process file, and assembled back into one process."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch.distributed as dist
from gloo_spawn import spawn_gloo

from rest_fast.cache import CaptionCache, PyCaptionCache
from rest_fast.cache.sharded import (
    ShardedCaptionCache,
    _ranks_of_set_bits,
    sample_slots,
    to_single_process,
    video_block,
)

N, K, M = 23, 3, 5
WORDS = ["a man", "A  man", "a dog runs", "someone is cooking", "a video of a cat", "people dance", "x", "",
         "a man blowing glass", "kids play football", "Kids play football ", "a woman sings", "é café", "rain"]


def _world():
    """Every rank builds the same inputs and the one-process reference."""
    g = np.random.default_rng(0)
    initial = [[f"{WORDS[g.integers(len(WORDS))]} {g.integers(12)}" if g.random() < 0.7 else WORDS[g.integers(len(WORDS))]
                for _ in range(M)] for _ in range(N)]
    generated = [WORDS[g.integers(len(WORDS))] if g.random() < 0.5 else f"new caption {g.integers(9)}"
                 for _ in range(N)]
    ref = CaptionCache(N, K)
    ids0 = np.asarray(ref.intern([c for caps in initial for c in caps]), dtype=np.int64)
    ids1 = np.asarray(ref.intern(generated), dtype=np.int64)
    C = len(ref)
    slots = np.full((N, K), -1, dtype=np.int64)
    scores = np.full((N, K), -np.inf, dtype=np.float32)
    for i in range(N):
        fill = g.integers(0, K + 1) if i % 5 else K
        slots[i, :fill] = g.choice(C, size=fill, replace=False)
        scores[i, :fill] = np.sort(g.random(fill))[::-1]
    ref.set(np.arange(N), slots.astype(np.int32), scores)
    ref.add_pending(np.arange(N), ids1.astype(np.int32))
    neighbours = g.integers(-1, N, size=(N, 4))
    return initial, generated, ids0, ids1, ref, slots, scores, neighbours


def _build(world_size: int):
    initial, generated, ids0, ids1, ref, slots, scores, _ = _world()
    sc = ShardedCaptionCache(N, K)
    lo, hi = sc.lo, sc.hi
    got0 = sc.intern([c for caps in initial[lo:hi] for c in caps], np.arange(lo * M, hi * M), N * M)
    np.testing.assert_array_equal(got0, ids0[lo * M: hi * M])
    got1 = sc.intern(generated[lo:hi], np.arange(lo, hi), N)
    np.testing.assert_array_equal(got1, ids1[lo:hi])
    assert len(sc) == len(ref)
    sc.add_pending_own(got1)
    sc.set_own(slots[lo:hi], scores[lo:hi])
    return sc


def _check(sc: ShardedCaptionCache, world_size: int, *, pending: bool = True) -> None:
    initial, generated, ids0, ids1, ref, slots, scores, neighbours = _world()
    lo, hi = sc.lo, sc.hi
    assert len(sc) == len(ref)
    mine = np.arange(sc.rank, len(ref), world_size)
    assert sc.texts(mine) == list(ref.texts(mine.astype(np.int32)))
    if world_size > 1:
        assert sc.own_captions() < len(ref)  # no rank holds every string
        with pytest.raises(IndexError):
            sc.texts([(sc.rank + 1) % world_size])
    ask = np.random.default_rng(sc.rank).integers(-1, len(ref), size=17)
    assert sc.texts_of(ask) == [ref.text(int(i)) if i >= 0 else None for i in ask]
    np.testing.assert_array_equal(sc.slot_ids, ref.get(np.arange(N))[0])
    own_ids, own_scores = sc.get(np.arange(lo, hi))
    np.testing.assert_array_equal(own_scores, ref.get(np.arange(lo, hi))[1])
    if pending:
        np.testing.assert_array_equal(sc.pending, ids1)
        vids = np.arange(lo, hi)
        got = sc.candidates(vids, neighbours[lo:hi])
        want = ref.candidates(vids, neighbours[lo:hi].astype(np.int32))
        for a, b in zip(got, want):
            assert set(a[a >= 0].tolist()) == set(b[b >= 0].tolist())
    for seed in (0, 7, 2**63 + 5):
        np.testing.assert_array_equal(sc.sample(np.arange(N), seed), ref.sample(np.arange(N), seed))
    batch = np.array([(sc.rank * 7 + j) % N for j in range(5)])
    batch = batch[ref.sample(batch, 3) >= 0]
    assert sc.sample_texts(batch, 3) == list(ref.texts(ref.sample(batch, 3).astype(np.int32)))
    assert sc.distinct_in_slots() == np.unique(slots[slots >= 0]).size


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker_build_and_save(rank: int, world: int, port: int, folder: str) -> None:
    _init(rank, world, port)
    try:
        sc = _build(world)
        _check(sc, world)
        sc.save(folder, 1)
        again = ShardedCaptionCache.load(folder, 1)
        _check(again, world)
    finally:
        dist.destroy_process_group()


def _worker_load(rank: int, world: int, port: int, sharded: str, single: str) -> None:
    _init(rank, world, port)
    try:
        _check(ShardedCaptionCache.load(sharded, 1), world)  # saved by another world size: re-sharded
        _check(ShardedCaptionCache.load(single, 1), world, pending=False)  # a one-process file (pending not kept)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, *args) -> None:
    spawn_gloo(fn, world, lambda port, _attempt: (world, port, *args))


def test_one_process_equals_the_caption_cache(tmp_path):
    """No process group: the sharded class holds everything and answers like CaptionCache."""
    sc = _build(1)
    _check(sc, 1)
    sc.save(tmp_path, 1)
    _check(ShardedCaptionCache.load(tmp_path, 1), 1)


@pytest.mark.parametrize("world,then", [(3, 2), (2, 3)])
def test_sharded_ids_texts_slots_and_reshard(tmp_path, world, then):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    sharded.mkdir()
    single.mkdir()
    _spawn(_worker_build_and_save, world, str(sharded))
    ref = _world()[4]
    ref.save(str(single / "round_01.rfcc"))
    _spawn(_worker_load, then, str(sharded), str(single))
    back = to_single_process(sharded, 1)  # and back into one process: the same cache
    assert len(back) == len(ref)
    assert list(back.texts(np.arange(len(ref), dtype=np.int32))) == list(ref.texts(np.arange(len(ref), dtype=np.int32)))
    for a, b in zip(back.get(np.arange(N)), ref.get(np.arange(N))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.candidates(np.arange(N), np.full((N, 1), -1, np.int32)),
                                  ref.candidates(np.arange(N), np.full((N, 1), -1, np.int32)))


def test_sample_slots_matches_the_python_cache():
    g = np.random.default_rng(1)
    py = PyCaptionCache(50, 4)
    py.intern([f"c{i}" for i in range(30)])
    slots = np.full((50, 4), -1, dtype=np.int64)
    for i in range(50):
        f = g.integers(0, 5)
        slots[i, g.choice(4, size=f, replace=False)] = g.choice(30, size=f, replace=False)  # holes anywhere
    py.set(np.arange(50), slots, np.where(slots >= 0, 0.5, -np.inf).astype(np.float32))
    for seed in (0, 1, 123456789, -3):
        np.testing.assert_array_equal(sample_slots(slots, np.arange(50), seed), py.sample(np.arange(50), seed))


def test_video_blocks_cover_every_video_once():
    for n in (0, 1, 7, 23):
        for p in (1, 2, 3, 5):
            got = np.concatenate([np.arange(*video_block(n, r, p)) for r in range(p)])
            np.testing.assert_array_equal(got, np.arange(n))


@pytest.mark.parametrize("space", [1, 7, 63, 64, 65, 1000, 4099])
def test_new_ids_follow_the_order_of_set_bits(space):
    """The dense order of new captions: the number of set bits before each position, per 64-bit word."""
    g = np.random.default_rng(space)
    pos = np.flatnonzero(g.random(space) < 0.3)
    bits = np.zeros(-(-space // 64) * 8, dtype=np.uint8)
    np.bitwise_or.at(bits, pos >> 3, np.left_shift(1, pos & 7).astype(np.uint8))
    ranks, total = _ranks_of_set_bits(bits, g.permutation(pos))
    assert total == pos.size
    np.testing.assert_array_equal(np.sort(ranks), np.arange(pos.size))
    np.testing.assert_array_equal(_ranks_of_set_bits(bits, pos)[0], np.arange(pos.size))


def _worker_rank_without_videos(rank: int, world: int, port: int, folder: str) -> None:
    """N = 2 videos on 3 ranks: rank 0 owns no video (blocks [0, 0), [0, 1), [1, 2)) but still owns captions (ids 0
    and 3) and answers for them."""
    _init(rank, world, port)
    try:
        texts = [["a", "b", "c"], ["c", "d", "e"]]
        ref = CaptionCache(2, 2)
        want = np.asarray(ref.intern([t for row in texts for t in row]), dtype=np.int64)
        sc = ShardedCaptionCache(2, 2)
        lo, hi = sc.lo, sc.hi
        got = sc.intern([t for row in texts[lo:hi] for t in row], np.arange(lo * 3, hi * 3), 6)
        np.testing.assert_array_equal(got, want[lo * 3: hi * 3])
        assert (hi > lo) == (rank > 0) and len(sc) == 5
        slots = np.array([[0, 1], [3, -1]])
        sc.set_own(slots[lo:hi], np.where(slots[lo:hi] >= 0, 0.5, -np.inf))
        np.testing.assert_array_equal(sc.slot_ids, slots)
        assert sc.texts_of([4, -1, 2]) == ["e", None, "c"]
        assert sc.sample_texts([1, 0], seed=3) == [["a", "b", "c", "d", "e"][int(i)] for i in
                                                    sample_slots(slots[[1, 0]], np.array([1, 0]), 3)]
        sc.save(folder, 0)
        back = ShardedCaptionCache.load(folder, 0)
        np.testing.assert_array_equal(back.slot_ids, slots)
        assert back.texts_of(np.arange(5)) == ["a", "b", "c", "d", "e"]
    finally:
        dist.destroy_process_group()


def test_a_rank_without_videos_still_serves_its_captions(tmp_path):
    _spawn(_worker_rank_without_videos, 3, str(tmp_path))
    back = to_single_process(tmp_path, 0)
    assert list(back.texts(np.arange(5, dtype=np.int32))) == ["a", "b", "c", "d", "e"]
