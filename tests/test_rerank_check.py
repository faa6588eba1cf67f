"""``rerank_captions(check=False)``: the per-call value scans are skipped, the result is unchanged, and the
trainer's retrieval update (which validates the caption table once per update) calls it that way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rest_fast.ops
from rest_fast.ops import rerank_captions, rerank_captions_ref
from rest_fast.ops.rerank import rerank_captions_triton
from rest_fast.train.distributed import DistEnv


def _inputs(N=7, C=50, L=29, d=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(N, d, generator=g)
    c = torch.randn(C, d, generator=g)
    cand = torch.randint(0, C - 1, (N, L), generator=g, dtype=torch.int32)  # id C-1 is never a candidate
    cand[torch.rand(N, L, generator=g) < 0.2] = -1
    return v, c, cand


@pytest.mark.parametrize("fn", [rerank_captions, rerank_captions_ref, rerank_captions_triton])
def test_check_false_gives_the_checked_result(fn):
    v, c, cand = _inputs()
    s, i = fn(v, c, cand, 3)
    s2, i2 = fn(v, c, cand, 3, check=False)
    assert torch.equal(s, s2) and torch.equal(i, i2)


@pytest.mark.parametrize("fn", [rerank_captions, rerank_captions_ref, rerank_captions_triton])
def test_check_false_skips_the_table_scan(fn):
    # a NaN in a caption row no video can retrieve: the checked call scans the table and refuses it; the
    # unchecked one does not read that row, so it returns what the clean table gives
    v, c, cand = _inputs()
    clean_s, clean_i = rerank_captions_ref(v, c, cand, 3)
    c[-1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        fn(v, c, cand, 3)
    s, i = fn(v, c, cand, 3, check=False)
    assert torch.equal(i, clean_i)
    assert torch.allclose(s, clean_s, atol=1e-5)


def test_check_false_still_checks_shapes_and_dtypes():
    v, c, cand = _inputs()
    with pytest.raises(ValueError, match="d="):
        rerank_captions(v, c[:, :5], cand, 3, check=False)
    with pytest.raises(ValueError, match="candidates must be int32"):
        rerank_captions(v, c, cand.float(), 3, check=False)


def test_retrieval_update_reranks_unchecked_after_validating_once(monkeypatch):
    from rest_fast.cache import CaptionCache
    from rest_fast.train.retrieval_update import retrieval_update

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    seen = []
    real = rest_fast.ops.rerank_captions

    def spy(*args, **kwargs):
        seen.append(kwargs.get("check", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(rest_fast.ops, "rerank_captions", spy)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    video = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    caps = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    cache = CaptionCache(6, 2)
    cache.intern([f"c{j}" for j in range(10)])
    cache.add_pending(np.arange(6), np.arange(6))
    neighbours = np.array([[1], [2], [3], [4], [5], [0]], dtype=np.int32)
    retrieval_update(cache, video, caps, neighbours, 2, env, block=2)  # 3 blocks, 3 calls
    assert seen == [False, False, False]
    ids, _ = cache.get(np.arange(6))
    for i in range(6):  # each video keeps its own and its neighbour's generated caption, best first
        pool = [i, int(neighbours[i, 0])]
        best = sorted(pool, key=lambda j: (-float(video[i] @ caps[j]), j))
        assert ids[i].tolist() == best
    caps[7, 1] = float("inf")  # the once-per-update validation still refuses a bad table
    with pytest.raises(ValueError, match="caption_feats contains NaN or inf"):
        retrieval_update(cache, video, caps, neighbours, 2, env)
