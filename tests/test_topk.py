"""Exact top-k similarity: interpreted Triton kernel and blocked reference vs dense float64 / faiss.

Data has low intrinsic dimension (random low-rank projection + small noise, faiss ``SyntheticDataset``
style) so that neighbours are close together and ranking errors would show; tie tests duplicate rows.
"""

from __future__ import annotations

import pytest
import torch

from rest_fast.ops import topk_similarity, topk_similarity_ref
from rest_fast.ops.topk import pack_keys, topk_mismatch, topk_similarity_triton, unpack_indices, unpack_scores

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def low_rank(n: int, d: int, *, rank: int = 6, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) / rank**0.5
    x = x + noise * torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def dense_topk(q: torch.Tensor, keys: torch.Tensor, k: int, exclude=None):
    """Dense float64 oracle with the documented order (score desc, then index asc)."""
    s = q.double() @ keys.double().T
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        s[rows, exclude[rows]] = float("-inf")
    # Stable sort of descending scores keeps equal scores in ascending index order.
    v, i = torch.sort(s, dim=1, descending=True, stable=True)
    return v[:, :k].float(), i[:, :k]


def check(q, keys, s, i, rs, ri, exclude=None, tol=1e-5):
    msg = topk_mismatch(q, keys, s, i, rs, ri, exclude=exclude, tol=tol)
    assert msg is None, msg
    assert s.dtype == torch.float32 and i.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------
# packed keys
# ---------------------------------------------------------------------------------------------------


def test_pack_keys_order_and_roundtrip():
    s = torch.tensor([1.5, -2.0, 0.0, -0.0, 1e-42, -1e-42, 3.0, 3.0, -3.0, float("-inf")])
    i = torch.tensor([4, 1, 7, 2, 0, 3, 9, 5, 6, 8])
    keys = pack_keys(s, i)
    assert torch.equal(unpack_indices(keys), i)
    back = unpack_scores(keys)
    assert torch.equal(back, s + 0.0)  # -0.0 is stored as +0.0
    order = torch.argsort(keys, descending=True)
    # score descending, index ascending among equal scores (0.0 and -0.0 tie: index 2 before 7)
    assert order.tolist() == [7, 6, 0, 4, 3, 2, 5, 1, 8, 9]


# ---------------------------------------------------------------------------------------------------
# reference (fast, not interpreted): many shapes, tiny blocks to exercise every merge branch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,N,d,k,bm,bn", [
    (1, 1, 3, 1, 4, 4), (33, 257, 17, 5, 8, 16), (40, 300, 32, 64, 16, 7), (64, 500, 9, 300, 64, 128),
    (10, 1000, 24, 1, 3, 1000), (17, 129, 5, 129, 5, 32),
])
def test_ref_matches_dense(M, N, d, k, bm, bn):
    q, keys = low_rank(M, d, seed=1), low_rank(N, d, seed=2)
    s, i = topk_similarity_ref(q, keys, k, block_m=bm, block_n=bn)
    rs, ri = dense_topk(q, keys, k)
    check(q, keys, s, i, rs, ri)


def test_ref_exclude_self_and_k_equals_eligible():
    x = low_rank(70, 12, seed=3)
    ex = torch.arange(70)
    ex[::3] = -1  # some rows exclude nothing
    for k in (1, 69):
        s, i = topk_similarity_ref(x, x, k, exclude=ex, block_m=16, block_n=16)
        rs, ri = dense_topk(x, x, k, ex)
        check(x, x, s, i, rs, ri, exclude=ex)


def test_ref_ties_lower_index_first():
    base = low_rank(20, 8, seed=4)
    keys = base[torch.randint(0, 20, (200,), generator=torch.Generator().manual_seed(0))]  # heavy duplication
    q = low_rank(15, 8, seed=5)
    s, i = topk_similarity_ref(q, keys, 30, block_m=4, block_n=13)
    rs, ri = dense_topk(q, keys, 30)
    check(q, keys, s, i, rs, ri)
    # Equal fp32 scores come out with ascending indices.
    same = s[:, 1:] == s[:, :-1]
    assert bool((i[:, 1:][same] > i[:, :-1][same]).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_dtypes_and_noncontiguous(dtype):
    wide = low_rank(50, 64, seed=6).to(dtype)
    q = wide[:, ::2]  # non-contiguous [50, 32]
    keys = low_rank(64, 300, seed=7).to(dtype).T  # transposed [300, 64] ... use first 32 dims
    keys = keys[:, :32]
    s, i = topk_similarity_ref(q, keys, 9, block_m=16, block_n=64)
    rs, ri = dense_topk(q, keys, 9)
    check(q, keys, s, i, rs, ri)


def test_ref_k4096():
    keys = low_rank(5000, 16, seed=8)
    q = low_rank(6, 16, seed=9)
    s, i = topk_similarity_ref(q, keys, 4096)
    rs, ri = dense_topk(q, keys, 4096)
    check(q, keys, s, i, rs, ri)


# ---------------------------------------------------------------------------------------------------
# Triton kernel (interpreted on CPU): small shapes, tiles of 64 → M, N, d not multiples of the tiles
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,N,d,k,dtype", [
    (37, 150, 24, 5, torch.float32), (70, 130, 40, 1, torch.float16), (20, 97, 17, 97, torch.bfloat16),
    (5, 65, 130, 64, torch.float32),
])
def test_kernel_no_threshold(M, N, d, k, dtype):
    q, keys = low_rank(M, d, seed=10).to(dtype), low_rank(N, d, seed=11).to(dtype)
    s, i = topk_similarity_triton(q, keys, k)
    rs, ri = topk_similarity_ref(q, keys, k, block_n=32)
    check(q, keys, s, i, rs, ri)
    check(q, keys, s, i, *dense_topk(q, keys, k))


def test_kernel_threshold_pass_exclude_self():
    # N >= 16k and enough groups: the group-max threshold pass runs (G = 300 // 16 = 18 members per group).
    x = low_rank(600, 20, seed=12)
    q, ex = x[:50], torch.arange(50)
    s, i = topk_similarity_triton(q, x, 8, exclude=ex)
    rs, ri = dense_topk(q, x, 8, ex)
    check(q, x, s, i, rs, ri, exclude=ex)


def test_kernel_ties_and_overflow():
    # Duplicated keys (exact ties, fp16 inputs) and a candidate buffer far too small: every row overflows
    # and is redone with an exact-width buffer.
    base = low_rank(25, 16, seed=13)
    keys = base[torch.randint(0, 25, (260,), generator=torch.Generator().manual_seed(1))].half()
    q = keys[:40]
    ex = torch.arange(40)
    s, i = topk_similarity_triton(q, keys, 12, exclude=ex, cap=13)
    rs, ri = topk_similarity_ref(q, keys, 12, exclude=ex)
    check(q, keys, s, i, rs, ri, exclude=ex)
    # Same exact total order as the reference: duplicated rows score bit-identically in both.
    same = s[:, 1:] == s[:, :-1]
    assert bool((i[:, 1:][same] > i[:, :-1][same]).all())


def test_kernel_noncontiguous_and_k_eligible():
    wide = low_rank(90, 40, seed=14)
    x = wide[:, ::2]  # [90, 20], stride 2
    qt = low_rank(20, 33, seed=15).T  # [33, 20] transposed view
    ex = torch.randint(-1, 90, (33,), generator=torch.Generator().manual_seed(2))
    ex[0] = 5
    s, i = topk_similarity_triton(qt, x, 89, exclude=ex)
    check(qt, x, s, i, *dense_topk(qt, x, 89, ex), exclude=ex)


def test_kernel_large_k():
    keys = low_rank(4200, 16, seed=16)
    q = low_rank(3, 16, seed=17)
    s, i = topk_similarity_triton(q, keys, 4096)
    check(q, keys, s, i, *dense_topk(q, keys, 4096))


# ---------------------------------------------------------------------------------------------------
# errors, dispatch, faiss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [topk_similarity, topk_similarity_ref])
def test_errors(fn):
    q, keys = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="k=11 exceeds"):
        fn(q, keys, 11)
    with pytest.raises(ValueError, match="k=10 exceeds"):
        fn(q, keys, 10, exclude=torch.tensor([0, -1, -1, -1]))
    with pytest.raises(ValueError, match="queries contains NaN"):
        fn(torch.full((4, 8), float("nan")), keys, 2)
    with pytest.raises(ValueError, match="keys contains NaN or inf"):
        fn(q, torch.full((10, 8), float("inf")), 2)
    with pytest.raises(ValueError, match="exclude values"):
        fn(q, keys, 2, exclude=torch.tensor([10, 0, 0, 0]))
    with pytest.raises(ValueError, match="exclude must be"):
        fn(q, keys, 2, exclude=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="d=8 but keys has d=7"):
        fn(q, torch.randn(10, 7), 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        fn(q, keys, 0)
    with pytest.raises(ValueError, match="queries dtype"):
        fn(q.long(), keys, 2)


def test_dispatch_reference_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from rest_fast.ops import topk_cpu

    monkeypatch.setattr(topk_cpu, "NATIVE_AVAILABLE", False)  # the native CPU path: tests/test_topk_cpu.py
    q, keys = low_rank(30, 16, seed=18), low_rank(200, 16, seed=19)
    s, i = topk_similarity(q, keys, 7)
    rs, ri = topk_similarity_ref(q, keys, 7)
    assert torch.equal(s, rs) and torch.equal(i, ri)


def test_public_interpreted_matches_reference():
    q, keys = low_rank(30, 16, seed=20).half(), low_rank(120, 16, seed=21).half()
    s, i = topk_similarity(q, keys, 7)
    check(q, keys, s, i, *topk_similarity_ref(q, keys, 7))


def test_faiss_agreement():
    faiss = pytest.importorskip("faiss")
    x = low_rank(800, 32, seed=22)
    q = low_rank(60, 32, seed=23)
    index = faiss.IndexFlatIP(32)
    index.add(x.numpy())
    fd, fi = index.search(q.numpy(), 25)
    s, i = topk_similarity_ref(q, x, 25, block_n=128)
    check(q, x, s, i, torch.from_numpy(fd), torch.from_numpy(fi))
    s, i = topk_similarity_triton(q, x, 25)
    check(q, x, s, i, torch.from_numpy(fd), torch.from_numpy(fi))


def test_custom_op_opcheck_and_compile(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, keys = low_rank(12, 8, seed=24), low_rank(40, 8, seed=25)
    ex = torch.arange(12)
    torch.library.opcheck(torch.ops.rest_fast.topk_similarity.default, (q, keys, 5, ex))
    torch.library.opcheck(torch.ops.rest_fast.topk_similarity.default, (q, keys, 5, None))
    fn = torch.compile(lambda a, b: topk_similarity(a, b, 5, exclude=ex), fullgraph=True, backend="aot_eager")
    s, i = fn(q, keys)
    rs, ri = topk_similarity(q, keys, 5, exclude=ex)  # eager: the same CPU path (native or reference)
    assert torch.equal(s, rs) and torch.equal(i, ri)


# ----------------------------------------------------------------------------------------------------
# results do not depend on the execution path (reference / interpreted Triton)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_numpy_views_sharing_memory(interpret, monkeypatch):
    # Two torch.from_numpy views that start at the same address (queries = first 37 rows, keys = first 50):
    # the interpreter used to fail with "Trying to resize storage that is not resizable".
    np = pytest.importorskip("numpy")
    x = np.random.default_rng(0).standard_normal((100, 24)).astype(np.float32)
    q, keys = torch.from_numpy(x[:37]), torch.from_numpy(x[:50])
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    s, i = topk_similarity(q, keys, 5, exclude=torch.arange(37))
    rs, ri = dense_topk(q, keys, 5, exclude=torch.arange(37))
    check(q, keys, s, i, rs, ri, exclude=torch.arange(37))


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_float64_same_result_on_every_path(interpret, monkeypatch):
    q, keys = low_rank(20, 16, seed=3).double(), low_rank(90, 16, seed=4).double()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rs, ri = topk_similarity(q, keys, 7)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    s, i = topk_similarity(q, keys, 7)
    assert torch.equal(s, rs) and torch.equal(i, ri)
