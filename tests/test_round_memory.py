"""Bounded memory of the caption rounds: distinct round-0 candidates, per-rank neighbour rows, fp16 caption features
grown ≤ 1.25× and written to disk by new rows only, rank-0 CLIP-TAM from the stored features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rest_fast.cache import CaptionCache
from rest_fast.train.distributed import DistEnv
from rest_fast.train.features import GROWTH, CaptionFeatures
from rest_fast.train.retrieval_update import (
    distinct_rows,
    initial_candidates,
    retrieval_update,
    valid_per_row,
)

ENV1 = DistEnv(0, 1, 0, torch.device("cpu"))


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_distinct_rows_matches_numpy_unique():
    rng = np.random.default_rng(0)
    for n, L, hi in [(1, 1, 3), (5, 7, 4), (17, 40, 9), (3, 0, 2), (8, 33, 1000)]:
        ids = rng.integers(-1, hi, size=(n, L)).astype(np.int32)
        out = distinct_rows(ids)
        assert out.dtype == np.int32
        width = max([len(np.unique(r[r >= 0])) for r in ids] + [0])
        assert out.shape == (n, width)
        for r, o in zip(ids, out):
            u = np.unique(r[r >= 0])
            assert o[: len(u)].tolist() == u.tolist() and (o[len(u):] == -1).all()
    strided = rng.integers(-1, 5, size=(6, 20)).astype(np.int32)[:, ::2]  # non-contiguous input
    assert distinct_rows(strided).shape[0] == 6


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1000])
def test_distinct_rows_in_chunks_equals_one_pass(chunk_rows):
    """Row chunks (bounded temporaries at N = 100M) give the one-pass result, whatever chunk holds the widest row,
    on int64 and strided input; valid_per_row counts the ids ≥ 0 before de-duplication."""
    rng = np.random.default_rng(chunk_rows)
    ids = rng.integers(-1, 6, size=(23, 9))
    ids[17, :] = [0, 1, 2, 3, 4, 5, 3, 5, 0]  # the widest row (6 distinct, narrower than L) sits in a late chunk
    one = distinct_rows(ids, chunk_rows=1 << 20)
    assert np.array_equal(distinct_rows(ids, chunk_rows=chunk_rows), one)
    assert one.shape == (23, 6) and one.dtype == np.int32 and one.flags.c_contiguous
    strided = ids[::2, ::2]
    assert np.array_equal(distinct_rows(strided, chunk_rows=chunk_rows), distinct_rows(strided.copy(), chunk_rows=99))
    assert valid_per_row(ids, chunk_rows=chunk_rows).tolist() == [int((r >= 0).sum()) for r in ids]
    assert distinct_rows(np.zeros((0, 4), np.int32), chunk_rows=chunk_rows).shape == (0, 0)
    with pytest.raises(ValueError, match="2-D"):
        distinct_rows(np.arange(3))


def _problem(n=40, d=16, m=6, h=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).half()
    pool = 25  # few distinct captions: lots of duplicates, as frame captions of one clip are
    caps = torch.nn.functional.normalize(torch.randn(pool, d, generator=g), dim=1).half()
    rng = np.random.default_rng(seed)
    initial = rng.integers(0, pool, size=(n, m)).astype(np.int32)
    initial[rng.random((n, m)) < 0.1] = -1
    nb = np.stack([rng.choice(np.delete(np.arange(n), i), h, replace=False) for i in range(n)]).astype(np.int32)
    return video, caps, initial, nb


def _brute_force(video, caps, initial, nb, k):
    """Top-k distinct of the initial captions of self and neighbours, float64 scores, ties by lower id."""
    out = []
    for i in range(video.shape[0]):
        pool = {int(c) for v in [i, *nb[i].tolist()] for c in initial[v] if c >= 0}
        s = {c: float(caps[c].double() @ video[i].double()) for c in pool}
        best = sorted(pool, key=lambda c: (-s[c], c))[:k]
        out.append(best + [-1] * (k - len(best)))
    return out


def test_round_zero_scores_only_distinct_ids_and_is_exact():
    video, caps, initial, nb = _problem()
    cache = CaptionCache(video.shape[0], 3)
    cache.intern([f"c{i}" for i in range(caps.shape[0])])
    stats = retrieval_update(cache, video, caps, nb, 3, ENV1, initial_ids=initial, block=7)
    ids, _ = cache.get(np.arange(video.shape[0]))
    assert ids.tolist() == _brute_force(video, caps, initial, nb, 3)
    full = initial_candidates(initial, nb, np.arange(video.shape[0]))
    assert stats["candidates_considered"] == int((full >= 0).sum())
    # duplicates are not re-scored: a row holds at most the 25 distinct captions (36 ids before de-duplication)
    assert stats["candidates_scored"] <= video.shape[0] * caps.shape[0] < full.size


class _SpyCache:
    """A caption cache whose ``set`` records the rows instead of writing them (one rank's view, no gather)."""

    def __init__(self, cache):
        self.cache, self.ids = cache, None

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def __len__(self):
        return len(self.cache)

    def set(self, videos, ids, scores):
        self.ids = ids


def test_retrieval_update_takes_only_this_ranks_neighbour_rows(monkeypatch):
    """Each rank passes only its block of the graph: the same rows come out as with the whole graph."""
    video, caps, initial, nb = _problem(n=30, seed=1)
    monkeypatch.setattr("rest_fast.train.retrieval_update.gather_rows", lambda env, t: t)  # one rank's rows only
    results = {}
    for label in ("whole", "local"):
        got = []
        for rank in range(3):
            env = DistEnv(rank, 3, rank, torch.device("cpu"))
            cache = CaptionCache(30, 2)
            cache.intern([f"c{i}" for i in range(caps.shape[0])])
            spy = _SpyCache(cache)
            rows = nb if label == "whole" else nb[env.shard(30)]
            retrieval_update(spy, video, caps, rows, 2, env, initial_ids=initial)
            got.append(spy.ids)
        results[label] = np.concatenate(got)
    assert np.array_equal(results["whole"], results["local"])
    assert results["whole"].tolist() == _brute_force(video, caps, initial, nb, 2)
    with pytest.raises(ValueError, match="neighbours has"):
        retrieval_update(CaptionCache(30, 2), video, caps, nb[:4], 2, ENV1)


def test_feature_table_validated_once_with_a_clear_error():
    video, caps, initial, nb = _problem()
    bad = caps.clone()
    bad[3, 0] = float("nan")
    cache = CaptionCache(video.shape[0], 2)
    cache.intern([f"c{i}" for i in range(caps.shape[0])])
    with pytest.raises(ValueError, match=r"caption_feats contains NaN or inf \(rows 0\.\.24\)"):
        retrieval_update(cache, video, bad, nb, 2, ENV1, initial_ids=initial)


class _Encoder:
    dim = 8

    def encode_text(self, texts):
        g = torch.Generator().manual_seed(len(texts))
        return torch.nn.functional.normalize(torch.randn(len(texts), self.dim, generator=g), dim=1)


def test_caption_features_grow_by_at_most_a_quarter_and_save_new_rows(tmp_path):
    cache = CaptionCache(4, 2)
    feats = CaptionFeatures(8, torch.device("cpu"))
    enc = _Encoder()
    files = []
    sizes = [1500, 200, 900, 3000]
    total = 0
    for r, extra in enumerate(sizes):
        cache.intern([f"r{r} caption {i}" for i in range(extra)])
        total += extra
        cap_before = feats.capacity
        feats.update(cache, enc, ENV1, batch_size=256)
        assert len(feats) == total and feats.feats.dtype == torch.float16
        if feats.capacity != cap_before:  # grown: to what is needed, or 1.25x, whichever is larger
            assert feats.capacity <= max(total, int(GROWTH * cap_before), 1024)
        path = tmp_path / f"rows_{r}.npy"
        lo, hi = feats.save_new(path)
        assert (lo, hi) == (total - extra, total)
        assert np.load(path).shape == (extra, 8)
        files.append(path)
    feats.reserve(total + 100)  # the trainer reserves ahead: no growth for up to that many rows
    assert feats.capacity == total + 100
    back = CaptionFeatures(8, torch.device("cpu"))
    back.load_rows(files, chunk=700)
    assert torch.equal(back.valid, feats.valid) and back.saved == total
    back.load_rows(files, max_rows=1600)
    assert len(back) == 1600 and torch.equal(back.valid, feats.valid[:1600])


@pytest.mark.parametrize("world", [1, 3])
def test_planned_caption_table_is_allocated_once_and_reused_on_load(tmp_path, world):
    """plan_capacity (the trainer, at round 0 and on resume): one allocation at the run's final size; the rounds'
    updates and a resume's loads write into it and never grow (copy) it; the rows equal an unplanned table's."""
    sizes = [700, 150, 150, 150]  # round 0's captions, then at most N = 150 new ones per round
    for rank in range(world):
        cache = CaptionCache(4, 2)
        plain = CaptionFeatures(8, torch.device("cpu"), rank=rank, world_size=world)
        planned = CaptionFeatures(8, torch.device("cpu"), rank=rank, world_size=world)
        enc = _PerTextEncoder()
        files, buffer = [], None
        for r, extra in enumerate(sizes):
            if r > 0:
                planned.reserve(len(cache) + 150)  # the trainer's reserve before a round's captions: a no-op now
            cache.intern([f"r{r} caption {i}" for i in range(extra)])
            if r == 0:
                planned.plan_capacity(len(cache) + 3 * 150)
                buffer = planned.feats.data_ptr()
                assert planned.capacity == planned.local_rows(sum(sizes))
            planned.update(cache, enc, ENV1, batch_size=64)
            plain.update(cache, enc, ENV1, batch_size=64)
            assert planned.feats.data_ptr() == buffer, f"round {r} re-allocated the planned table"
            assert torch.equal(planned.valid, plain.valid)
            files.append(tmp_path / f"w{world}_r{rank}_{r}.npy")
            planned.save_new(files[-1])
        back = CaptionFeatures(8, torch.device("cpu"), rank=rank, world_size=world)
        back.plan_capacity(sum(sizes[:2]) + 2 * 150)  # a resume after round 1 of the same run
        buffer = back.feats.data_ptr()
        back.load_rows(files[:2], max_rows=sum(sizes[:2]))
        assert back.feats.data_ptr() == buffer and back.capacity == back.local_rows(sum(sizes))
        assert torch.equal(back.valid, plain.valid[: back.local_rows(sum(sizes[:2]))])


class _PerTextEncoder:
    """Features that depend on the text alone (not on the batch), so shards can be compared with one process."""

    dim = 8

    def encode_text(self, texts):
        import zlib

        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def test_sharded_caption_features_hold_their_ids_and_reshard_exactly(tmp_path):
    """Issue 20 items 2 and 6: rank r of P holds only ids c with c mod P == r (row c // P); the per-rank round files
    of one world size re-shard into another's rows byte for byte."""
    cache = CaptionCache(4, 2)
    enc = _PerTextEncoder()
    full = CaptionFeatures(8, torch.device("cpu"))
    shards = [CaptionFeatures(8, torch.device("cpu"), rank=r, world_size=2) for r in range(2)]

    def name(t, r, w):
        return tmp_path / f"rows_{t}.rank{r}_of{w}.npy"

    sizes = [50, 7, 33]
    for t, extra in enumerate(sizes):
        cache.intern([f"round {t} caption {i}" for i in range(extra)])
        full.update(cache, enc, ENV1, batch_size=16)
        for r, sh in enumerate(shards):
            assert sh.update(cache, enc, ENV1, batch_size=16) == extra  # ids added (all ranks')
            sh.save_new(name(t, r, 2))
    total = len(cache)
    for r, sh in enumerate(shards):
        assert len(sh) == total and sh.valid.shape[0] == len(range(r, total, 2))
        assert torch.equal(sh.valid, full.valid[r::2])
    for w in (1, 3):
        for r in range(w):
            back = CaptionFeatures(8, torch.device("cpu"), rank=r, world_size=w)
            counts = back.load_resharded([[name(t, r0, 2) for r0 in range(2)] for t in range(3)], 2, total, chunk=5)
            assert counts == np.cumsum(sizes).tolist() and len(back) == total
            assert torch.equal(back.valid, full.valid[r::w])
            back.save_round_files(counts, lambda t, r=r, w=w: name(t, r, w))
            again = CaptionFeatures(8, torch.device("cpu"), rank=r, world_size=w)
            again.load_rows([name(t, r, w) for t in range(3)], max_rows=total)
            assert torch.equal(again.valid, full.valid[r::w]) and len(again) == total
    short = CaptionFeatures(8, torch.device("cpu"), rank=0, world_size=3)
    with pytest.raises(ValueError, match="hold"):
        short.load_resharded([[name(t, r0, 2) for r0 in range(2)] for t in range(2)], 2, total)
