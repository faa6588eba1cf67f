"""Strict mode (``REST_FAST_STRICT=1``): every fallback of every fused op raises instead of warning, and
the per-op launch counter says when the fused path ran. CUDA tensors are stood in for by objects with a
CUDA ``device`` (the dispatch decision and the fallback read only ``.device``), so this runs without a GPU;
the CPU cases go through the public ops with the interpreted kernels (conftest sets ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import rest_fast.ops.topk as topk_mod
from rest_fast.ops import _dispatch as d
from rest_fast.ops import (
    rerank_captions,
    rerank_captions_ref,
    temporal_dwconv3d,
    temporal_dwconv3d_ref,
    topk_similarity,
)

ALL_OPS = [("temporal_dwconv3d", "dwconv3d"), ("topk_similarity", "topk"), ("rerank_captions", "rerank")]


class FakeCuda:
    device = torch.device("cuda")


def _triton_error(msg: str) -> Exception:
    # An exception type that looks raised inside Triton (its module is triton's), as a ptxas failure is.
    return type("CompilationError", (Exception,), {"__module__": "triton.compiler.errors"})(msg)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(d, "_WARNED", set())
    monkeypatch.setattr(d, "KERNEL_RUN_ERRORS", {})
    monkeypatch.delenv("REST_FAST_STRICT", raising=False)


@pytest.mark.parametrize("op,kernels", ALL_OPS)
def test_strict_cuda_under_interpreter_raises(monkeypatch, op, kernels):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):  # not strict: a warning, the reference
        assert not d.triton_path(op, kernels, FakeCuda())
    monkeypatch.setenv("REST_FAST_STRICT", "1")
    with pytest.raises(d.StrictFallbackError, match=f"{op}.*TRITON_INTERPRET=1"):
        d.triton_path(op, kernels, FakeCuda())


@pytest.mark.parametrize("op,kernels", ALL_OPS)
def test_strict_unimportable_kernels_raise_on_cuda(monkeypatch, op, kernels):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("REST_FAST_STRICT", "1")
    monkeypatch.setattr(d, "load_kernels", lambda name: None)
    monkeypatch.setitem(d.KERNEL_IMPORT_ERRORS, kernels, "ImportError('no triton')")
    with pytest.raises(d.StrictFallbackError, match="no triton"):
        d.triton_path(op, kernels, FakeCuda())


def test_strict_kernel_error_on_cuda_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def sabotaged(x):
        raise _triton_error("ptxas fatal: sabotaged")

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert d.run_or_fallback("rerank_captions", sabotaged, lambda x: "reference", FakeCuda()) == "reference"
    monkeypatch.setattr(d, "KERNEL_RUN_ERRORS", {})
    monkeypatch.setenv("REST_FAST_STRICT", "1")
    before = d.launch_count("rerank_captions")
    with pytest.raises(d.StrictFallbackError, match="sabotaged") as info:
        d.run_or_fallback("rerank_captions", sabotaged, lambda x: "reference", FakeCuda())
    assert "ptxas fatal" in str(info.value.__cause__)
    # Nothing recorded: a strict process does not send later calls to the reference either.
    assert d.KERNEL_RUN_ERRORS == {} and d.launch_count("rerank_captions") == before


def test_strict_cpu_interpreter_with_unimportable_kernels_raises_through_the_op(monkeypatch):
    # TRITON_INTERPRET=1 asks for the interpreted kernels; when they cannot import the op used to serve the
    # reference silently. Strict: the public op raises.
    g = torch.Generator().manual_seed(0)
    v, c = torch.randn(6, 16, generator=g), torch.randn(30, 16, generator=g)
    cand = torch.randint(0, 30, (6, 12), generator=g, dtype=torch.int32)
    monkeypatch.setattr(d, "load_kernels", lambda name: None)
    monkeypatch.setitem(d.KERNEL_IMPORT_ERRORS, "rerank", "ImportError('sabotaged triton')")
    before = d.launch_count("rerank_captions")
    s, i = rerank_captions(v, c, cand, 3)
    rs, ri = rerank_captions_ref(v, c, cand, 3)
    assert torch.equal(s, rs) and torch.equal(i, ri) and d.launch_count("rerank_captions") == before
    monkeypatch.setenv("REST_FAST_STRICT", "1")
    with pytest.raises(d.StrictFallbackError, match="sabotaged triton"):
        rerank_captions(v, c, cand, 3)


def test_strict_sabotaged_launcher_raises_through_the_op(monkeypatch):
    monkeypatch.setenv("REST_FAST_STRICT", "1")
    q = torch.randn(5, 8)

    def sabotaged(*args, **kwargs):
        raise _triton_error("launch failed: sabotaged")

    monkeypatch.setattr(topk_mod, "topk_similarity_triton", sabotaged)
    before = d.launch_count("topk_similarity")
    with pytest.raises(Exception, match="sabotaged"):
        topk_similarity(q, q, 2)
    assert d.launch_count("topk_similarity") == before


def test_launch_counter_counts_the_fused_path_only(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 5, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, generator=g, requires_grad=True)
    v, c = torch.randn(4, 8, generator=g), torch.randn(20, 8, generator=g)
    cand = torch.randint(0, 20, (4, 10), generator=g, dtype=torch.int32)
    monkeypatch.setenv("REST_FAST_STRICT", "1")
    before = {op: d.launch_count(op) for op, _ in ALL_OPS}
    temporal_dwconv3d(x, w, None, residual=True).sum().backward()  # forward + backward launches
    topk_similarity(v, c, 3)
    rerank_captions(v, c, cand, 2)
    after = {op: d.launch_count(op) for op, _ in ALL_OPS}
    assert after["temporal_dwconv3d"] == before["temporal_dwconv3d"] + 2
    assert after["topk_similarity"] == before["topk_similarity"] + 1
    assert after["rerank_captions"] == before["rerank_captions"] + 1

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU reference path: correct, but not fused
    y = temporal_dwconv3d(x.detach(), w.detach(), None)
    torch.testing.assert_close(y, temporal_dwconv3d_ref(x.detach(), w.detach(), None))
    rerank_captions(v, c, cand, 2)
    assert torch.equal(rerank_captions(v, c, cand, 2)[1], rerank_captions_ref(v, c, cand, 2)[1])
    assert {op: d.launch_count(op) for op, _ in ALL_OPS} == after
