"""Loud fallbacks: CUDA tensors that end up on the pure-torch reference warn once, naming the reason;
``rest-fast info`` lists each op's path. CUDA tensors are stood in for by objects with a CUDA ``device``
(the decision reads only ``.device``), so this runs without a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

import rest_fast.ops  # noqa: F401 - registers the ops
from rest_fast.ops import _dispatch as d


class FakeCuda:
    device = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(d, "_WARNED", set())
    monkeypatch.setattr(d, "KERNEL_RUN_ERRORS", {})


def _decide(op="topk_similarity", kernels="topk"):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ok = d.triton_path(op, kernels, FakeCuda(), FakeCuda())
    return ok, [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]


def test_cuda_under_interpreter_warns_once(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, msgs = _decide()
    assert not ok and len(msgs) == 1 and "TRITON_INTERPRET=1" in msgs[0] and "topk_similarity" in msgs[0]
    assert _decide() == (False, [])  # once


def test_cuda_with_unimportable_kernels_warns(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(d, "load_kernels", lambda name: None)
    monkeypatch.setitem(d.KERNEL_IMPORT_ERRORS, "rerank", "ImportError('no triton')")
    ok, msgs = _decide("rerank_captions", "rerank")
    assert not ok and len(msgs) == 1 and "no triton" in msgs[0]


def test_cuda_takes_compiled_path_when_possible(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _decide("temporal_dwconv3d", "dwconv3d") == (True, [])


def test_kernel_failure_inside_triton_falls_back_once(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    err = type("CompilationError", (Exception,), {"__module__": "triton.compiler.errors"})

    def fast(x):
        raise err("ptxas failed")

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert d.run_or_fallback("topk_similarity", fast, lambda x: "reference", FakeCuda()) == "reference"
    assert any("ptxas failed" in str(w.message) for w in rec)
    assert "ptxas failed" in d.KERNEL_RUN_ERRORS["topk_similarity"]
    ok, msgs = _decide()  # later calls stay on the reference, with their own one warning
    assert not ok and "failed earlier" in msgs[0]


def test_errors_outside_triton_propagate():
    def fast(x):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        d.run_or_fallback("topk_similarity", fast, lambda x: "reference", FakeCuda())
    with pytest.raises(RuntimeError):  # a Triton error on CPU (interpreter) is a bug to see, not to hide
        d.run_or_fallback("topk_similarity", lambda x: (_ for _ in ()).throw(RuntimeError("x")),
                          lambda x: "reference", torch.zeros(1))


def test_op_paths_lists_every_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    paths = d.op_paths()
    assert set(paths) >= {"temporal_dwconv3d", "topk_similarity", "rerank_captions"}
    for p in paths.values():
        assert p.startswith("cuda: ") and " · cpu: " in p
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "cpu: Triton (interpreted)" in d.op_paths()["rerank_captions"]


def test_gpu_tests_collect_without_optional_packages():
    # The bare GPU machine has torch/triton/transformers only: the CUDA test module must collect there.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            "for m in ('av', 'open_clip', 'faiss', 'nvidia.dali', 'webdataset', 'hypothesis', 'PIL'):\n"
            "    sys.modules[m] = None\n"
            "import pytest\n"
            "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/test_kernels_cuda.py']))\n")
    # No plugin autoload: installed plugins (hypothesis's) would import the blocked modules themselves.
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
