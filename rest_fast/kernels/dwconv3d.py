"""Triton kernels for the depth-wise 3D convolution of the temporal adapter (``@triton.jit`` only).

Layout: the input is a channels-last video ``[B, T, H, W, C]`` read through its five strides, seen as
``N = B*T*H*W`` rows of ``C`` channels. A program owns a tile of ``BLOCK_P`` consecutive rows ×
``BLOCK_C`` channels. Every tap ``(kt, kh, kw)`` of the odd ``KT×KH×KW`` kernel is a *constant* pointer
offset ``(kt-RT)*s_t + (kh-RH)*s_h + (kw-RW)*s_w`` from the centre row, so a tap costs one masked load
(the mask encodes the zero "same" padding at the borders) and one FMA per element; the row → (b, t, h, w)
decomposition is done once per tile. Taps are unrolled (``tl.static_range``), so neighbouring taps hit
L1/L2 for the rows they share with the previous tap: HBM sees each input byte about once.

GPU cost model (from ptxas/SASS for sm_90, no GPU run yet): the forward issues ~5 instructions per
element and tap (1 FFMA, ~1 bf16→fp32 conversion, zero-fill and predicate for the masked load, address
math), i.e. it is issue-bound rather than HBM-bound at C=768. Fewer would need each loaded element
converted once and reused across taps (a shared-memory halo tile), which Triton does not express.

Launchers (grid, tile choice, partial-sum reduction) live in :mod:`rest_fast.ops.dwconv3d`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows_to_bthw(o_p, T, H, W, OFF64: tl.constexpr):
    """Split flat row ids ``o_p`` into (b, t, h, w); int64 when offsets may pass 2**31."""
    if OFF64:
        o_p = o_p.to(tl.int64)
    # Three divisions, no remainders: integer division by a runtime value is a long instruction sequence
    # on GPUs and the dw kernel repeats this for every row block.
    r1 = o_p // W
    i_w = o_p - r1 * W
    r2 = r1 // H
    i_h = r1 - r2 * H
    i_b = r2 // T
    i_t = r2 - i_b * T
    return i_b, i_t, i_h, i_w


@triton.jit
def dwconv3d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, T, H, W, C,
    s_xb, s_xt, s_xh, s_xw, s_xc,
    s_wc, s_wt, s_wh, s_ww,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, FLIP: tl.constexpr,
    ACC_FP64: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``y[p, c] = sum_k w[c, k] * x[p + k - r, c] (+ bias[c]) (+ x[p, c] if RESIDUAL)``.

    ``FLIP`` reads the weight mirrored along all three axes: with ``x := dy`` this is exactly the
    input gradient of the convolution, so the same kernel serves the backward ``dx`` on its own.
    ``y`` is written contiguous ``[N, C]``.
    """
    i_p = tl.program_id(0)
    i_c = tl.program_id(1)
    RT: tl.constexpr = KT // 2
    RH: tl.constexpr = KH // 2
    RW: tl.constexpr = KW // 2

    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_p = o_p < N
    m_c = o_c < C
    i_b, i_t, i_h, i_w = _rows_to_bthw(o_p, T, H, W, OFF64)
    if OFF64:
        o_c = o_c.to(tl.int64)
    # Pointers of the centre rows; every tap adds one scalar offset to this block.
    p_x = x_ptr + (i_b * s_xb + i_t * s_xt + i_h * s_xh + i_w * s_xw)[:, None] + (o_c * s_xc)[None, :]
    # The tap weights are read as a [BLOCK_P, BLOCK_C] block with a zero row stride: every thread loads
    # the channels it needs (L1 hits) in the accumulator's layout. A [BLOCK_C] vector broadcast over the
    # rows would instead be re-laid out through shared memory, with a barrier per tap. The launcher pads
    # the weights along C to a multiple of BLOCK_C, so these loads need no mask (no zero fill, and the
    # identical addresses of a thread's rows can be merged).
    p_w = w_ptr + (o_p * 0)[:, None] + (o_c * s_wc)[None, :]

    if ACC_FP64:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)

    for kt in tl.static_range(KT):
        t2 = i_t + (kt - RT)
        m_t = m_p & (t2 >= 0) & (t2 < T)
        for kh in tl.static_range(KH):
            h2 = i_h + (kh - RH)
            m_th = m_t & (h2 >= 0) & (h2 < H)
            for kw in tl.static_range(KW):
                w2 = i_w + (kw - RW)
                m_thw = m_th & (w2 >= 0) & (w2 < W)
                if FLIP:
                    off_w = (KT - 1 - kt) * s_wt + (KH - 1 - kh) * s_wh + (KW - 1 - kw) * s_ww
                else:
                    off_w = kt * s_wt + kh * s_wh + kw * s_ww
                b_w = tl.load(p_w + off_w).to(acc.dtype)
                off_x = (kt - RT) * s_xt + (kh - RH) * s_xh + (kw - RW) * s_xw
                b_x = tl.load(p_x + off_x, mask=m_thw[:, None] & m_c[None, :], other=0.0).to(acc.dtype)
                acc += b_x * b_w
                if RESIDUAL:
                    if kt == RT and kh == RH and kw == RW:
                        acc += b_x
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(acc.dtype)[None, :]

    if OFF64:
        o_p = o_p.to(tl.int64)
    p_y = y_ptr + o_p[:, None] * C + o_c[None, :]
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_p[:, None] & m_c[None, :])


@triton.jit
def dwconv3d_bwd_w_kernel(
    dy_ptr, x_ptr, part_ptr,
    N, T, H, W, C, BLOCKS_PER_PROG,
    s_gb, s_gt, s_gh, s_gw, s_gc,
    s_xb, s_xt, s_xh, s_xw, s_xc,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC_FP64: tl.constexpr, OFF64: tl.constexpr,
    TAPS_P2: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-program partial sums of ``dw[c, k] = sum_q dy[q, c] * x[q + d_k, c]`` and ``db[c] = sum_q dy[q, c]``.

    The taps are a tensor axis here, not an unrolled loop: each step loads the ``[TAPS_P2, BLOCK_P,
    BLOCK_C]`` block of shifted ``x`` rows (tap offsets and border masks are vectors over the taps) and
    accumulates ``x_shifted * dy`` element-wise into a register tile of the same shape. Nothing is
    reduced inside the loop; the sums over rows happen once per program, at the end. Program
    ``(i_s, i_c)`` walks ``BLOCKS_PER_PROG`` consecutive row blocks and writes ``part[i_s, k, c]``
    (tap ``k`` in row ``k``, ``db`` in row ``KT*KH*KW``); the launcher sums ``part`` over ``i_s`` in a
    fixed order. No atomics: bit-identical run to run for a given shape and tile configuration.
    """
    i_s = tl.program_id(0)
    i_c = tl.program_id(1)
    RT: tl.constexpr = KT // 2
    RH: tl.constexpr = KH // 2
    RW: tl.constexpr = KW // 2
    TAPS: tl.constexpr = KT * KH * KW

    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    if OFF64:
        o_c = o_c.to(tl.int64)
    # Tap k = (kt*KH + kh)*KW + kw as a vector: its shift along t, h, w and its pointer offset into x.
    o_k = tl.arange(0, TAPS_P2)
    m_k = o_k < TAPS
    d_t = o_k // (KH * KW) - RT
    d_h = (o_k // KW) % KH - RH
    d_w = o_k % KW - RW
    off_k = d_t * s_xt + d_h * s_xh + d_w * s_xw
    if OFF64:
        off_k = off_k.to(tl.int64)
    if ACC_FP64:
        acc_w = tl.zeros([TAPS_P2, BLOCK_P, BLOCK_C], dtype=tl.float64)
        acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc_w = tl.zeros([TAPS_P2, BLOCK_P, BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)

    for j in range(0, BLOCKS_PER_PROG):
        o_p = (i_s * BLOCKS_PER_PROG + j) * BLOCK_P + tl.arange(0, BLOCK_P)
        m_p = o_p < N
        i_b, i_t, i_h, i_w = _rows_to_bthw(o_p, T, H, W, OFF64)
        p_g = dy_ptr + (i_b * s_gb + i_t * s_gt + i_h * s_gh + i_w * s_gw)[:, None] + (o_c * s_gc)[None, :]
        b_g = tl.load(p_g, mask=m_p[:, None] & m_c[None, :], other=0.0).to(acc_w.dtype)
        acc_b += b_g
        # [TAPS_P2, BLOCK_P]: is tap k of row q inside the clip (zero "same" padding outside)?
        t2 = i_t[None, :] + d_t[:, None]
        h2 = i_h[None, :] + d_h[:, None]
        w2 = i_w[None, :] + d_w[:, None]
        m_kp = (m_k[:, None] & m_p[None, :] & (t2 >= 0) & (t2 < T) & (h2 >= 0) & (h2 < H)
                & (w2 >= 0) & (w2 < W))
        base = i_b * s_xb + i_t * s_xt + i_h * s_xh + i_w * s_xw
        p_x = x_ptr + (base[None, :] + off_k[:, None])[:, :, None] + (o_c * s_xc)[None, None, :]
        b_x = tl.load(p_x, mask=m_kp[:, :, None] & m_c[None, None, :], other=0.0).to(acc_w.dtype)
        acc_w += b_x * b_g[None, :, :]

    p_part = part_ptr + i_s * ((TAPS + 1) * C) + o_c
    tl.store(p_part[None, :] + o_k[:, None] * C, tl.sum(acc_w, axis=1), mask=m_k[:, None] & m_c[None, :])
    tl.store(p_part + TAPS * C, tl.sum(acc_b, axis=0), mask=m_c)
