"""``@triton.jit`` kernel for fused caption re-ranking (launcher: :mod:`rest_fast.ops.rerank`).

One program per video: candidate caption ids are read in chunks of ``BL``, their feature rows gathered and
dotted with the video feature (fp32 accumulation over ``d`` in chunks of ``BD``), and a running list of the
``K`` best *distinct* captions is kept as packed int64 keys ``(ordered_bits(score) << 32) | (2**32-1-id)``.
Duplicated ids give identical keys, so "next best distinct" is simply "largest key strictly below the last
one taken". Nothing but the ``[N, K]`` result is written.
"""

from __future__ import annotations

import triton
import triton.language as tl

_KEY_MIN = tl.constexpr(-(2**63))
_KEY_MAX = tl.constexpr(2**63 - 1)


@triton.jit
def _pack(score, cid):
    bits = (score + 0.0).to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (4294967295 - cid.to(tl.int64))


@triton.jit
def rerank_kernel(V, C, CAND, OUT_S, OUT_I, L, D, NC,
                  s_vn, s_vd, s_cc, s_cd, s_an, s_al,
                  K: tl.constexpr, KP: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
    i_n = tl.program_id(0)
    o_k = tl.arange(0, KP)
    b_top = tl.full([KP], _KEY_MIN, tl.int64)
    for l0 in range(0, L, BL):
        o_l = l0 + tl.arange(0, BL)
        b_id = tl.load(CAND + i_n.to(tl.int64) * s_an + o_l * s_al, mask=o_l < L, other=-1)
        m_l = (b_id >= 0) & (b_id < NC)
        acc = tl.zeros([BL], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_v = tl.load(V + i_n.to(tl.int64) * s_vn + o_d * s_vd, mask=m_d, other=0.0).to(tl.float32)
            p_c = C + b_id[:, None].to(tl.int64) * s_cc + o_d[None, :] * s_cd
            b_c = tl.load(p_c, mask=m_l[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(b_c * b_v[None, :], axis=1)
        b_key = tl.where(m_l, _pack(acc, b_id), _KEY_MIN)
        # Merge only when this chunk can change the list: its best key beats the current K-th.
        kth = tl.min(tl.where(o_k < K, b_top, _KEY_MAX), axis=0)
        if tl.max(b_key, axis=0) > kth:
            prev = tl.full([], _KEY_MAX, tl.int64)
            b_new = tl.full([KP], _KEY_MIN, tl.int64)
            for t in tl.static_range(K):
                m1 = tl.max(tl.where(b_key < prev, b_key, _KEY_MIN), axis=0)
                m2 = tl.max(tl.where(b_top < prev, b_top, _KEY_MIN), axis=0)
                cur = tl.maximum(m1, m2)
                b_new = tl.where(o_k == t, cur, b_new)
                prev = cur
            b_top = b_new
    m_out = o_k < K
    m_val = b_top != _KEY_MIN
    hi = (b_top >> 32).to(tl.int32)
    bits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    score = tl.where(m_val, bits.to(tl.float32, bitcast=True), float("-inf"))
    cid = tl.where(m_val, (4294967295 - (b_top & 4294967295)).to(tl.int32), -1)
    tl.store(OUT_S + i_n.to(tl.int64) * K + o_k, score, mask=m_out)
    tl.store(OUT_I + i_n.to(tl.int64) * K + o_k, cid, mask=m_out)
