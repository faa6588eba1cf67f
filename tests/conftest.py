"""Test configuration shared by every test module.

Triton kernels run on CPU through the interpreter: ``TRITON_INTERPRET`` must be set before any
Triton kernel module is imported, so it is set here, first. Ops read it at call time, so a test
that only needs the reference path can ``monkeypatch.setenv("TRITON_INTERPRET", "0")``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Two cores on CI: keep intra-op threads from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton decides interpreted-or-compiled when a kernel is *defined* (module import). Import every
# kernel module now, while TRITON_INTERPRET=1 holds, so a test that later switches a call to the
# reference path with TRITON_INTERPRET=0 cannot be the first importer and break the others.
if os.environ["TRITON_INTERPRET"] == "1":
    for _mod in ("dwconv3d", "topk", "rerank"):
        try:
            importlib.import_module(f"rest_fast.kernels.{_mod}")
        except ImportError:  # triton missing: the ops fall back to their references
            pass

# Tolerances (atol, rtol) for comparing a low-precision fast path with a float64 reference.
# fp32 accumulation everywhere; the error is dominated by rounding the inputs/outputs to `dtype`.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """allclose with the dtype's tolerance, reporting how many elements miss and by how much."""
    atol, rtol = tolerance(dtype)
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        n = int(bad.sum())
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{name}: {n}/{a.numel()} elements differ (max |diff| {float(diff.max()):.3g}, atol {atol}, rtol {rtol}); "
            f"first at {idx}: {float(a[idx]):.6g} vs {float(e[idx]):.6g}"
        )


@pytest.fixture(autouse=True)
def _strict_kernels_in_gpu_tests(request, monkeypatch):
    """GPU tests run strict (``REST_FAST_STRICT=1``): a kernel that fails to compile or launch raises
    instead of falling back, so a CUDA test never compares the reference with itself."""
    if "gpu" in request.keywords:
        monkeypatch.setenv("REST_FAST_STRICT", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
