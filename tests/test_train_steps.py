"""Algorithm 1 steps on small hand-checkable examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rest_fast.run.optim import cosine_lambda, derive_seed
from rest_fast.train.distributed import DistEnv, shard_range
from rest_fast.train.initial_captions import join_prompt
from rest_fast.train.retrieval_update import initial_candidates

ENV1 = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    # the trainer runs ops on their torch reference paths here (the interpreter is for kernel tests)
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_shard_range_covers_in_order():
    for n in (0, 1, 5, 7, 16):
        for w in (1, 2, 3):
            parts = [shard_range(n, r, w) for r in range(w)]
            assert np.array_equal(np.concatenate(parts), np.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(4, 2, 2)


def test_initial_candidates_self_and_neighbours():
    # 4 videos with 2 initial captions each; neighbours (self excluded), -1 = none
    init = np.array([[0, 1], [2, 3], [4, 5], [6, -1]], dtype=np.int32)
    nb = np.array([[1, 2], [0, -1], [3, 0], [2, 1]])
    out = initial_candidates(init, nb, np.array([0, 1, 3]))
    assert out.dtype == np.int32
    assert out.tolist() == [[0, 1, 2, 3, 4, 5], [2, 3, 0, 1, -1, -1], [6, -1, 4, 5, 2, 3]]


def test_join_prompt():
    assert join_prompt("a video of", " a dog running ", "a video of") == "a dog running"
    assert join_prompt("a person is", "dancing", "a video of") == "a person is dancing"


def test_cosine_schedule_end_points():
    f = cosine_lambda(100, 0, 2e-5, 2e-8)
    assert f(0) == pytest.approx(1.0)
    assert f(100) * 2e-5 == pytest.approx(2e-8)
    assert f(50) * 2e-5 == pytest.approx((2e-5 + 2e-8) / 2)
    g = cosine_lambda(100, 10, 1.0, 0.0)
    assert g(0) == pytest.approx(0.1) and g(9) == pytest.approx(1.0) and g(10) == pytest.approx(1.0)


def test_derive_seed_stable_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, e, s) for e in range(5) for s in range(5)}) == 25
    assert 0 <= derive_seed(2**40, -1) < 2**31


def _unit(rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def test_retrieval_update_keeps_exactly_the_right_distinct_captions():
    from rest_fast.cache import CaptionCache
    from rest_fast.train.retrieval_update import retrieval_update

    video = _unit([[1, 0], [0, 1], [0.6, 0.8]])
    caps = _unit([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8], [-1, 0], [1, 1]])  # c0..c5
    cache = CaptionCache(3, 2)
    assert cache.intern([f"c{i}" for i in range(6)]).tolist() == list(range(6))
    cache.set([0, 1, 2], np.array([[4, 1], [2, 4], [3, -1]]), np.zeros((3, 2), np.float32))
    cache.add_pending([0, 1, 2], np.array([0, 1, 4]))
    neighbours = np.array([[2], [2], [0]], dtype=np.int32)  # self excluded
    stats = retrieval_update(cache, video, caps, neighbours, 2, ENV1)
    ids, scores = cache.get([0, 1, 2])
    # v0 sees {c4,c1} ∪ {c0} ∪ v2's {c3,c4}; v1 sees {c2,c4} ∪ {c1} ∪ {c3,c4}; v2 sees {c3} ∪ {c4} ∪ v0's {c4,c1,c0}.
    # c5 scores highest for v2 (0.99) but is in nobody's pool: it must not appear.
    assert ids.tolist() == [[0, 1], [2, 3], [3, 1]]
    np.testing.assert_allclose(scores, [[1.0, 0.8], [1.0, 0.8], [1.0, 0.96]], atol=1e-6)
    assert stats["distinct_captions"] == 4 and stats["videos_short_of_k"] == 0


def test_first_update_sees_all_initial_captions_of_self_and_neighbours():
    from rest_fast.cache import CaptionCache
    from rest_fast.train.retrieval_update import retrieval_update

    video = _unit([[1, 0], [0, 1], [1, 1]])
    caps = _unit([[1, 0.1], [0.9, 0.1], [0.1, 1], [0.2, 1], [1, 0.9], [-1, -1]])
    cache = CaptionCache(3, 2)
    cache.intern([f"c{i}" for i in range(6)])
    # 3 initial captions per video (more than K=2); repeats across videos are allowed
    initial = np.array([[5, 1, 1], [5, 3, 5], [5, 5, 4]], dtype=np.int32)
    neighbours = np.array([[1], [0], [0]], dtype=np.int32)
    retrieval_update(cache, video, caps, neighbours, 2, ENV1, initial_ids=initial)
    ids, _ = cache.get([0, 1, 2])
    # v0: {5,1,3} -> 1, 3 (c3 comes from the neighbour); v1: {5,3,1} -> 3, 1; v2: {5,4,1} -> 4, 1
    assert ids.tolist() == [[1, 3], [3, 1], [4, 1]]


def test_retrieval_update_pads_when_fewer_than_k():
    from rest_fast.cache import CaptionCache
    from rest_fast.train.retrieval_update import retrieval_update

    video = _unit([[1, 0], [0, 1]])
    caps = _unit([[1, 0]])
    cache = CaptionCache(2, 3)
    cache.intern(["only"])
    retrieval_update(cache, video, caps, np.array([[1], [0]]), 3, ENV1, initial_ids=np.array([[0], [-1]], np.int32))
    ids, scores = cache.get([0, 1])
    assert ids.tolist() == [[0, -1, -1], [0, -1, -1]]
    assert np.isinf(scores[:, 1:]).all()


class _CountingEncoder:
    """Wraps a text encoder and records what it was asked to embed."""

    def __init__(self, clip):
        self.clip, self.seen = clip, []

    def encode_text(self, texts):
        self.seen.extend(texts)
        return self.clip.encode_text(texts)


def test_caption_round_embeds_only_new_captions_and_snapshots():
    from rest_fast.cache import CaptionCache
    from rest_fast.clip import tiny_clip
    from rest_fast.train.features import CaptionFeatures
    from rest_fast.train.generate_round import caption_round

    enc = _CountingEncoder(tiny_clip(seed=0))
    n = 4
    video = torch.nn.functional.normalize(torch.randn(n, enc.clip.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    nb = np.array([[1], [0], [3], [2]], dtype=np.int32)
    cache = CaptionCache(n, 2)
    feats = CaptionFeatures(enc.clip.dim, torch.device("cpu"))
    initial = cache.intern(["a dog", "a cat", "a dog", "a bird", "a fish", "a cat", "a cow", "a dog"]).reshape(n, 2)
    caption_round(0, None, cache, feats, enc, video, nb, 2, ENV1, initial_ids=initial)
    assert sorted(enc.seen) == sorted(["a dog", "a cat", "a bird", "a fish", "a cow"])
    assert feats.valid.dtype == torch.float16  # docs/PRECISION: stored rounded to fp16 once
    torch.testing.assert_close(feats.valid, enc.clip.encode_text(cache.texts(np.arange(len(cache)))).half())
    enc.seen.clear()
    before, _ = cache.get(np.arange(n))
    stats = caption_round(1, ["a cat", "a horse", "A  Horse", "a dog"], cache, feats, enc, video, nb, 2, ENV1)
    assert enc.seen == ["a horse"]  # normalised duplicates and known captions are not embedded again
    assert stats["new_captions"] == 1 and len(feats) == len(cache) == 6
    assert [r for r, _ in cache.history(1)] == [0, 1]
    # brute force over W̃_0 ∪ Ω_0: slots of videos 0 and 1 and their pending captions ("a cat", "a horse")
    pool = {int(c) for c in before[[0, 1]].ravel() if c >= 0} | set(cache.intern(["a cat", "a horse"]).tolist())
    score = {c: float(feats.valid[c].double() @ video[0].double()) for c in pool}
    expected = sorted(pool, key=lambda c: (-score[c], c))[:2]
    ids, _ = cache.get([0])
    assert ids[0].tolist() == expected


def test_neighbour_graph_excludes_self_and_is_cached(tmp_path):
    from rest_fast.train.neighbours import neighbour_graph

    # unit vectors at angles 0, 10, 25, 60, 100 degrees: neighbours by angle difference (no ties)
    ang = np.deg2rad([0.0, 10.0, 25.0, 60.0, 100.0])
    feats = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1), dtype=torch.float32)
    g = neighbour_graph(feats, 2, ENV1, cache_dir=tmp_path)
    assert g.dtype == np.int32 and g.tolist() == [[1, 2], [0, 2], [1, 0], [2, 4], [3, 2]]
    meta = tmp_path / "neighbours" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    assert neighbour_graph(feats, 2, ENV1, cache_dir=tmp_path).tolist() == g.tolist()
    assert meta.stat().st_mtime_ns == stamp  # reused, not rebuilt
    g3 = neighbour_graph(feats.flip(0).contiguous(), 2, ENV1, cache_dir=tmp_path)  # other features: rebuilt
    assert g3.tolist() == [[1, 2], [2, 0], [3, 4], [4, 2], [3, 2]] and meta.stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="h must be"):
        neighbour_graph(feats, 5, ENV1, cache_dir=tmp_path)
