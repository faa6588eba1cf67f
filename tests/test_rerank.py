"""Fused caption re-ranking: interpreted Triton kernel vs the torch reference vs a plain-Python oracle."""

from __future__ import annotations

import pytest
import torch

from rest_fast.ops import rerank_captions, rerank_captions_ref
from rest_fast.ops.rerank import rerank_captions_triton


def oracle(v, c, cand, k):
    """Plain Python: dedupe ids, score in float64, sort by (score desc, id asc)."""
    out_s = torch.full((cand.shape[0], k), float("-inf"))
    out_i = torch.full((cand.shape[0], k), -1, dtype=torch.int32)
    for n in range(cand.shape[0]):
        ids = sorted({int(x) for x in cand[n] if x >= 0})
        sc = [(float(v[n].double() @ c[i].double()), i) for i in ids]
        sc.sort(key=lambda t: (-t[0], t[1]))
        for j, (s, i) in enumerate(sc[:k]):
            out_s[n, j], out_i[n, j] = s, i
    return out_s, out_i


def make(N, C, L, d, *, dtype=torch.float32, seed=0, dup_pool=None):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(N, d, generator=g).to(dtype)
    c = torch.randn(C, d, generator=g).to(dtype)
    hi = dup_pool or C
    cand = torch.randint(0, hi, (N, L), generator=g, dtype=torch.int32)
    cand[torch.rand(N, L, generator=g) < 0.2] = -1
    return v, c, cand


def check(s, i, rs, ri, v, c, cand, atol=1e-5):
    assert s.dtype == torch.float32 and i.dtype == torch.int32
    assert s.shape == rs.shape and i.shape == ri.shape
    fin = torch.isfinite(rs)
    assert torch.equal(torch.isfinite(s), fin), "padding differs"
    assert bool((i[~fin] == -1).all()), "padding ids must be -1"
    assert torch.allclose(s[fin], rs[fin].float(), atol=atol, rtol=1e-5)
    # ids: distinct, drawn from the row's candidates, and re-scored exactly
    for n in range(s.shape[0]):
        got = [int(x) for x in i[n] if x >= 0]
        assert len(set(got)) == len(got), f"row {n}: duplicate ids {got}"
        assert set(got) <= {int(x) for x in cand[n] if x >= 0}
    ex = torch.einsum("nd,nkd->nk", v.double(), c.double()[i.long().clamp_min(0)])
    assert torch.allclose(ex[fin].float(), s[fin], atol=atol, rtol=1e-5)
    # ids equal wherever the reference score is not tied (within tolerance) with a neighbour
    up = torch.cat([torch.full((s.shape[0], 1), float("inf")), rs[:, :-1] - rs[:, 1:]], 1)
    down = torch.cat([rs[:, :-1] - rs[:, 1:], torch.full((s.shape[0], 1), float("inf"))], 1)
    sep = fin & (up.nan_to_num(float("inf")) > 1e-4) & (down.nan_to_num(float("inf")) > 1e-4)
    assert torch.equal(i[sep], ri[sep])


def edge_rows(cand):
    """Row 0 all empty, row 1 one id repeated, row 2 two distinct ids, row 3 ids with gaps of -1."""
    cand[0] = -1
    cand[1] = 3
    cand[2] = torch.tensor([5, 7] * (cand.shape[1] // 2) + [5] * (cand.shape[1] % 2), dtype=torch.int32)
    cand[3, ::2] = -1
    return cand


@pytest.mark.parametrize("N,C,L,d,k", [(9, 40, 37, 20, 3), (6, 300, 130, 33, 5), (5, 12, 64, 16, 1)])
def test_reference_matches_oracle(N, C, L, d, k):
    v, c, cand = make(N, C, L, d, seed=N)
    cand = edge_rows(cand)
    rs, ri = oracle(v, c, cand, k)
    s, i = rerank_captions_ref(v, c, cand, k, block=4)
    check(s, i, rs, ri, v, c, cand)


def test_reference_large_k_sort_path():
    v, c, cand = make(4, 50, 80, 8, seed=1, dup_pool=30)
    rs, ri = oracle(v, c, cand, 20)
    s, i = rerank_captions_ref(v, c, cand, 20)
    check(s, i, rs, ri, v, c, cand)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    # Heavy duplication: 150 slots drawn from 25 ids; L not a multiple of the chunk, d of the d-chunk.
    v, c, cand = make(8, 60, 150, 24, dtype=dtype, seed=2, dup_pool=25)
    cand = edge_rows(cand)
    s, i = rerank_captions_triton(v, c, cand, 3)
    rs, ri = rerank_captions_ref(v, c, cand, 3)
    check(s, i, rs, ri, v, c, cand)
    check(s, i, *oracle(v, c, cand, 3), v, c, cand)


def test_kernel_multi_chunk_noncontiguous_int64_ties():
    # Several chunks per row (L > the interpreter's 1024 chunk), non-contiguous feature views,
    # int64 candidates, duplicated caption rows (exact ties: the lower id must come first).
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 64, generator=g)
    c = base[torch.arange(40) % 10][:, ::2]  # [40, 32], ids i and i+10 are identical rows
    v = torch.randn(32, 4, generator=g).T  # [4, 32] transposed
    cand = torch.randint(-1, 40, (4, 1500), generator=g)
    cand[1, :1024] = -1  # first chunk empty
    s, i = rerank_captions_triton(v, c, cand, 6)
    rs, ri = rerank_captions_ref(v, c, cand, 6)
    assert torch.equal(i, ri)
    assert torch.allclose(s, rs, atol=1e-5)
    tied = s[:, 1:] == s[:, :-1]
    assert bool((i[:, 1:][tied] > i[:, :-1][tied]).all())


def test_public_dispatch(monkeypatch):
    v, c, cand = make(5, 30, 40, 16, seed=4)
    rs, ri = rerank_captions_ref(v, c, cand, 3)
    s, i = rerank_captions(v, c, cand, 3)  # interpreted kernel (conftest sets TRITON_INTERPRET=1)
    check(s, i, rs, ri, v, c, cand)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s, i = rerank_captions(v, c, cand, 3)
    assert torch.equal(s, rs) and torch.equal(i, ri)
    s, i = rerank_captions(v, c, cand, 40)  # above the kernel's k limit: reference
    check(s, i, *oracle(v, c, cand, 40), v, c, cand)


@pytest.mark.parametrize("fn", [rerank_captions, rerank_captions_ref])
def test_errors(fn):
    v, c, cand = make(3, 10, 8, 4)
    with pytest.raises(ValueError, match="candidates must hold caption ids"):
        fn(v, c, torch.full((3, 8), 10, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="candidates must be int32"):
        fn(v, c, cand.float(), 2)
    with pytest.raises(ValueError, match="candidates must be"):
        fn(v, c, cand[:2], 2)
    with pytest.raises(ValueError, match="d=4 but caption_feats has d=5"):
        fn(v, torch.randn(10, 5), cand, 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        fn(v, c, cand, 0)
    with pytest.raises(ValueError, match="caption_feats contains NaN"):
        fn(v, torch.full((10, 4), float("nan")), cand, 2)


def test_custom_op_opcheck_and_compile(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    v, c, cand = make(4, 20, 30, 8, seed=5)
    torch.library.opcheck(torch.ops.rest_fast.rerank_captions.default, (v, c, cand, 3))
    fn = torch.compile(lambda a, b, e: rerank_captions(a, b, e, 3), fullgraph=True, backend="aot_eager")
    s, i = fn(v, c, cand)
    rs, ri = rerank_captions_ref(v, c, cand, 3)
    assert torch.equal(s, rs) and torch.equal(i, ri)


# ----------------------------------------------------------------------------------------------------
# results do not depend on the execution path (reference / interpreted Triton)
# ----------------------------------------------------------------------------------------------------


def _both_paths(monkeypatch, *args):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ref = rerank_captions(*args)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return ref, rerank_captions(*args)


@pytest.mark.parametrize("case", ["float64", "no_captions", "empty_rows", "no_candidates", "numpy_views"])
def test_same_result_on_every_path(case, monkeypatch):
    g = torch.Generator().manual_seed(5)
    v, c = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    cand = torch.randint(0, 40, (6, 9), generator=g, dtype=torch.int32)
    if case == "float64":
        v, c = v.double(), c.double()
    elif case == "no_captions":  # C = 0: every candidate slot is empty
        c, cand = c[:0], torch.full((6, 9), -1, dtype=torch.int32)
    elif case == "empty_rows":
        cand[1::2] = -1
    elif case == "no_candidates":  # L = 0
        cand = cand[:, :0]
    elif case == "numpy_views":  # views of one array starting at the same address
        np = pytest.importorskip("numpy")
        x = np.random.default_rng(0).standard_normal((60, 16)).astype(np.float32)
        v, c = torch.from_numpy(x[:6]), torch.from_numpy(x[:40])
    (rs, ri), (s, i) = _both_paths(monkeypatch, v, c, cand, 3)
    assert s.dtype == rs.dtype == torch.float32 and i.dtype == ri.dtype == torch.int32
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-5)
    assert torch.equal(i, ri)
