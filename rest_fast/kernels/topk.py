"""``@triton.jit`` kernels for exact inner-product top-k (launchers and the cost model: :mod:`rest_fast.ops.topk`).

Two passes over score tiles ``Q @ K^T`` computed with ``tl.dot`` (fp32 accumulation), never stored:

* :func:`group_max_kernel` — per query, the maximum score of each of ``NG`` key *groups* (group ``g`` holds
  keys ``g, g + J_STRIDE, g + 2 J_STRIDE, …``, ``G`` of them). The k-th largest group maximum is a score
  reached by k distinct keys, so it is a lower bound of the true k-th score: the threshold of pass 2.
* :func:`filter_kernel` — every score tile is compared with the query's threshold; survivors are appended to
  a per-query candidate buffer, each taking its slot with its own ``atomic_add`` on the row's counter (the
  order of slots is irrelevant: selection uses a total order). The counter keeps counting past the buffer
  capacity so the launcher can see an overflow. ``DENSE`` (no threshold, small ``N``) writes every score at
  its key's own slot instead, without atomics.

``IEEE`` selects exact fp32 products for float32 inputs (no TF32); ``UPCAST`` converts tiles to fp32 before
the dot, which the launcher sets only for bfloat16 under the CPU interpreter (its ``tl.dot`` mishandles
bfloat16 operands).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def group_max_kernel(Q, K, EX, OUT, M, N, D, NG, G, J_STRIDE,
                     s_qm, s_qd, s_kn, s_kd, s_om,
                     HAS_EX: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                     BM: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr):
    i_m = tl.program_id(0)
    i_g = tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_g = i_g * BG + tl.arange(0, BG)
    m_m = o_m < M
    m_g = o_g < NG
    if HAS_EX:
        b_ex = tl.load(EX + o_m, mask=m_m, other=-1)
    b_max = tl.full([BM, BG], float("-inf"), tl.float32)
    for j in range(0, G):
        o_n = o_g + j * J_STRIDE
        m_n = m_g & (o_n < N)
        acc = tl.zeros([BM, BG], dtype=tl.float32)
        for d0 in range(0, D, BK):
            o_d = d0 + tl.arange(0, BK)
            m_d = o_d < D
            p_q = Q + o_m[:, None].to(tl.int64) * s_qm + o_d[None, :] * s_qd
            p_k = K + o_n[None, :].to(tl.int64) * s_kn + o_d[:, None] * s_kd
            b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
            b_k = tl.load(p_k, mask=m_n[None, :] & m_d[:, None], other=0.0)
            if UPCAST:
                b_q = b_q.to(tl.float32)
                b_k = b_k.to(tl.float32)
            if IEEE:
                acc = tl.dot(b_q, b_k, acc, input_precision="ieee")
            else:
                acc = tl.dot(b_q, b_k, acc)
        m_v = m_m[:, None] & m_n[None, :]
        if HAS_EX:
            m_v = m_v & (o_n[None, :] != b_ex[:, None])
        b_max = tl.maximum(b_max, tl.where(m_v, acc, float("-inf")))
    p_o = OUT + o_m[:, None].to(tl.int64) * s_om + o_g[None, :]
    tl.store(p_o, b_max, mask=m_m[:, None] & m_g[None, :])


@triton.jit
def filter_kernel(Q, K, EX, TAU, CNT, CS, CI, M, N, D, CAP,
                  s_qm, s_qd, s_kn, s_kd,
                  HAS_EX: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, DENSE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped program order: GROUP_M query tiles sweep the keys together, so key tiles are reused from L2.
    pid = tl.program_id(0)
    n_pm = tl.cdiv(M, BM)
    n_pn = tl.cdiv(N, BN)
    width = GROUP_M * n_pn
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_pm - first_m, GROUP_M)
    i_m = first_m + (pid % width) % size_m
    i_n = (pid % width) // size_m

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, BK):
        o_d = d0 + tl.arange(0, BK)
        m_d = o_d < D
        p_q = Q + o_m[:, None].to(tl.int64) * s_qm + o_d[None, :] * s_qd
        p_k = K + o_n[None, :].to(tl.int64) * s_kn + o_d[:, None] * s_kd
        b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_k = tl.load(p_k, mask=m_n[None, :] & m_d[:, None], other=0.0)
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_k = b_k.to(tl.float32)
        if IEEE:
            acc = tl.dot(b_q, b_k, acc, input_precision="ieee")
        else:
            acc = tl.dot(b_q, b_k, acc)

    if DENSE:
        # No threshold (small N): slot = key index, the buffer is the row itself. The excluded key is
        # written as -inf, which never ranks (k <= eligible keys, scores are finite).
        m_st = m_m[:, None] & m_n[None, :]
        b_s = acc
        if HAS_EX:
            b_ex = tl.load(EX + o_m, mask=m_m, other=-1)
            b_s = tl.where(o_n[None, :] != b_ex[:, None], acc, float("-inf"))
        off = o_m[:, None] * CAP + o_n[None, :]
        tl.store(CS + off, b_s, mask=m_st)
        tl.store(CI + off, tl.broadcast_to(o_n[None, :], (BM, BN)), mask=m_st)
    else:
        # Invalid rows get +inf thresholds, so they never produce candidates.
        b_tau = tl.load(TAU + o_m, mask=m_m, other=float("inf"))
        m_hit = (acc >= b_tau[:, None]) & m_n[None, :]
        if HAS_EX:
            b_ex = tl.load(EX + o_m, mask=m_m, other=-1)
            m_hit = m_hit & (o_n[None, :] != b_ex[:, None])
        # Most tiles of a good threshold hold no survivor: skip the compaction for them.
        if tl.max(tl.max(m_hit.to(tl.int32), axis=1), axis=0) > 0:
            # One atomic per survivor, each returning its own slot: no prefix sum, and no reliance on a
            # per-row atomic's return value being broadcast to every thread that holds the row (Triton
            # before mid-2025 returned it to one thread only). The [BM, BN] tile has at least as many
            # elements as threads (launcher), so no element is replicated across threads.
            # (The row index is spelled as a select over the tile, not a broadcast of o_m: triton 3.8's
            # layout propagation asserts on an atomic through a broadcast pointer after a wgmma.)
            i_row = tl.where(m_hit, o_m[:, None], 0)
            slot = tl.atomic_add(CNT + i_row, 1, mask=m_hit, sem="relaxed")
            m_st = m_hit & (slot < CAP)
            # int32 offsets: the launcher keeps rows * CAP < 2**31 per chunk, so no int64 pointer math
            # is live next to the accumulator.
            off = i_row * CAP + slot
            tl.store(CS + off, acc, mask=m_st)
            tl.store(CI + off, tl.broadcast_to(o_n[None, :], (BM, BN)), mask=m_st)
