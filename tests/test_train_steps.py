"""Algorithm 1 steps on small hand-checkable examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rest_fast.train.distributed import DistEnv, shard_range
from rest_fast.train.initial_captions import join_prompt
from rest_fast.train.retrieval_update import _compact, initial_candidates
from rest_fast.train.self_train import cosine_lambda, derive_seed

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


def test_compact_moves_padding_right():
    a = np.array([[-1, 3, -1, 4], [-1, -1, -1, -1], [5, -1, 6, 7]], dtype=np.int32)
    out = _compact(a)
    assert out.tolist() == [[3, 4, -1], [-1, -1, -1], [5, 6, 7]]


def test_initial_candidates_self_and_neighbours():
    # 4 videos with 2 initial captions each; neighbours (self excluded), -1 = none
    init = np.array([[0, 1], [2, 3], [4, 5], [6, -1]], dtype=np.int32)
    nb = np.array([[1, 2], [0, -1], [3, 0], [2, 1]])
    out = initial_candidates(init, nb, np.array([0, 1, 3]))
    assert out.tolist() == [[0, 1, 2, 3, 4, 5], [2, 3, 0, 1, -1, -1], [6, 4, 5, 2, 3, -1]]


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
