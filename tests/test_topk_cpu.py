"""CPU top-k path (BLAS GEMM blocks + native C++ selection) against the dense float64 oracle and the
pure-torch reference; the fallback without the native extension.

Block sizes are set small in several cases so rows cross many key blocks (the streaming threshold), and
key blocks of >= 1024 keys exercise the histogram bounds (sampled and exact).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_topk import check, dense_topk, low_rank

from rest_fast.ops import topk_cpu, topk_similarity, topk_similarity_ref
from rest_fast.ops.topk import topk_mismatch

native = pytest.mark.skipif(not topk_cpu.NATIVE_AVAILABLE, reason=f"native extension: {topk_cpu.NATIVE_ERROR}")
GEMMS = ["numpy", "torch"]


@native
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("M,N,d,k,bm,bn", [
    (1, 1, 3, 1, None, None), (33, 257, 17, 5, 8, 16), (40, 300, 32, 64, 16, 7), (64, 500, 9, 300, 64, 128),
    (10, 1000, 24, 1, 3, 1000), (17, 129, 5, 129, 5, 32), (50, 3000, 16, 10, 16, None),
    (37, 2500, 16, 600, None, 1250), (21, 4099, 8, 1000, 7, None),
])
def test_matches_dense(M, N, d, k, bm, bn, gemm):
    q, keys = low_rank(M, d, seed=1), low_rank(N, d, seed=2)
    s, i = topk_cpu.topk_similarity_cpu(q, keys, k, block_m=bm, block_n=bn, gemm=gemm)
    rs, ri = dense_topk(q, keys, k)
    check(q, keys, s, i, rs, ri)


@native
@pytest.mark.parametrize("gemm", GEMMS)
def test_exclude_self_k1_and_k_equals_eligible(gemm):
    for n, bn in ((70, 16), (1100, None)):
        x = low_rank(n, 12, seed=3)
        ex = torch.arange(n)
        ex[::3] = -1  # some rows exclude nothing
        for k in (1, n - 1) if n < 100 else (1, 300, n - 1):
            s, i = topk_cpu.topk_similarity_cpu(x, x, k, exclude=ex, block_m=16, block_n=bn, gemm=gemm)
            rs, ri = dense_topk(x, x, k, ex)
            check(x, x, s, i, rs, ri, exclude=ex)


@native
def test_exact_ties_lower_index_first():
    base = low_rank(20, 8, seed=4)
    g = torch.Generator().manual_seed(0)
    keys = base[torch.randint(0, 20, (2000,), generator=g)]  # heavy duplication: exact equal scores
    q = low_rank(15, 8, seed=5)
    for k, bn in ((30, 13), (30, None), (700, None), (1999, 256)):
        s, i = topk_cpu.topk_similarity_cpu(q, keys, k, block_m=4, block_n=bn)
        rs, ri = dense_topk(q, keys, k)
        check(q, keys, s, i, rs, ri)
        same = s[:, 1:] == s[:, :-1]
        assert bool(same.any())
        assert bool((i[:, 1:][same] > i[:, :-1][same]).all())


@native
def test_all_scores_equal_and_sampled_bound_fallback():
    # Degenerate range (every score equal): no histogram, ids 0..k-1.
    q, keys = torch.ones(3, 4), torch.ones(3000, 4)
    s, i = topk_cpu.topk_similarity_cpu(q, keys, 50)
    assert torch.equal(i, torch.arange(50).expand(3, 50)) and bool((s == 4).all())
    # The largest scores sit exactly on the sampled positions (every 4th key): the sampled bound lets
    # fewer than k through, and the exact histogram must take over.
    N, k = 4096, 200
    keys = torch.zeros(N, 2)
    keys[:, 1] = 1.0
    keys[::4, 0] = torch.linspace(2.0, 1.0, N // 4)
    keys[1::4, 0] = 0.5
    q = torch.tensor([[1.0, 0.0], [1.0, 0.001]])
    s, i = topk_cpu.topk_similarity_cpu(q, keys, k)
    rs, ri = dense_topk(q, keys, k)
    check(q, keys, s, i, rs, ri)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_noncontiguous(dtype):
    wide = low_rank(50, 64, seed=6).to(dtype)
    q = wide[:, ::2]  # non-contiguous [50, 32]
    keys = low_rank(64, 1300, seed=7).to(dtype).T[:, :32]  # transposed, non-contiguous [1300, 32]
    for budget in (1 << 30, 0):  # fp32 copy of the keys once, or per block
        s, i = topk_cpu.topk_similarity_cpu(q, keys, 9, block_n=512, key_budget=budget)
        rs, ri = dense_topk(q, keys, 9)
        check(q, keys, s, i, rs, ri)
    # Mixed: fp16 keys (the trainer's storage) with fp32 queries.
    keys16 = low_rank(700, 32, seed=8).half()
    s, i = topk_cpu.topk_similarity_cpu(q.float(), keys16, 20)
    check(q.float(), keys16, s, i, *dense_topk(q.float(), keys16, 20))


@native
def test_public_dispatch_uses_native_and_agrees_with_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = low_rank(300, 16, seed=10).half()
    ex = torch.arange(300)
    calls = []
    real = topk_cpu.topk_similarity_cpu
    monkeypatch.setattr(topk_cpu, "topk_similarity_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    s, i = topk_similarity(x, x, 12, exclude=ex)
    assert calls
    rs, ri = topk_similarity_ref(x, x, 12, exclude=ex)
    assert topk_mismatch(x, x, s, i, rs, ri, exclude=ex) is None


@native
def test_selector_errors():
    C = topk_cpu._C
    sel = C.TopkSelector(4, 3)
    with pytest.raises(ValueError, match="rows must be in"):
        sel.reset(5)
    sel.reset(2)
    with pytest.raises(TypeError, match="scores must be a native float32"):
        sel.push(torch.zeros(2, 8, dtype=torch.float64).numpy(), 0)
    with pytest.raises(ValueError, match="scores must have shape"):
        sel.push(torch.zeros(3, 8).numpy(), 0)
    sel.push(torch.zeros(2, 8).numpy(), 8)
    with pytest.raises(ValueError, match="increasing index order"):
        sel.push(torch.zeros(2, 8).numpy(), 0)
    sel.reset(2)
    sel.push(torch.zeros(2, 2).numpy(), 0)
    with pytest.raises(ValueError, match="fewer than k=3"):
        sel.finish(torch.zeros(2, 3).numpy(), torch.zeros(2, 3, dtype=torch.int64).numpy())
    with pytest.raises(ValueError, match="gemm must be"):
        topk_cpu.topk_similarity_cpu(torch.ones(2, 3), torch.ones(4, 3), 2, gemm="blas")


def test_fallback_without_native_extension():
    code = (
        "import torch\n"
        "from rest_fast.ops import topk_cpu, topk_similarity, topk_similarity_ref\n"
        "assert not topk_cpu.NATIVE_AVAILABLE and 'REST_FAST_NO_NATIVE' in topk_cpu.NATIVE_ERROR\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(200, 8, generator=g)\n"
        "ex = torch.arange(200)\n"
        "s, i = topk_similarity(x, x, 7, exclude=ex)\n"
        "rs, ri = topk_similarity_ref(x, x, 7, exclude=ex)\n"
        "assert torch.equal(s, rs) and torch.equal(i, ri)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "REST_FAST_NO_NATIVE": "1", "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_topk_cpu_does_not_import_the_dispatching_module():
    """The shared input check lives below both paths (rest_fast.ops._topk_check): no topk <-> topk_cpu cycle."""
    from pathlib import Path

    from test_layering import _imports

    import rest_fast.ops as ops

    here = Path(ops.__file__).parent
    for name in ("topk_cpu.py", "_topk_check.py"):
        mods = [m for _, m in _imports(here / name)]
        assert "rest_fast.ops.topk" not in mods and "rest_fast.ops" not in mods, (name, mods)
