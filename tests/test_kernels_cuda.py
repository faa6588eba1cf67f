"""The compiled Triton kernels on a CUDA device, against the references (``pytest -m gpu``).

The CPU suite checks the same kernels through the interpreter; these tests check what the interpreter cannot:
real compilation (triton 3.6–3.9), tensor-core ``tl.dot`` precision, autotuned configs and large shapes. Run with
``TRITON_INTERPRET=0`` (``bench/gpu_suite.sh`` does): under the interpreter CUDA tensors would be served by
interpreted kernels and nothing compiled would be tested.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close_verbose

from rest_fast.ops import (
    _dispatch,
    rerank_captions,
    rerank_captions_ref,
    temporal_dwconv3d,
    temporal_dwconv3d_ref,
    topk_similarity,
    topk_similarity_ref,
)
from rest_fast.ops.topk import topk_mismatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="run with TRITON_INTERPRET=0 so the CUDA kernels are compiled"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ksize", [((2, 8, 14, 14, 768), (3, 3, 3)), ((1, 3, 5, 7, 37), (5, 3, 1)),
                                         ((3, 1, 9, 9, 1), (3, 3, 3))])
@pytest.mark.parametrize("residual", [False, True])
def test_dwconv3d_cuda_forward_backward(dtype, shape, ksize, residual):
    g = torch.Generator(device="cuda").manual_seed(0)
    C = shape[-1]
    x = torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (0.2 * torch.randn(C, *ksize, device="cuda", generator=g)).to(dtype).requires_grad_()
    b = torch.randn(C, device="cuda", generator=g).to(dtype).requires_grad_()
    dy = torch.randn(shape, device="cuda", generator=g).to(dtype)

    launched = _dispatch.launch_count("temporal_dwconv3d")
    y = temporal_dwconv3d(x, w, b, residual=residual)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    assert _dispatch.launch_count("temporal_dwconv3d") == launched + 2  # the fused forward and backward ran

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = temporal_dwconv3d_ref(x64, w64, b64, residual=residual)
    dx64, dw64, db64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())

    assert y.dtype == dtype and y.shape == x.shape
    assert_close_verbose(y, y64, dtype, "y")
    assert_close_verbose(dx, dx64, dtype, "dx")
    # dw / db sum over B·T·H·W positions: compare relative to the reduction's scale.
    n = x.numel() // C
    scale = max(1.0, n**0.5)
    assert_close_verbose(dw / scale, dw64 / scale, dtype, "dw")
    assert_close_verbose(db / scale, db64 / scale, dtype, "db")
    # Deterministic weight gradient: the same bits run to run.
    dw2 = torch.autograd.grad(temporal_dwconv3d(x, w, b, residual=residual), w, dy)[0]
    assert torch.equal(dw, dw2)


def _low_rank(n: int, d: int, g: torch.Generator, rank: int = 16) -> torch.Tensor:
    basis = torch.randn(rank, d, device="cuda", generator=g)
    x = torch.randn(n, rank, device="cuda", generator=g) @ basis + 0.05 * torch.randn(n, d, device="cuda", generator=g)
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,d,k", [(257, 5003, 96, 1), (300, 20000, 512, 2000), (64, 4500, 33, 4096),
                                     (512, 240_000, 512, 16)])
def test_topk_similarity_cuda(dtype, M, N, d, k):
    g = torch.Generator(device="cuda").manual_seed(1)
    keys = _low_rank(N, d, g).to(dtype)
    keys[1::7] = keys[0::7][: keys[1::7].shape[0]]  # exact ties
    queries = keys[:M].clone()
    exclude = torch.arange(M, device="cuda")  # self-match, as in video-video retrieval
    launched = _dispatch.launch_count("topk_similarity")
    s, i = topk_similarity(queries, keys, k, exclude=exclude)
    assert _dispatch.launch_count("topk_similarity") == launched + 1
    rs, ri = topk_similarity_ref(queries.cpu(), keys.cpu(), k, exclude=exclude.cpu())
    err = topk_mismatch(queries.cpu(), keys.cpu(), s.cpu(), i.cpu(), rs, ri, exclude=exclude.cpu(), tol=1e-4)
    assert err is None, err


@pytest.mark.parametrize("dtype", DTYPES)
def test_rerank_captions_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(2)
    N, C, L, d, k = 500, 3000, 2000, 512, 3
    videos = _low_rank(N, d, g).to(dtype)
    captions = _low_rank(C, d, g).to(dtype)
    cand = torch.randint(0, C, (N, L), device="cuda", generator=g, dtype=torch.int32)
    cand[:, L // 2:] = cand[:, : L - L // 2]  # heavy duplication
    cand[::5, 7:] = -1  # rows with few candidates
    cand[3] = -1  # an empty row
    launched = _dispatch.launch_count("rerank_captions")
    s, ids = rerank_captions(videos, captions, cand, k)
    assert _dispatch.launch_count("rerank_captions") == launched + 1
    rs, rids = rerank_captions_ref(videos.cpu(), captions.cpu(), cand.cpu(), k)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-4, atol=1e-4)
    # Re-score the returned ids exactly and check they are distinct per row.
    ok = ids.cpu() >= 0
    assert torch.equal(ok, rids >= 0)
    rescored = (videos.double().cpu()[:, None, :] * captions.double().cpu()[ids.cpu().clamp(min=0)]).sum(-1)
    torch.testing.assert_close(rescored[ok].float(), s.cpu()[ok], rtol=1e-3, atol=1e-3)
    for row in ids.cpu().tolist():
        filled = [c for c in row if c >= 0]
        assert len(filled) == len(set(filled))


def test_edge_cases_match_the_reference_path():
    # Results must not depend on the path: float64, C = 0, empty candidate rows, L = 0.
    g = torch.Generator(device="cuda").manual_seed(3)
    q, keys = torch.randn(9, 16, device="cuda", generator=g), torch.randn(50, 16, device="cuda", generator=g)
    s, i = topk_similarity(q.double(), keys.double(), 4)
    rs, ri = topk_similarity_ref(q.double().cpu(), keys.double().cpu(), 4)
    assert torch.equal(s.cpu(), rs) and torch.equal(i.cpu(), ri)
    cand = torch.randint(0, 50, (9, 6), device="cuda", generator=g, dtype=torch.int32)
    cand[::2] = -1
    cases = [(q, keys, cand), (q.double(), keys.double(), cand), (q, keys[:0], torch.full_like(cand, -1)),
             (q, keys, cand[:, :0])]
    for v, c, cd in cases:
        s, i = rerank_captions(v, c, cd, 3)
        rs, ri = rerank_captions_ref(v.cpu(), c.cpu(), cd.cpu(), 3)
        torch.testing.assert_close(s.cpu(), rs, rtol=1e-5, atol=1e-5)
        assert torch.equal(i.cpu(), ri)
    x, w = torch.randn(1, 2, 3, 3, 0, device="cuda"), torch.randn(0, 3, 3, 3, device="cuda")
    assert temporal_dwconv3d(x, w, None).shape == x.shape


def test_interpreter_left_set_warns_once_and_uses_the_reference(monkeypatch):
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(8, 32, device="cuda")
    with pytest.raises(_dispatch.StrictFallbackError, match="TRITON_INTERPRET=1"):  # GPU tests run strict
        topk_similarity(q, q, 3)
    monkeypatch.setenv("REST_FAST_STRICT", "0")
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        s, i = topk_similarity(q, q, 3)
    rs, ri = topk_similarity_ref(q, q, 3)
    assert torch.equal(s, rs) and torch.equal(i, ri)
    assert "Triton (compiled)" not in _dispatch.op_paths()["topk_similarity"]
