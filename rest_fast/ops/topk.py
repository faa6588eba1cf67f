"""Exact inner-product top-k similarity without materialising the ``M × N`` score matrix.

Public entry point :func:`topk_similarity`; blocked reference :func:`topk_similarity_ref` (the CPU path when
the Triton interpreter is off, the test oracle and the benchmark baseline); Triton launcher
:func:`topk_similarity_triton`.

Ordering and ties
-----------------
Results are ordered by score descending and, among *equal* fp32 scores, by key index ascending (lower index
first). Both paths implement this with one exact total order: each (score, index) pair is packed into an
``int64`` key ``(ordered_bits(score) << 32) | (2**32 - 1 - index)`` and selected with ``torch.topk`` on those
keys, so the result is deterministic whatever order candidates were produced in. ``-0.0`` ranks as ``+0.0``.
Scores are computed with fp32 accumulation; the Triton kernel and the reference may differ in the last bits
of a score (summation order), so two keys that tie in one may not tie in the other.

Precision contract (retrieval)
------------------------------
The trainer passes L2-normalised CLIP features stored rounded to fp16: the kernels read fp16 tiles and
accumulate in fp32 (tensor cores, fp32 accumulator); fp32 inputs are computed in exact fp32 (``ieee``, no TF32);
the CPU path upcasts fp16 blocks to fp32 for the GEMM. "Exact" means the exact top-k of the fp32-accumulated dot
products of the given (rounded) inputs, ties broken by lower index; :func:`topk_mismatch` checks a result against
a float64 re-score of the same inputs, comparing ids only outside tie groups of accumulation-order size.
float64 inputs are served by the reference on every path.

Triton design and cost model
----------------------------
Notation: ``M`` queries, ``N`` keys, dimension ``d``, ``k`` neighbours. The GEMM floor is ``2·M·N·d`` flops.

1. **Threshold pass** (``group_max_kernel``): keys are split into ``NG = 2k`` groups of ``G`` keys spread
   over the whole key range (group ``g`` = keys ``g + j·⌊N/G⌋``), covering ``S = NG·G ≈ f·N`` keys
   (``f`` = ``sample_fraction``, default 0.5). For each query the kernel writes the ``NG`` group maxima
   (``M·NG`` floats); ``torch.topk`` takes their k-th largest, ``τ``. Since the k largest group maxima are
   scores of k *distinct* eligible keys, ``τ ≤`` the true k-th score: exact, whatever the data.
   Cost: ``f`` GEMMs + reading ``M·2k`` floats.
2. **Filter pass** (``filter_kernel``): the full GEMM; each score tile is compared with ``τ - ε`` (``ε``
   covers the rounding difference between the two passes, ``d·2⁻²¹·‖q‖·max‖k‖``, four times the fp32
   summation bound) and survivors are appended to a ``[M, CAP]`` candidate buffer. For i.i.d. scores the
   expected number of survivors per query is ``(N/S)·NG·ln(NG/(NG-k)) ≈ 1.39·k/f`` (≈ 5.5k for ``f`` = 0.5);
   ``CAP`` is twice that. Cost: 1 GEMM + ``M·cand·8`` bytes written.
3. **Select**: ``torch.topk`` on the packed keys of ``[M, CAP]`` — ``O(M·CAP)`` memory traffic plus the
   final ``k``-sort that every exact method pays.
4. **Overflow**: the counters count past ``CAP``; rows that overflowed (clustered data, massive ties) are
   re-filtered with a buffer as wide as their exact count, so the result stays exact, only slower.

Total ≈ ``(1 + f)`` GEMMs plus ``O(M·k)`` memory traffic, against chunked ``mm`` + ``topk``, which writes and
re-reads all ``M·N`` scores and runs a radix select over each full row. Queries are processed in chunks so
that buffers stay within a memory budget. When ``N`` is too small for the threshold to pay off
(``N < 16·k``), pass 1 is skipped and every eligible key is a candidate (``CAP = N``).

The CPU reference uses the same idea with torch ops: fp32 matmul blocks, a running per-query threshold (the
current k-th best), ``torch.topk`` only on the block's survivors, and packed-key merges on
``[M, k + survivors]`` buffers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rest_fast.ops import topk_cpu
from rest_fast.ops._device import on_input_device
from rest_fast.ops._dispatch import (
    interpreter_safe,
    kernels_unavailable,
    load_kernels,
    next_pow2,
    register_op,
    run_or_fallback,
    triton_path,
)
from rest_fast.ops._topk_check import TOPK_DTYPES, check_topk_inputs

__all__ = [
    "topk_similarity",
    "topk_similarity_ref",
    "topk_similarity_triton",
    "triton_available",
    "pack_keys",
    "unpack_scores",
    "unpack_indices",
    "topk_mismatch",
]

_DTYPES = TOPK_DTYPES
_REF_DTYPES = _DTYPES + (torch.float64,)
_LOW32 = 0xFFFFFFFF
_KEY_MIN = torch.iinfo(torch.int64).min


# ----------------------------------------------------------------------------------------------------
# packed (score, index) keys: one exact total order for both paths
# ----------------------------------------------------------------------------------------------------


def pack_keys(scores: Tensor, indices: Tensor) -> Tensor:
    """Pack fp32 ``scores`` and non-negative ``indices`` (< 2**32) into int64 keys.

    Larger key = larger score, then smaller index. ``-0.0`` is packed as ``+0.0``.
    """
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(torch.int64) << 32) | (_LOW32 - indices.to(torch.int64))


def unpack_scores(keys: Tensor) -> Tensor:
    """Inverse of :func:`pack_keys` for the score part (float32)."""
    hi = (keys >> 32).to(torch.int32)
    return torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi).view(torch.float32)


def unpack_indices(keys: Tensor) -> Tensor:
    """Inverse of :func:`pack_keys` for the index part (int64)."""
    return _LOW32 - (keys & _LOW32)


# ----------------------------------------------------------------------------------------------------
# reference: blocked matmul + running threshold + packed-key merges
# ----------------------------------------------------------------------------------------------------


def _mask_excluded(s: Tensor, ex: Tensor | None, n0: int) -> None:
    """Set ``s[r, ex[r] - n0] = -inf`` for rows whose excluded key lies in this block (in place)."""
    if ex is None:
        return
    local = ex - n0
    rows = torch.nonzero((local >= 0) & (local < s.shape[1])).squeeze(1)
    if rows.numel():
        s[rows, local[rows]] = float("-inf")


def _seed_threshold(s: Tensor, k: int) -> Tensor:
    """A lower bound of each row's k-th largest score in ``s`` ``[rows, nb]`` (``nb >= k``).

    The k-th largest of ``2k`` disjoint group maxima is reached by k distinct entries, so it bounds the
    k-th largest entry from below; one ``amax`` pass plus a ``topk`` over ``2k`` values is much cheaper than a
    ``topk`` over the block. Narrow blocks fall back to the exact k-th value.
    """
    rows, nb = s.shape
    ng = 2 * k
    G = nb // ng
    if G < 2 or not s.is_contiguous():
        return torch.topk(s, k, dim=1, sorted=False).values.min(1).values
    gmax = s.as_strided((rows, ng, G), (s.stride(0), G, 1)).amax(2)  # groups of G adjacent columns
    return torch.topk(gmax, k, dim=1, sorted=False).values.min(1).values


def _dense_hits(s: Tensor, tau: Tensor, n0: int) -> Tensor | None:
    """Packed keys of the entries ``s >= tau[:, None]``, left-aligned per row in a ``[rows, max hits]``
    int64 tensor padded with the smallest key; ``None`` when nothing survives.

    Survivors are found with one compare + ``nonzero`` (cheaper than a per-row ``topk`` on CPU) and only
    they are packed.
    """
    rows, nb = s.shape
    flat = torch.nonzero(torch.ge(s, tau[:, None]).view(-1)).squeeze(1)  # row-major: rows come sorted
    if flat.numel() == 0:
        return None
    r = flat // nb
    counts = torch.bincount(r, minlength=rows)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(flat.numel(), device=s.device) - start.index_select(0, r)
    out = torch.full((rows, int(counts.max())), _KEY_MIN, dtype=torch.int64, device=s.device)
    keys = pack_keys(s.view(-1).index_select(0, flat), flat - r * nb + n0)
    out.view(-1).index_copy_(0, r * out.shape[1] + pos, keys)
    return out


def topk_similarity_ref(queries: Tensor, keys: Tensor, k: int, *, exclude: Tensor | None = None,
                        block_m: int = 4096, block_n: int = 4096) -> tuple[Tensor, Tensor]:
    """Blocked exact top-k by inner product (pure torch, any device); see :func:`topk_similarity`.

    Computes in ``torch.promote_types(dtype, float32)`` (float64 inputs are accepted here; their scores are
    rounded to float32 before ranking). Memory is ``O(block_m · (block_n + k))``, never ``M × N``.
    Per query block it keeps a pool of packed keys and a lower bound ``τ`` of the k-th best score (seeded
    from group maxima of the first block, then the pool's k-th key); each key block's scores are compared with ``τ`` and only the survivors are
    packed and pooled; the pool is cut back to ``k`` (one ``topk`` on packed keys) when it reaches ``2k``.
    """
    exclude = check_topk_inputs(queries, keys, k, exclude, _REF_DTYPES)
    M, N = queries.shape[0], keys.shape[0]
    device = queries.device
    out_s = torch.empty(M, k, dtype=torch.float32, device=device)
    out_i = torch.empty(M, k, dtype=torch.int64, device=device)
    if M == 0:
        return out_s, out_i
    ct = torch.promote_types(torch.promote_types(queries.dtype, keys.dtype), torch.float32)
    block_n = max(block_n, 1)
    block_m = max(block_m, 1)
    key_blocks = None
    sbuf = torch.empty(min(block_m, M) * min(block_n, N), dtype=torch.float32, device=device)
    for m0 in range(0, M, block_m):
        q = queries[m0:m0 + block_m].to(ct)
        ex = exclude[m0:m0 + block_m] if exclude is not None else None
        mb = q.shape[0]
        tau = torch.full((mb,), float("-inf"), dtype=torch.float32, device=device)
        pool: list[Tensor] = []
        width = 0
        if key_blocks is None and keys.dtype != ct and M > block_m:
            key_blocks = [keys[n0:n0 + block_n].to(ct) for n0 in range(0, N, block_n)]  # convert once
        for bi, n0 in enumerate(range(0, N, block_n)):
            kb = key_blocks[bi] if key_blocks is not None else keys[n0:n0 + block_n].to(ct)
            nb = kb.shape[0]
            if ct == torch.float32:
                # Reused output buffer: fresh multi-MB allocations cost page faults on every block.
                s = torch.mm(q, kb.T, out=sbuf.view(-1)[: mb * nb].view(mb, nb))
            else:
                s = (q @ kb.T).float()
            _mask_excluded(s, ex, n0)
            if width == 0 and s.shape[1] >= k:
                tau = _seed_threshold(s, k)
            hits = _dense_hits(s, tau, n0)
            if hits is None:
                continue
            pool.append(hits)
            width += pool[-1].shape[1]
            if width > k and (width >= 2 * k or n0 + block_n < N):
                merged = torch.topk(torch.cat(pool, 1), k, dim=1, sorted=False).values
                pool, width = [merged], k
                tau = unpack_scores(merged.min(1).values)
        best = torch.topk(torch.cat(pool, 1), k, dim=1, sorted=True).values
        out_s[m0:m0 + mb] = unpack_scores(best)
        out_i[m0:m0 + mb] = unpack_indices(best)
    return out_s, out_i


# ----------------------------------------------------------------------------------------------------
# Triton launcher
# ----------------------------------------------------------------------------------------------------


def _kernels():
    return load_kernels("topk")


def triton_available() -> bool:
    """Whether the Triton kernels import; if not, ``KERNEL_IMPORT_ERRORS`` says why and the reference serves."""
    return _kernels() is not None


def _plan(N: int, k: int, sample_fraction: float) -> tuple[int, int, int, int]:
    """(NG, G, J_STRIDE, CAP) for the threshold pass; NG == 0 means "no threshold, CAP = N"."""
    ng = 2 * k
    G = int(sample_fraction * N) // ng
    if N < 16 * k or G < 2:
        return 0, 0, 0, N
    expected = (N / (ng * G)) * ng * math.log(ng / (ng - k))
    cap = min(N, -(-int(2 * expected + 64) // 64) * 64)
    return ng, G, N // G, cap


def _memory_budget(device: torch.device) -> int:
    # a quarter of free + cached-free device memory, between 256 MiB and 8 GiB (rest_fast.ops.memory)
    from rest_fast.ops.memory import device_memory_budget

    return device_memory_budget(device, cpu=256 << 20, cap=8 << 30)


def _tiles(device_type: str, dtype: torch.dtype, D: int) -> dict:
    """Tile configuration of both kernels for one device type and input dtype.

    CUDA tiles are per dtype and checked by ``tests/test_kernels_aot.py`` (sm_90 and sm_80, zero spills,
    shared memory within the per-block limit): half-precision operands feed tensor cores with a
    ``128 × 64`` fp32 accumulator over 8 warps (32 values per thread: with 4 warps, 64 per thread, the
    compaction branch spilled); fp32 operands take the exact
    (``ieee``, FMA) path, whose operands also live in registers, so its tiles are ``64 × 64`` with a
    ``BK = 32`` slice over 8 warps (with 4 warps its dense variant spilled on sm_90), and the group-max pass
    takes ``32 × 64`` (``64 × 64`` spilled a few bytes with triton 3.6 on sm_80 or sm_90). ``BM · BN`` is at least the thread count: the filter kernel's per-element atomics
    rely on no element being replicated across threads.
    """
    if device_type == "cuda":
        if dtype == torch.float32:
            return dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=8, num_stages=2,
                        GBM=32, BG=64, GBK=32, g_warps=4, g_stages=2)
        return dict(BM=128, BN=64, BK=64, GROUP_M=8, num_warps=8, num_stages=3,
                    GBM=64, BG=64, GBK=64, g_warps=4, g_stages=3)
    # Interpreter: cost is per op, so few large tiles.
    bk = min(128, max(16, next_pow2(D)))
    return dict(BM=64, BN=64, BK=bk, GROUP_M=4, num_warps=4, num_stages=1,
                GBM=64, BG=64, GBK=bk, g_warps=4, g_stages=1)


def _group_max_launch(q: Tensor, keys: Tensor, ex: Tensor | None, gmax: Tensor, ng: int, G: int, jstride: int,
                      t: dict, ieee: bool, upcast: bool) -> tuple[tuple, tuple, dict]:
    """``(grid, args, kwargs)`` of one ``group_max_kernel`` launch (shared with :mod:`rest_fast.ops.aot`)."""
    mb, D = q.shape
    grid = (-(-mb // t["GBM"]), -(-ng // t["BG"]))
    args = (q, keys, ex if ex is not None else gmax, gmax, mb, keys.shape[0], D, ng, G, jstride,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), gmax.stride(0))
    kwargs = dict(HAS_EX=ex is not None, IEEE=ieee, UPCAST=upcast, BM=t["GBM"], BG=t["BG"], BK=t["GBK"],
                  num_warps=t["g_warps"], num_stages=t["g_stages"])
    return grid, args, kwargs


def _filter_launch(q: Tensor, keys: Tensor, ex: Tensor | None, tau: Tensor, cnt: Tensor, cs: Tensor, ci: Tensor,
                   t: dict, ieee: bool, upcast: bool, dense: bool) -> tuple[tuple, tuple, dict]:
    """``(grid, args, kwargs)`` of one ``filter_kernel`` launch (shared with :mod:`rest_fast.ops.aot`)."""
    M, D = q.shape
    N = keys.shape[0]
    cap = cs.shape[1]
    grid = (-(-M // t["BM"]) * -(-N // t["BN"]),)
    args = (q, keys, ex if ex is not None else cnt, tau, cnt, cs, ci, M, N, D, cap,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1))
    kwargs = dict(HAS_EX=ex is not None, IEEE=ieee, UPCAST=upcast, DENSE=dense, BM=t["BM"], BN=t["BN"],
                  BK=t["BK"], GROUP_M=t["GROUP_M"], num_warps=t["num_warps"], num_stages=t["num_stages"])
    return grid, args, kwargs


def _filter_select(kern, q: Tensor, keys: Tensor, ex: Tensor | None, tau: Tensor, k: int, cap: int,
                   t: dict, ieee: bool, upcast: bool, dense: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Run the filter kernel with buffer width ``cap``; return (scores, indices, count) of the selection.

    ``dense`` (``cap == N``, no threshold): every key is written at its own slot. Rows whose count exceeds
    ``cap`` (or, defensively, falls under ``k``) hold garbage and are redone by the caller.
    """
    M = q.shape[0]
    N = keys.shape[0]
    dev = q.device
    cnt = torch.full((M,), N if dense else 0, dtype=torch.int32, device=dev)
    cs = torch.empty(M, cap, dtype=torch.float32, device=dev)
    ci = torch.empty(M, cap, dtype=torch.int32, device=dev)
    grid, args, kwargs = _filter_launch(q, keys, ex, tau, cnt, cs, ci, t, ieee, upcast, dense)
    kern.filter_kernel[grid](*args, **kwargs)
    valid = torch.arange(cap, device=dev)[None, :] < cnt[:, None].to(torch.int64)
    packed = torch.where(valid, pack_keys(cs, ci.clamp_min(0)), _KEY_MIN)
    kk = min(k, cap)
    best = torch.topk(packed, kk, dim=1, sorted=True).values
    return unpack_scores(best), unpack_indices(best), cnt


def _max_rows(cap: int) -> int:
    """Rows per filter launch so that in-kernel int32 buffer offsets (``row · cap + slot``) cannot overflow."""
    return max(1, (2**31 - 1) // max(1, cap))


@on_input_device
def topk_similarity_triton(queries: Tensor, keys: Tensor, k: int, *, exclude: Tensor | None = None,
                           sample_fraction: float = 0.5, cap: int | None = None,
                           memory_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """Triton launcher for :func:`topk_similarity` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``sample_fraction`` sets the share of keys scored by the threshold pass; ``cap`` overrides the candidate
    buffer width (tests use a tiny one to exercise the overflow path); ``memory_budget`` (bytes) bounds the
    per-chunk buffers. See the module docstring for the algorithm.
    """
    exclude = check_topk_inputs(queries, keys, k, exclude)
    kern = _kernels()
    if kern is None:
        raise kernels_unavailable("topk")
    M, D = queries.shape
    N = keys.shape[0]
    dev = queries.device
    out_s = torch.empty(M, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(M, k, dtype=torch.int64, device=dev)
    if M == 0:
        return out_s, out_i
    dt = torch.promote_types(queries.dtype, keys.dtype)
    q_all, keys = queries.to(dt), keys.to(dt)
    # The interpreter's tl.dot mishandles bfloat16 operands: upcast the tiles there (CUDA keeps bf16 MMA).
    upcast = dev.type != "cuda" and dt == torch.bfloat16
    ieee = dt == torch.float32 or upcast
    t = _tiles(dev.type, dt, D)
    ng, G, jstride, cap_auto = _plan(N, k, sample_fraction)
    cap = min(N, max(k, cap)) if cap is not None else cap_auto
    dense = ng == 0 and cap == N
    # Rounding margin between the two passes (see module docstring).
    if ng:
        kmax = float(keys.float().norm(dim=1).max())
        eps_all = q_all.float().norm(dim=1) * (D * 2.0**-21 * kmax)
    budget = memory_budget or _memory_budget(dev)
    per_row = cap * 32 + ng * 8 + 64
    mc = max(t["BM"], (budget // per_row) // t["BM"] * t["BM"])
    mc = min(mc, _max_rows(cap))
    for m0 in range(0, M, mc):
        q = q_all[m0:m0 + mc]
        ex = exclude[m0:m0 + mc].contiguous() if exclude is not None else None
        mb = q.shape[0]
        if ng:
            gmax = torch.empty(mb, ng, dtype=torch.float32, device=dev)
            grid, args, kwargs = _group_max_launch(q, keys, ex, gmax, ng, G, jstride, t, ieee, upcast)
            kern.group_max_kernel[grid](*args, **kwargs)
            tau = torch.topk(gmax, k, dim=1, sorted=False).values.min(1).values - eps_all[m0:m0 + mb]
            del gmax
        else:
            tau = torch.full((mb,), float("-inf"), dtype=torch.float32, device=dev)
        s, i, cnt = _filter_select(kern, q, keys, ex, tau, k, cap, t, ieee, upcast, dense)
        bad = torch.nonzero((cnt > cap) | (cnt < k)).squeeze(1)
        if bad.numel():
            # Overflow (or a threshold that let fewer than k through — impossible by construction, kept as
            # a safety net): redo those rows with a buffer as wide as their exact count, or no threshold.
            redo_dense = bool((cnt[bad] < k).any())
            tau_b = torch.where(cnt[bad] < k, float("-inf"), tau[bad])
            cap_b = N if redo_dense else int(cnt[bad].max())
            qb = q[bad]
            exb = ex[bad] if ex is not None else None
            step = min(max(1, budget // (cap_b * 32 + 64)), _max_rows(cap_b))
            for r0 in range(0, bad.numel(), step):
                sl = slice(r0, r0 + step)
                sb, ib, _ = _filter_select(kern, qb[sl], keys, exb[sl] if exb is not None else None,
                                           tau_b[sl].contiguous(), k, cap_b, t, ieee, upcast, redo_dense)
                s[bad[sl]] = sb
                i[bad[sl]] = ib
        out_s[m0:m0 + mb] = s
        out_i[m0:m0 + mb] = i
    return out_s, out_i


# ----------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------


def _cpu_path() -> str:
    if topk_cpu.NATIVE_AVAILABLE:
        return "BLAS GEMM blocks + C++ selection (rest_fast._C.TopkSelector); float64: pure-torch reference"
    return f"pure-torch reference (native selection unavailable: {topk_cpu.NATIVE_ERROR})"


register_op("topk_similarity", "topk", _cpu_path)


def _dispatch(queries: Tensor, keys: Tensor, k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    # float64 is served by the reference on every path (the kernels take fp32/fp16/bf16), so a result
    # never depends on the execution path.
    low = queries.dtype != torch.float64 and keys.dtype != torch.float64
    if low and triton_path("topk_similarity", "topk", queries, keys):
        q, kk, ex = interpreter_safe(queries, keys, exclude)
        return run_or_fallback("topk_similarity", topk_similarity_triton, topk_similarity_ref, q, kk, k, exclude=ex)
    if low and queries.device.type == "cpu" and keys.device.type == "cpu":
        if topk_cpu.NATIVE_AVAILABLE:
            return topk_cpu.topk_similarity_cpu(queries, keys, k, exclude=exclude)
    return topk_similarity_ref(queries, keys, k, exclude=exclude)


# Opaque to torch.compile (one node, no graph break); the kernels are not traceable and need no autograd.
@torch.library.custom_op("rest_fast::topk_similarity", mutates_args=(), device_types="cuda")
def _topk_op(queries: Tensor, keys: Tensor, k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    return _dispatch(queries, keys, k, exclude)


@_topk_op.register_kernel("cpu")
def _topk_op_cpu(queries: Tensor, keys: Tensor, k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    return _dispatch(queries, keys, k, exclude)


@_topk_op.register_fake
def _topk_op_fake(queries: Tensor, keys: Tensor, k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    M = queries.shape[0]
    return queries.new_empty(M, k, dtype=torch.float32), queries.new_empty(M, k, dtype=torch.int64)


def topk_similarity(queries: Tensor, keys: Tensor, k: int, *,
                    exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k keys by inner product for every query.

    Args:
        queries: ``[M, d]`` float32 / float16 / bfloat16 (any strides).
        keys: ``[N, d]`` same family of dtypes, same device. Accumulation is fp32.
        k: neighbours per query, ``1 ≤ k ≤`` eligible keys (tested up to 4096 and beyond).
        exclude: optional int64 ``[M]``: one key index per query to skip (``-1`` = none), e.g. the
            self-match when ``queries`` and ``keys`` are the same set.

    Returns:
        ``(scores, indices)``: float32 ``[M, k]`` sorted descending and int64 ``[M, k]``; among equal
        scores the lower key index comes first.

    Raises:
        ValueError: bad shapes / dtypes / devices, ``k`` larger than the number of eligible keys, or NaN/inf
            in ``queries`` or ``keys``.

    Dispatch: CUDA → Triton; CPU with ``TRITON_INTERPRET=1`` → Triton (interpreted); other CPU calls → BLAS
    GEMM blocks + the native C++ selection (:mod:`rest_fast.ops.topk_cpu`), or the blocked reference
    :func:`topk_similarity_ref` when the extension is not built (``REST_FAST_NO_NATIVE=1``). ``M × N`` scores are never materialised. Runs as the custom op
    ``torch.ops.rest_fast.topk_similarity`` (a single opaque node under ``torch.compile``).
    """
    if not (isinstance(queries, Tensor) and isinstance(keys, Tensor)):
        check_topk_inputs(queries, keys, k, exclude)  # raises the TypeError naming the argument
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be a positive int, got {k!r}")
    # No autograd: scores of a selection are not differentiated through (CLIP features are frozen).
    return _topk_op(queries.detach(), keys.detach(), k, exclude)


# ----------------------------------------------------------------------------------------------------
# tie-aware checking (tests, benchmarks): faiss-style comparison of a result with a reference
# ----------------------------------------------------------------------------------------------------


def topk_mismatch(queries: Tensor, keys: Tensor, scores: Tensor, indices: Tensor, ref_scores: Tensor,
                  ref_indices: Tensor, *, exclude: Tensor | None = None, tol: float = 1e-5) -> str | None:
    """Describe how ``(scores, indices)`` fails to be a valid top-k next to a reference; ``None`` if it is.

    Checks, per row: indices in range, distinct and not excluded; ``scores`` non-increasing; ``scores``
    equal to the exact (float64) re-scored ``indices`` and to ``ref_scores`` within ``tol·max(1, |s|)``;
    ids equal to the reference's at every position whose reference score is separated by more than the
    tolerance from every other score of the row and from the k-th (tie groups may be permuted or cut).
    """
    M, k = ref_scores.shape
    if scores.shape != (M, k) or indices.shape != (M, k):
        return f"shape {tuple(scores.shape)}/{tuple(indices.shape)} != {(M, k)}"
    N = keys.shape[0]
    idx = indices.long().cpu()
    if bool((idx < 0).any() or (idx >= N).any()):
        return "index out of range"
    srt = idx.sort(1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        return "duplicate index in a row"
    if exclude is not None and bool((idx == exclude.cpu()[:, None]).any()):
        return "excluded key returned"
    s = scores.double().cpu()
    scale = torch.clamp(s.abs().max(), min=1.0).item()
    t = tol * scale
    if bool((s[:, 1:] > s[:, :-1] + t).any()):
        return "scores not sorted descending"
    exact = torch.einsum("md,mkd->mk", queries.double().cpu(), keys.double().cpu()[idx])
    if bool(((exact - s).abs() > t).any()):
        return f"scores differ from re-scored ids by {float((exact - s).abs().max()):.3g} (tol {t:.3g})"
    rs = ref_scores.double().cpu()
    if bool(((rs - s).abs() > t).any()):
        return f"scores differ from the reference by {float((rs - s).abs().max()):.3g} (tol {t:.3g})"
    # rs is sorted, so "separated from every other score" = separated from both neighbours.
    inf = torch.full((M, 1), float("inf"), dtype=rs.dtype)
    up = torch.cat([inf, rs[:, :-1] - rs[:, 1:]], 1)
    down = torch.cat([rs[:, :-1] - rs[:, 1:], inf], 1)
    separated = (up > 2 * t) & (down > 2 * t) & (rs > rs[:, -1:] + 2 * t)
    bad = separated & (idx != ref_indices.long().cpu())
    if bool(bad.any()):
        r, j = (int(x) for x in torch.nonzero(bad)[0])
        return f"{int(bad.sum())} ids differ outside tie groups; first at row {r} pos {j}: " \
               f"{int(idx[r, j])} vs {int(ref_indices[r, j])}"
    return None
