"""CPU path of :func:`rest_fast.ops.topk_similarity`: BLAS GEMM blocks + a compiled selection step.

:func:`topk_similarity_cpu` computes fp32 score blocks ``[block_m, block_n]`` with a BLAS sgemm into one reused
buffer and hands each block to ``rest_fast._C.TopkSelector`` (C++, no torch link: it reads the buffer in place
through numpy). The sgemm is numpy's when numpy is built on OpenBLAS/MKL/Accelerate (the OpenBLAS of the
numpy wheels is ~14% faster than torch's MKL on AMD CPUs: MKL does not pick its best kernels there; it is the
BLAS faiss-cpu uses too), else ``torch.mm``; ``gemm=`` overrides. numpy's BLAS threads are set to
``threads`` through ``threadpoolctl`` (a base dependency; if it fails to import, the BLAS default: all cores,
one worker, reported by :func:`degraded_reason`). Per query row the selector keeps the k-th best score so
far, ``τ``, and packs only scores ``> τ`` (keys arrive in index order, so an equal score ranks below the
current k-th); a full candidate buffer is cut back to ``k`` with ``nth_element``. Order and ties are those of
the GPU kernel and the reference: score descending, then lower key index. Memory is
``O(block_m · (block_n + 2k))``; ``M × N`` scores are never materialised.

Precision (``notes/PRECISION.md``): fp16/bf16 features are upcast to fp32 blocks for the GEMM (keys once,
when they fit in ``key_budget`` bytes; else per block), scores accumulate in fp32; fp32 inputs stay fp32.

When the native extension is absent (``REST_FAST_NO_NATIVE=1`` build, or a build without
``TopkSelector``), :data:`NATIVE_AVAILABLE` is False and :func:`rest_fast.ops.topk_similarity` uses the
pure-torch reference :func:`rest_fast.ops.topk.topk_similarity_ref` (the oracle of the tests) instead.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from rest_fast._native import load_native
from rest_fast.ops._topk_check import check_topk_inputs

__all__ = ["topk_similarity_cpu", "NATIVE_AVAILABLE", "NATIVE_ERROR", "DEFAULT_GEMM", "degraded_reason"]

_C, NATIVE_ERROR = load_native("TopkSelector")
NATIVE_AVAILABLE = _C is not None

_FAST_NUMPY_BLAS = ("openblas", "mkl", "accelerate", "blis")


def _numpy_blas_name() -> str:
    try:
        cfg = np.show_config(mode="dicts")
        return str(cfg["Build Dependencies"]["blas"]["name"]).lower()
    except Exception:  # noqa: BLE001 - old numpy / unusual build: unknown
        return ""


NUMPY_BLAS = _numpy_blas_name()
DEFAULT_GEMM = "numpy" if any(b in NUMPY_BLAS for b in _FAST_NUMPY_BLAS) else "torch"

try:  # a base dependency; guarded so a broken install degrades (reported by `rest-fast info`) instead of failing
    from threadpoolctl import threadpool_limits as _threadpool_limits

    THREADPOOLCTL_ERROR: str | None = None
except ImportError as _e:  # without it numpy's BLAS uses its default thread count and one worker runs
    _threadpool_limits = None
    THREADPOOLCTL_ERROR = f"{type(_e).__name__}: {_e}"


def degraded_reason() -> str | None:
    """Why :func:`topk_similarity_cpu` cannot run its fastest path here (``None``: it can): the
    parallel query-block workers need the native selector, numpy's sgemm on a fast BLAS and threadpoolctl."""
    if not NATIVE_AVAILABLE:
        return f"pure-torch reference instead of BLAS blocks + C++ selection: {NATIVE_ERROR}"
    if THREADPOOLCTL_ERROR is not None:
        return ("one BLAS-threaded worker instead of parallel query blocks: threadpoolctl does not import "
                f"({THREADPOOLCTL_ERROR}; pip install threadpoolctl)")
    if DEFAULT_GEMM != "numpy":
        return (f"torch.mm GEMM in one worker instead of parallel query blocks: numpy's BLAS is "
                f"{NUMPY_BLAS or 'unknown'}, not one of {', '.join(_FAST_NUMPY_BLAS)}")
    return None

_BLOCK_BYTES = 16 << 20  # score block: big enough for an efficient GEMM, small enough to stay near L3


def _blocks(M: int, N: int, k: int) -> tuple[int, int]:
    """(block_m, block_n): whole key rows per block when they fit, else 8192-key column blocks."""
    block_n = N if N <= 16384 else 8192
    block_m = max(16, min(1024, _BLOCK_BYTES // (4 * max(block_n, 1))))
    # The selector's buffers are block_m · (k + max(k, 256)) · 8 bytes: keep them within ~64 MB.
    block_m = max(16, min(block_m, (64 << 20) // (8 * (2 * k + 256))))
    return min(block_m, max(M, 1)), block_n


def topk_similarity_cpu(queries: Tensor, keys: Tensor, k: int, *, exclude: Tensor | None = None,
                        block_m: int | None = None, block_n: int | None = None, threads: int | None = None,
                        key_budget: int = 1 << 30, gemm: str | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product on CPU tensors with the native selector; see :func:`topk_similarity`.

    Args:
        queries: ``[M, d]`` float32 / float16 / bfloat16 on CPU (any strides).
        keys: ``[N, d]`` same, CPU.
        k: neighbours per query, ``1 ≤ k ≤`` eligible keys.
        exclude: optional int64 ``[M]``, one key index per query to skip (``-1`` = none).
        block_m, block_n: tile sizes (tests use small ones to cross block edges); default by shape.
        threads: selection threads (default ``torch.get_num_threads()``, as the GEMM).
        key_budget: bytes allowed for an fp32 copy of ``keys`` made once (fp16/bf16 or strided keys).
        gemm: ``"numpy"`` or ``"torch"`` sgemm (default :data:`DEFAULT_GEMM`).

    Returns:
        ``(scores, indices)``: float32 ``[M, k]`` sorted descending, int64 ``[M, k]``; lower index first
        among equal scores.
    """
    if not NATIVE_AVAILABLE:
        raise RuntimeError(f"native top-k selection unavailable: {NATIVE_ERROR}")
    exclude = check_topk_inputs(queries, keys, k, exclude)
    if queries.device.type != "cpu":
        raise ValueError(f"topk_similarity_cpu needs CPU tensors, got {queries.device}")
    M, N = queries.shape[0], keys.shape[0]
    out_s = torch.empty(M, k, dtype=torch.float32)
    out_i = torch.empty(M, k, dtype=torch.int64)
    if M == 0:
        return out_s, out_i
    bm, bn = _blocks(M, N, k)
    bm, bn = max(1, block_m or bm), max(1, block_n or bn)
    bm = min(bm, M)
    nthreads = max(1, threads or torch.get_num_threads())
    f32 = torch.float32
    # fp32 keys in place when they are already fp32 and row-contiguous; else one fp32 copy if it fits.
    whole = keys.dtype == f32 and keys.stride(1) == 1
    if not whole and N * keys.shape[1] * 4 <= key_budget:
        keys, whole = keys.to(f32).contiguous(), True
    gemm = gemm or DEFAULT_GEMM
    if gemm not in ("numpy", "torch"):
        raise ValueError(f"gemm must be 'numpy' or 'torch', got {gemm!r}")
    key_blocks = [(n0, keys[n0:n0 + bn]) for n0 in range(0, N, bn)]
    if whole and gemm == "numpy":
        key_blocks = [(n0, kb.numpy()) for n0, kb in key_blocks]
    ex_np = exclude.contiguous().numpy() if exclude is not None else None
    # With numpy's BLAS and threadpoolctl: `nthreads` workers, each running whole query blocks with a
    # single-threaded sgemm and its own selector (GIL released in both). No barrier per block, and no BLAS
    # worker spinning while the selection runs, which on 2 cores costs more than the selection itself.
    workers = nthreads if (gemm == "numpy" and _threadpool_limits is not None) else 1
    if workers > 1:
        bm = max(1, min(bm, -(-M // (2 * workers))))  # at least two blocks per worker
    inner = 1 if workers > 1 else nthreads  # threads inside one block (sgemm, selection)
    starts = iter(range(0, M, bm))
    lock = threading.Lock()

    def worker() -> None:
        sbuf = torch.empty(bm * min(bn, N), dtype=f32)
        sbuf_np = sbuf.numpy()
        sel = _C.TopkSelector(bm, k)
        while True:
            with lock:
                m0 = next(starts, None)
            if m0 is None:
                return
            q = queries[m0:m0 + bm].to(f32)
            mb = q.shape[0]
            if gemm == "numpy":
                q = q.numpy()
            sel.reset(mb)
            ex = ex_np[m0:m0 + mb] if ex_np is not None else None
            for n0, kb in key_blocks:
                if not whole:
                    kb = kb.to(f32)
                    kb = kb.numpy() if gemm == "numpy" else kb
                nb = kb.shape[0]
                if gemm == "numpy":
                    s = np.matmul(q, kb.T, out=sbuf_np[: mb * nb].reshape(mb, nb))
                else:
                    s = torch.mm(q, kb.T, out=sbuf[: mb * nb].view(mb, nb)).numpy()
                sel.push(s, n0, ex, inner)
            sel.finish(out_s[m0:m0 + mb].numpy(), out_i[m0:m0 + mb].numpy(), inner)

    limits = (_threadpool_limits(inner, user_api="blas") if gemm == "numpy" and _threadpool_limits
              else contextlib.nullcontext())
    with limits:
        if workers == 1:
            worker()
        else:
            with ThreadPoolExecutor(workers) as pool:
                for f in [pool.submit(worker) for _ in range(workers)]:
                    f.result()
    return out_s, out_i
