"""Exact caption re-ranking when the caption-feature table is sharded over ``torch.distributed`` ranks.

Every rank holds the features of *its own* captions only (``[C_r, d]``) and re-ranks *its own* videos, whose
candidate captions (their own and their H neighbours') live on any rank. The result equals
:func:`rest_fast.ops.rerank_captions` run in one process on the whole table: the same top-``k`` *distinct* ids per
video, scores descending, equal scores by the lower global id, ``-inf`` / ``-1`` padding.

Global caption ids (:class:`ShardedIds`): caption ``j`` of rank ``r`` is ``j · P + r`` (P = world size). A rank
appends captions to its own shard without asking anyone, ids never change while P does not, and the owner of an
id is ``id mod P``. Within one owner the order of local rows is the order of global ids, so the owner's own
tie-break (lower local id) is the global one.

Scheme: **owner computes.** For every chunk of its videos, rank r sends to each owner o (pairwise, P - 1 steps of
shifted send/recv: step s talks to ``r + s`` and hears from ``r - s``) the features of the videos that have at least
one candidate owned by o, plus those candidates' local rows, each row's ids de-duplicated and sorted; o runs the
single-process re-rank against its shard and returns, per video, its top-``k`` distinct as packed (score, global
id) keys (:func:`rest_fast.ops.topk.pack_keys`); r merges the P partial lists with one top-``k`` per row.

Why exact: an id has exactly one owner, so the owners' candidate sets partition the video's distinct ids; the
global top-``k`` distinct is the top-``k`` of the union of each part's top-``k`` distinct, and the packed keys order
(score desc, lower id) is one total order on every rank.

Why owner-computes and not a ring of feature shards: a ring moves the whole table through every rank each round
(``C · d`` elements per rank: at 10M videos × ~20 captions × 512 fp16 dims, ~200 GB per rank per round), and most of
it is never a candidate of that rank's videos. Owner-computes moves each video's feature once per owner it needs
(``≤ n_r · d · (P - 1)``), its distinct candidate ids once (``≤ n_r · L · 4`` bytes over all owners) and ``k``
packed results back per video and owner: per rank about ``N · d · 2 + n_r · L · 4`` bytes, independent of the
table size, with no rank ever holding more than its own shard.

Memory: ``budget_bytes`` bounds the chunk of videos in flight (their candidate ids and the working set of splitting
them by owner, the request sent, the request received and the merge buffer; :func:`chunk_videos` is the formula). All ranks run the same number of chunk
steps (a rank with fewer or no videos sends empty requests), so every rank keeps serving the others.

Bytes: ``stats["bytes_sent"]`` counts every payload this rank sent (headers included); the caller logs it.
Collectives run on CPU tensors for ``gloo`` and on CUDA tensors for ``nccl``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rest_fast.comm import comm_device, group_world
from rest_fast.ops.rerank import rerank_captions
from rest_fast.ops.topk import _KEY_MIN, pack_keys, unpack_indices, unpack_scores

__all__ = ["ShardedIds", "sharded_rerank", "chunk_videos", "bytes_per_video", "distinct_sorted_rows"]

_MAX_ID = 1 << 32  # packed keys hold the id in 32 bits


@dataclass(frozen=True)
class ShardedIds:
    """Global caption ids of a table sharded over ``world`` ranks: local row ``j`` of rank ``r`` is ``j·world + r``."""

    world: int

    def owner(self, ids: Tensor) -> Tensor:
        return ids % self.world

    def local(self, ids: Tensor) -> Tensor:
        return ids // self.world

    def to_global(self, local: Tensor, rank: int) -> Tensor:
        return local * self.world + rank


# Working bytes per candidate while a chunk's requests to one owner are built (_request): the owner and local-id
# tensors (int64), the masked ids, the sort's values and int64 indices, the kept-position cumsum and the scatter
# target (int64), and masks. Measured on CPU (bench/round.py, L = 132): 40-48 B per candidate; 48 is the bound.
_SPLIT_BYTES_PER_CANDIDATE = 48


def bytes_per_video(L: int, d: int, itemsize: int, world: int, k: int) -> int:
    """Chunk bytes per video: the int64 candidate row (``8L``) and the working set of splitting it by owner
    (``48L``, see ``_SPLIT_BYTES_PER_CANDIDATE``), the request to one owner (feature ``d·itemsize`` + int32 ids
    ``4L`` + its position), a request of the same size received from another rank, and the ``world·k`` packed merge
    keys plus the ``k`` returned. (The owner's local re-rank adds its own bounded block on top:
    ``rest_fast.ops.rerank.REF_BLOCK_BYTES`` on CPU, none in the Triton kernel.)"""
    return (8 + _SPLIT_BYTES_PER_CANDIDATE) * L + 2 * (d * itemsize + 4 * L + 8) + 8 * world * k + 8 * k


def chunk_videos(budget_bytes: int, L: int, d: int, itemsize: int, world: int, k: int) -> int:
    """Videos per chunk so that one chunk's buffers fit ``budget_bytes`` (at least one)."""
    return max(1, budget_bytes // max(1, bytes_per_video(L, d, itemsize, world, k)))


def distinct_sorted_rows(rows: Tensor) -> Tensor:
    """Each row's distinct non-negative values, ascending, left-aligned, padded with -1 to the widest row: int32
    ``[n, W]`` from an int32 / int64 ``[n, L]`` tensor on any device (one sort per call: callers pass chunks)."""
    n, L = rows.shape
    if n == 0 or L == 0:
        return rows.new_full((n, 0), -1, dtype=torch.int32)
    srt = torch.sort(rows, dim=1).values  # -1 first, then ascending ids
    keep = srt >= 0
    keep[:, 1:] &= srt[:, 1:] != srt[:, :-1]
    width = int(keep.sum(1).max())  # one host read per chunk (round code, not the training step)
    col = torch.where(keep, torch.cumsum(keep, 1) - 1, width)  # dropped entries land in a spill column, cut below
    out = rows.new_full((n, width + 1), -1)
    out.scatter_(1, col, torch.where(keep, srt, -1))
    return out[:, :width].to(torch.int32).contiguous()


class _Counter:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.peak = 0

    def hold(self, *tensors: Tensor) -> None:
        self.peak = max(self.peak, sum(t.numel() * t.element_size() for t in tensors))


def _exchange(send: list[Tensor], dst: int, recv: list[Tensor], src: int, group, counter: _Counter, tag: int) -> None:
    """Send ``send`` to ``dst`` and receive ``recv`` from ``src`` concurrently (one tag per tensor)."""
    reqs = []
    for j, t in enumerate(send):
        if t.numel():
            reqs.append(dist.isend(t, _global(group, dst), group=group, tag=tag + j))
            counter.sent += t.numel() * t.element_size()
    for j, t in enumerate(recv):
        if t.numel():
            reqs.append(dist.irecv(t, _global(group, src), group=group, tag=tag + j))
            counter.received += t.numel() * t.element_size()
    for r in reqs:
        r.wait()


def _global(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def _request(cand: Tensor, vfeats: Tensor, ids: ShardedIds, owner: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row positions int64 [m'], features [m', d], local ids int32 [m', W]) of the chunk's rows with a candidate
    owned by ``owner``."""
    mine = (cand >= 0) & (ids.owner(cand) == owner)
    loc = distinct_sorted_rows(torch.where(mine, ids.local(cand), -1))
    pos = torch.nonzero(mine.any(1)).squeeze(1)
    return pos, vfeats[pos].contiguous(), loc[pos].contiguous()


def _serve(feats: Tensor, loc: Tensor, caption_feats: Tensor, k: int, ids: ShardedIds, rank: int,
           rerank: Callable) -> Tensor:
    """This rank's top-``k`` distinct of each requested row, as packed (score, global id) keys int64 ``[m', k]``."""
    if feats.shape[0] == 0:
        return torch.empty((0, k), dtype=torch.int64, device=feats.device)
    s, i = rerank(feats, caption_feats, loc, k)
    i = i.to(torch.int64)
    valid = i >= 0
    gid = torch.where(valid, ids.to_global(i.clamp_min(0), rank), 0)
    return torch.where(valid, pack_keys(s.float(), gid), _KEY_MIN)


def sharded_rerank(video_feats: Tensor, candidates: Tensor | np.ndarray | Callable[[int, int], Tensor | np.ndarray],
                   caption_feats: Tensor, k: int, *, group=None, budget_bytes: int = 64 << 20,
                   width: int | None = None, rerank: Callable | None = None) -> tuple[Tensor, Tensor, dict]:
    """Top-``k`` distinct candidate captions of this rank's videos over a caption table sharded by rank.

    Args:
        video_feats: ``[n_r, d]`` this rank's video features (float32 / float16 / bfloat16).
        candidates: int ``[n_r, L]`` *global* caption ids (:class:`ShardedIds`) per video, ``-1`` = empty, repeats
            allowed; or a function ``(lo, hi) -> [hi - lo, L]`` giving rows ``lo..hi-1`` (built chunk by chunk, so
            the whole matrix never exists; called once per chunk, in order). ``L`` may differ between calls and
            ranks.
        caption_feats: ``[C_r, d]`` features of this rank's captions (local row ``j`` = global id ``j·P + rank``).
        k: captions kept per video.
        group: process group (default: the world; none initialised = one process).
        budget_bytes: bytes of chunk buffers per rank (:func:`chunk_videos`); every rank should pass the same.
        width: the largest ``L`` the candidate function returns (sizes the chunks; needed with a function).
        rerank: the local re-rank (default :func:`rest_fast.ops.rerank_captions`).

    Returns:
        ``(scores, ids, stats)``: float32 ``[n_r, k]`` descending, int64 ``[n_r, k]`` global ids (``-inf`` / ``-1``
        padding), and ``{"bytes_sent", "bytes_received", "chunks", "chunk_videos", "peak_chunk_bytes"}`` for this
        rank.
    """
    rerank = rerank or rerank_captions
    world, rank = group_world(group)
    ids = ShardedIds(world)
    dev = video_feats.device
    cdev = comm_device(group, dev) if world > 1 else dev
    n, d = int(video_feats.shape[0]), int(video_feats.shape[1])
    if caption_feats.dim() != 2 or caption_feats.shape[1] != d:
        raise ValueError(f"caption_feats must be [C_r, {d}], got {tuple(caption_feats.shape)}")
    rows_of = candidates if callable(candidates) else None
    if rows_of is None:
        full = torch.as_tensor(candidates)
        if full.dim() != 2 or full.shape[0] != n:
            raise ValueError(f"candidates must be [n_r, L] = [{n}, L], got {tuple(full.shape)}")
        rows_of = lambda lo, hi: full[lo:hi]  # noqa: E731
        width = int(full.shape[1])
    elif width is None:
        raise ValueError("sharded_rerank: pass width= (the largest L) with a candidate function")

    m = chunk_videos(budget_bytes, max(width, 1), d, video_feats.element_size(), world, k)
    chunks = -(-n // m)
    if world > 1:  # every rank runs the same number of steps, so it keeps serving the others
        t = torch.tensor([chunks], dtype=torch.int64, device=cdev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        chunks = int(t)
    counter = _Counter()
    out_s = torch.full((n, k), float("-inf"), dtype=torch.float32, device=dev)
    out_i = torch.full((n, k), -1, dtype=torch.int64, device=dev)
    for c in range(chunks):
        lo, hi = min(n, c * m), min(n, (c + 1) * m)
        cand = torch.as_tensor(rows_of(lo, hi)).to(dev, torch.int64) if hi > lo else \
            torch.empty((0, 0), dtype=torch.int64, device=dev)
        if cand.numel() and int(cand.max()) >= _MAX_ID:
            raise ValueError(f"caption ids must be < 2**32, got {int(cand.max())}")
        vf = video_feats[lo:hi]
        merged = torch.full((hi - lo, world * k), _KEY_MIN, dtype=torch.int64, device=dev)
        for s in range(world):
            dst, src = (rank + s) % world, (rank - s) % world
            pos, feats, loc = _request(cand, vf, ids, dst)
            if s == 0:  # this rank's own captions: no message
                got_f, got_l = feats, loc
            else:
                head = torch.tensor([feats.shape[0], loc.shape[1]], dtype=torch.int64, device=cdev)
                their = torch.empty(2, dtype=torch.int64, device=cdev)
                _exchange([head], dst, [their], src, group, counter, tag=0)
                mr, wr = int(their[0]), int(their[1])
                got_f = torch.empty((mr, d), dtype=video_feats.dtype, device=cdev)
                got_l = torch.empty((mr, wr), dtype=torch.int32, device=cdev)
                _exchange([feats.to(cdev), loc.to(cdev)], dst, [got_f, got_l], src, group, counter, tag=1)
                got_f, got_l = got_f.to(dev), got_l.to(dev)
            counter.hold(cand, feats, loc, got_f, got_l, merged)
            served = _serve(got_f, got_l, caption_feats, k, ids, rank, rerank)
            if s == 0:
                back = served
            else:
                back = torch.empty((pos.shape[0], k), dtype=torch.int64, device=cdev)
                _exchange([served.to(cdev)], src, [back], dst, group, counter, tag=3)
                back = back.to(dev)
            if pos.numel():
                merged[pos, dst * k:(dst + 1) * k] = back
            del feats, loc, got_f, got_l, served, back
        if hi > lo:
            best = torch.topk(merged, k, dim=1, sorted=True).values
            empty = best == _KEY_MIN
            out_s[lo:hi] = torch.where(empty, float("-inf"), unpack_scores(best))
            out_i[lo:hi] = torch.where(empty, -1, unpack_indices(best))
    stats = {"bytes_sent": counter.sent, "bytes_received": counter.received, "chunks": chunks,
             "chunk_videos": m, "peak_chunk_bytes": counter.peak}
    return out_s, out_i, stats
