"""Exact top-k similarity over ``torch.distributed`` ranks.

Contract: every rank passes *its own* rows. ``queries`` are this rank's queries; ``keys`` this rank's shard of
the global key set, ranks concatenated in rank order (rank ``r``'s local key ``j`` has global index
``offset_r + j``, ``offset_r`` = key rows held by lower ranks). Each rank gets the top-k of its queries over
*all* keys, with global indices. Shards may have different sizes (including zero rows).

Two strategies, chosen by memory (``strategy="auto"``):

* ``"gather_keys"`` — all-gather the keys (``N·d`` elements per rank), then a local
  :func:`~rest_fast.ops.topk_similarity`. One collective, no merge; needs the whole key set on every rank.
  Chosen when ``N·d·itemsize`` fits in the memory budget (a quarter of free plus cached-free GPU memory, at
  least 256 MiB, or 2 GiB on CPU; the smallest over ranks, so all ranks choose alike).
* ``"ring"`` — keys stream around the ranks in chunks: at each step every rank scores its queries against the
  chunk in hand, merges that chunk's top-k into a running top-k (packed keys, exact), passes the chunk to rank
  ``r + 1`` and takes the next from ``r - 1``; after ``world`` steps every rank has seen every key once. Memory per
  rank: its own shard, two chunk buffers of at most ``memory_budget / 4`` bytes each (the smallest budget of any
  rank decides the chunk, so all ranks step together), and ``M_r × 2k`` running keys. Bytes received per rank:
  ``(N - N_r) · d · itemsize``. Chosen by ``"auto"`` when the keys do not fit the budget; all ranks compute at every
  step (no rank waits for a broadcast from another).
* ``"shard_keys"`` — keys never move. For each source rank in turn, its queries are broadcast in chunks,
  every rank computes the chunk's top-k over its shard (global indices), and the partial lists
  (``world × chunk × k``) are gathered to the source rank, which merges them exactly with the packed-key order
  of :mod:`rest_fast.ops.topk` (score descending, lower global index first on equal scores). Memory per rank:
  its key shard plus ``world·chunk·k`` partial results.

Exactness: a key in the global top-k is in its shard's top-k, so merging per-shard top-k lists is exact.
Shards holding at most ``k`` keys contribute all their (eligible) keys.

Collectives run on CPU tensors for ``gloo`` and on the inputs' CUDA device for ``nccl``. Validation errors
(``k`` larger than the eligible keys, NaN, shape mismatches) are agreed on collectively, so every rank raises
``ValueError`` together instead of leaving the others waiting.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from rest_fast.comm import comm_device
from rest_fast.ops.topk import _KEY_MIN, pack_keys, topk_similarity, unpack_indices, unpack_scores

__all__ = ["distributed_topk", "choose_strategy"]

Strategy = Literal["auto", "gather_keys", "ring", "shard_keys"]


def _default_budget(device: torch.device) -> int:
    # a quarter of free + cached-free device memory, at least 256 MiB (rest_fast.ops.memory); 2 GiB on CPU
    from rest_fast.ops.memory import device_memory_budget

    return device_memory_budget(device, cpu=2 << 30)


def choose_strategy(n_keys: int, d: int, itemsize: int, budget: int) -> str:
    """``"gather_keys"`` when all ``n_keys × d`` keys fit in ``budget`` bytes, else ``"ring"`` (streamed)."""
    return "gather_keys" if n_keys * d * itemsize <= budget else "ring"


def _local_error(queries: Tensor, keys: Tensor, k: int, exclude: Tensor | None, n_total: int,
                 d_all: list[int], any_exclude: bool) -> str:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        return f"k must be a positive int, got {k!r}"
    if len(set(d_all)) != 1:
        return f"feature dimension differs across ranks: {d_all}"
    if queries.dim() != 2 or keys.dim() != 2:
        return f"queries and keys must be 2-D, got {tuple(queries.shape)} and {tuple(keys.shape)}"
    if exclude is not None and (exclude.shape != (queries.shape[0],) or exclude.dtype not in (torch.int32, torch.int64)):
        return f"exclude must be int64 [M] = [{queries.shape[0]}], got {tuple(exclude.shape)} {exclude.dtype}"
    if exclude is not None and exclude.numel() and (int(exclude.min()) < -1 or int(exclude.max()) >= n_total):
        return f"exclude values must be -1 or global key indices in [0, {n_total})"
    eligible = n_total - (1 if any_exclude else 0)
    if k > eligible:
        return f"k={k} exceeds the number of eligible keys per query ({eligible} over all ranks)"
    for name, t in (("queries", queries), ("keys", keys)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            return f"{name} contains NaN or inf"
    return ""


def _all_gather_rows(x: Tensor, sizes: list[int], group, cdev: torch.device) -> Tensor:
    """Concatenate every rank's ``x`` (rows may differ in number) in rank order."""
    width = max(sizes)
    buf = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=cdev)
    buf[: x.shape[0]] = x.to(cdev)
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _shard_topk(q: Tensor, keys: Tensor, k: int, ex: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """Top-k of ``q`` over this shard, global indices, padded with (-inf, -1) to ``k`` columns."""
    mc, n = q.shape[0], keys.shape[0]
    dev = q.device
    s = torch.full((mc, k), float("-inf"), dtype=torch.float32, device=dev)
    i = torch.full((mc, k), -1, dtype=torch.int64, device=dev)
    if n == 0 or mc == 0:
        return s, i
    local = ex - offset
    local = torch.where((local >= 0) & (local < n), local, -1)
    if n <= k:
        # Small shard: all of its keys, excluded ones at -inf (the merge never selects them).
        ct = torch.promote_types(torch.promote_types(q.dtype, keys.dtype), torch.float32)
        sc = (q.to(ct) @ keys.to(ct).T).float()
        rows = torch.nonzero(local >= 0).squeeze(1)
        sc[rows, local[rows]] = float("-inf")
        s[:, :n] = sc
        i[:, :n] = torch.arange(n, device=dev) + offset
        i[:, :n] = torch.where(torch.isfinite(sc), i[:, :n], -1)
        return s, i
    ls, li = topk_similarity(q, keys, k, exclude=local)
    return ls, li + offset


def _merge(parts_s: Tensor, parts_i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of concatenated partial lists ``[M, P]`` (index -1 = padding)."""
    valid = parts_i >= 0
    packed = torch.where(valid, pack_keys(parts_s, parts_i.clamp_min(0)), _KEY_MIN)
    best = torch.topk(packed, k, dim=1, sorted=True).values
    return unpack_scores(best), unpack_indices(best)


def _ring_chunk(budget: int, d: int, itemsize: int, m: int, k: int, group, cdev: torch.device) -> int:
    """Key rows per streamed chunk: two chunk buffers (in hand, arriving) in half the budget, after the running
    ``[m, 2k]`` keys; the smallest over the ranks (every rank must cut the same chunks)."""
    room = max(0, budget // 2 - m * k * 8 * 3)
    rows = torch.tensor([max(1, room // max(1, 2 * d * itemsize))], dtype=torch.int64, device=cdev)
    dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=group)
    return int(rows)


def _ring_topk(queries: Tensor, keys: Tensor, k: int, ex: Tensor | None, n_all: list[int], budget: int, group,
               cdev: torch.device) -> tuple[Tensor, Tensor]:
    """The ``"ring"`` strategy (module docstring): chunk ``c`` of every shard passes every rank once."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev, m, d = queries.device, queries.shape[0], queries.shape[1]
    offsets = [sum(n_all[:r]) for r in range(world)]
    kc = _ring_chunk(budget, d, keys.element_size(), m, k, group, cdev)
    xq = ex if ex is not None else torch.full((m,), -1, dtype=torch.int64, device=dev)
    best = torch.full((m, k), _KEY_MIN, dtype=torch.int64, device=dev)
    nxt, prv = _peer(group, (rank + 1) % world), _peer(group, (rank - 1) % world)
    for c0 in range(0, max(n_all), kc):
        origin = rank
        hand = keys[c0:c0 + kc].to(cdev).contiguous()  # chunk c of this rank's own shard
        for step in range(world):
            rows = hand.shape[0]
            if rows and m:
                ps, pi = _shard_topk(queries, hand.to(dev), k, xq, offsets[origin] + c0)
                part = torch.where(pi >= 0, pack_keys(ps, pi.clamp_min(0)), _KEY_MIN)
                best = torch.topk(torch.cat([best, part], 1), k, dim=1, sorted=True).values
            if step == world - 1:
                break
            origin = (origin - 1) % world
            incoming = torch.empty((max(0, min(kc, n_all[origin] - c0)), d), dtype=keys.dtype, device=cdev)
            reqs = []
            if rows:
                reqs.append(dist.isend(hand, nxt, group=group))
            if incoming.shape[0]:
                reqs.append(dist.irecv(incoming, prv, group=group))
            for r in reqs:
                r.wait()
            hand = incoming
    empty = best == _KEY_MIN
    return (torch.where(empty, float("-inf"), unpack_scores(best)),
            torch.where(empty, -1, unpack_indices(best)))


def _peer(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def distributed_topk(queries: Tensor, keys: Tensor, k: int, *, exclude: Tensor | None = None, group=None,
                     strategy: Strategy = "auto", memory_budget: int | None = None,
                     query_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` by inner product of this rank's ``queries`` over the keys of all ranks.

    Args:
        queries: ``[M_r, d]`` this rank's queries (float32 / float16 / bfloat16).
        keys: ``[N_r, d]`` this rank's key shard; global index = rank offset + local index.
        k: neighbours per query (``≤`` total keys, minus one if any rank uses ``exclude``).
        exclude: optional int64 ``[M_r]`` *global* key index to skip per query (``-1`` = none).
        group: process group (default: the world). Without an initialised process group (or with one
            rank) this is :func:`~rest_fast.ops.topk_similarity`.
        strategy: ``"auto"`` (by memory), ``"gather_keys"``, ``"ring"`` or ``"shard_keys"`` (module docstring).
        memory_budget: bytes allowed for gathered keys (``"auto"``), streamed key chunks (``"ring"``) and per-chunk
            partial results.
        query_chunk: queries broadcast per step in ``"shard_keys"`` (default: from the budget).

    Returns:
        ``(scores, indices)``: float32 ``[M_r, k]`` descending, int64 ``[M_r, k]`` global key indices; on
        equal scores the lower global index first.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return topk_similarity(queries, keys, k, exclude=exclude)
    if strategy not in ("auto", "gather_keys", "ring", "shard_keys"):
        raise ValueError(f"strategy must be 'auto', 'gather_keys', 'ring' or 'shard_keys', got {strategy!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = queries.device
    cdev = comm_device(group, dev)

    # Shapes of every rank: [M_r, N_r, d, uses exclude, memory budget]. The budget is agreed on (the smallest)
    # because it picks the strategy and the query chunk, which every rank must take alike.
    own_budget = memory_budget or _default_budget(dev)
    info = torch.tensor([queries.shape[0], keys.shape[0], queries.shape[-1], int(exclude is not None and
                        bool((exclude >= 0).any())), own_budget], dtype=torch.int64, device=cdev)
    infos = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(infos, info, group=group)
    m_all = [int(t[0]) for t in infos]
    n_all = [int(t[1]) for t in infos]
    d_all = [int(t[2]) for t in infos]
    any_exclude = any(int(t[3]) for t in infos)
    n_total = sum(n_all)
    offset = sum(n_all[:rank])

    msg = _local_error(queries, keys, k, exclude, n_total, d_all, any_exclude)
    flag = torch.tensor([1 if msg else 0], dtype=torch.int64, device=cdev)
    dist.all_reduce(flag, group=group)
    if int(flag) or msg:
        raise ValueError(msg or "distributed_topk: invalid arguments on another rank (see its error)")

    d = d_all[0]
    budget = min(int(t[4]) for t in infos)
    if strategy == "auto":
        strategy = choose_strategy(n_total, d, keys.element_size(), budget)
    ex = exclude.to(torch.int64) if exclude is not None else None

    if strategy == "gather_keys":
        all_keys = _all_gather_rows(keys, n_all, group, cdev).to(dev)
        return topk_similarity(queries, all_keys, k, exclude=ex)

    if strategy == "ring":
        return _ring_topk(queries, keys, k, ex, n_all, budget, group, cdev)

    # shard_keys
    mc = query_chunk or max(1, min(max(m_all), budget // max(1, world * k * 12 + d * 4)))
    out_s = torch.empty(queries.shape[0], k, dtype=torch.float32, device=dev)
    out_i = torch.empty(queries.shape[0], k, dtype=torch.int64, device=dev)
    for src in range(world):
        for c0 in range(0, m_all[src], mc):
            rows = min(mc, m_all[src] - c0)
            qc = torch.empty(rows, d, dtype=queries.dtype, device=cdev)
            xc = torch.full((rows,), -1, dtype=torch.int64, device=cdev)
            if rank == src:
                qc.copy_(queries[c0:c0 + rows])
                if ex is not None:
                    xc.copy_(ex[c0:c0 + rows])
            dist.broadcast(qc, src, group=group)
            dist.broadcast(xc, src, group=group)
            ps, pi = _shard_topk(qc.to(dev), keys, k, xc.to(dev), offset)
            part = torch.cat([ps.view(torch.int32).to(torch.int64), pi], 1).to(cdev)  # one message
            gathered = [torch.empty_like(part) for _ in range(world)] if rank == src else None
            dist.gather(part, gathered, dst=dist.get_global_rank(group, src) if group is not None else src,
                        group=group)
            if rank == src:
                allp = torch.cat(gathered, 1).to(dev).view(rows, world, 2 * k)
                s_parts = allp[:, :, :k].to(torch.int32).view(torch.float32).reshape(rows, world * k)
                i_parts = allp[:, :, k:].reshape(rows, world * k)
                out_s[c0:c0 + rows], out_i[c0:c0 + rows] = _merge(s_parts, i_parts, k)
    return out_s, out_i
