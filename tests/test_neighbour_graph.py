"""NeighbourGraph: exact build, memory-mapped save/load, reuse by feature hash, capping of k."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from rest_fast.ops import topk_similarity_ref
from rest_fast.retrieval import NeighbourGraph, cap_neighbours, feature_hash


def feats(n=60, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) @ torch.randn(4, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    # The graph logic is under test here; the kernels and the native CPU top-k have their own tests.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from rest_fast.ops import topk_cpu

    monkeypatch.setattr(topk_cpu, "NATIVE_AVAILABLE", False)


def test_build_matches_reference_and_excludes_self():
    x = feats()
    g = NeighbourGraph.build(x, 7)
    s, i = topk_similarity_ref(x, x, 7, exclude=torch.arange(60))
    assert g.indices.dtype == torch.int32 and g.scores.dtype == torch.float32
    assert g.indices.shape == (60, 7) and g.k == 7 and g.exclude_self
    assert torch.equal(g.indices.long(), i) and torch.equal(g.scores, s)
    assert not bool((g.indices.long() == torch.arange(60)[:, None]).any())
    g2 = NeighbourGraph.build(x, 7, exclude_self=False)
    assert torch.equal(g2.indices[:, 0].long(), torch.arange(60))  # unit vectors: self is the best match


def test_save_load_memory_mapped(tmp_path):
    x = feats()
    g = NeighbourGraph.build(x, 5)
    g.save(tmp_path / "graph")
    h = NeighbourGraph.load(tmp_path / "graph")
    assert torch.equal(h.indices, g.indices) and torch.equal(h.scores, g.scores)
    assert h.feature_hash == feature_hash(x) and h.k == 5
    meta = json.loads((tmp_path / "graph" / "meta.json").read_text())
    arr = np.load(tmp_path / "graph" / meta["indices"], mmap_mode="r")
    assert arr.dtype == np.int32 and arr.shape == (60, 5)
    assert isinstance(np.load(tmp_path / "graph" / meta["scores"], mmap_mode="c"), np.memmap)
    assert not list((tmp_path / "graph").glob("*.tmp"))


def test_load_or_build_reuses_and_recomputes(tmp_path, monkeypatch):
    x = feats()
    path = tmp_path / "g"
    g1 = NeighbourGraph.load_or_build(path, x, 4)
    calls = []
    orig = NeighbourGraph.build.__func__

    def counting(cls, *a, **kw):
        calls.append(1)
        return orig(cls, *a, **kw)

    monkeypatch.setattr(NeighbourGraph, "build", classmethod(counting))
    g2 = NeighbourGraph.load_or_build(path, x.clone(), 4)  # same bytes → reused
    assert calls == [] and torch.equal(g2.indices, g1.indices)
    g3 = NeighbourGraph.load_or_build(path, x, 6)  # other k → rebuilt
    assert calls == [1] and g3.k == 6
    y = x.clone()
    y[3, 0] += 1e-3
    g4 = NeighbourGraph.load_or_build(path, y, 6)  # other features → rebuilt
    assert calls == [1, 1] and g4.feature_hash == feature_hash(y) != g3.feature_hash
    files = sorted(p.name for p in path.glob("*.npy"))
    assert len(files) == 2  # superseded arrays removed
    assert NeighbourGraph.load(path).feature_hash == feature_hash(y)


def test_feature_hash_covers_dtype_shape_bytes():
    x = feats(8, 4)
    assert feature_hash(x) == feature_hash(x[:, :].clone())
    assert feature_hash(x) != feature_hash(x.half())
    assert feature_hash(x) != feature_hash(x.reshape(4, 8))
    assert feature_hash(x.bfloat16()) == feature_hash(x.bfloat16().T.contiguous().T)


def test_cap_neighbours_warns(tmp_path):
    with pytest.warns(UserWarning, match="capped at 9"):
        assert cap_neighbours(2000, 10) == 9
    with pytest.warns(UserWarning, match="capped at 10"):
        assert cap_neighbours(2000, 10, exclude_self=False) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cap_neighbours(5, 10) == 5
    x = feats(12)
    with pytest.warns(UserWarning, match="capped at 11"):
        g = NeighbourGraph.load_or_build(tmp_path / "small", x, 2000)
    assert g.k == 11 and g.indices.shape == (12, 11)
    with pytest.raises(ValueError, match="exceeds"):
        NeighbourGraph.build(x, 2000, cap=False)
    with pytest.raises(ValueError, match="at least 2"):
        cap_neighbours(3, 1)


def test_corrupt_meta_rebuilds(tmp_path):
    x = feats()
    path = tmp_path / "g"
    NeighbourGraph.load_or_build(path, x, 3)
    (path / "meta.json").write_text("{not json")
    g = NeighbourGraph.load_or_build(path, x, 3)
    assert g.k == 3 and NeighbourGraph.load(path).k == 3
