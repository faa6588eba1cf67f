"""Algorithm 1, retrieval update (paper Eqs. 5–6).

For every video i, its pseudo-captions become the K best *distinct* captions of W̃_i ∪ Ω_i, ranked
by the frozen-CLIP score ⟨v_i, t_c⟩ between the video feature and the caption's text feature:

* W̃_i: the video's own K slot captions plus the caption generated for it this round (pending);
* Ω_i: the slot and pending captions of its H nearest videos.

``CaptionCache.candidates`` gathers W̃_i ∪ Ω_i as caption ids (each once per row) and
``rest_fast.ops.rerank_captions`` does the gather-score-select; the result replaces the slots.

The first update (round 0) is special: each video then has T×P initial captions (T frames × P
prompts), more than its K slots, and no slots filled yet. All of them take part: they are passed as
*extra candidates* — for video i, the initial captions of i and of its H neighbours — appended to
what the cache offers, so no initial caption is dropped before it was scored against every video
that may retrieve it. Only *distinct* ids are scored: each video's T×P initial captions are de-duplicated once
(frames of one clip get the same caption again and again), and every block's candidate rows are de-duplicated per
row on the compute device before the re-rank (one int32 sort per row, against a D-wide feature read per duplicate).

Under torchrun the caption-feature table is sharded (``CaptionFeatures(rank=, world_size=)``: caption id ``c`` lives on
rank ``c mod P``) and the re-rank is :func:`rest_fast.retrieval.sharded_rerank.sharded_rerank` (owner computes, exact:
the same ids and scores as one process); its bytes sent per rank are returned as ``rerank_bytes_sent``.

Memory and checks: a rank re-ranks only its block of videos and needs only their neighbour rows (``neighbours`` may
be the whole [N, H] graph or just the rank's rows); blocks are sized by a byte budget on the candidate matrix; the
caption-feature table is validated (finite, right width) once per update here, not per block.
"""

from __future__ import annotations

import numpy as np
import torch

from rest_fast.retrieval.sharded_rerank import distinct_sorted_rows, sharded_rerank
from rest_fast.train.distributed import DistEnv, gather_rows


def initial_candidates(initial_ids: np.ndarray, neighbours: np.ndarray, videos: np.ndarray, *,
                       self_ids: np.ndarray | None = None) -> np.ndarray:
    """Initial caption ids of each video and of its neighbours: int32 [n, (H+1)·M], −1 where there is none.

    Args:
        initial_ids: int32 [N, M] — the M = T×P initial caption ids of every video (−1 = none).
        neighbours: int32/int64 [N, H] — neighbour video indices (self excluded; −1 = no neighbour).
        videos: int64 [n] — the rows of ``neighbours`` to build rows for.
        self_ids: int64 [n] — the videos those rows belong to, when ``neighbours`` holds only some rows
            (default: ``videos``).
    Duplicated ids within a row are kept and −1 may sit anywhere: ``rerank_captions`` returns distinct ids
    and skips −1 wherever it is, so the rows are not compacted (a sort per row would cost more than it saves).
    """
    initial_ids = np.asarray(initial_ids)
    videos = np.asarray(videos, dtype=np.int64)
    nb = np.asarray(neighbours)[videos]  # [n, H]
    me = videos if self_ids is None else np.asarray(self_ids, dtype=np.int64)
    rows = np.concatenate([me[:, None], nb], axis=1)  # [n, H+1]
    gathered = initial_ids[np.where(rows >= 0, rows, 0)]  # [n, H+1, M]
    gathered = np.where((rows >= 0)[:, :, None], gathered, -1)
    return np.ascontiguousarray(gathered.reshape(len(videos), -1), dtype=np.int32)


def distinct_rows(ids: np.ndarray, *, chunk_rows: int = 1 << 16) -> np.ndarray:
    """Each row's distinct ids (−1 dropped), ascending, left-aligned, padded with −1 to the longest row: int32 [n, W].

    Runs ``chunk_rows`` rows at a time: round 0 de-duplicates every video's initial ids (``[N, T·P]``, all N under
    torchrun), and one sort of the whole table would hold ~33 B of temporaries per id (sorted values, int64
    indices and positions, masks): 40 GB at 100M videos. Chunked, the temporaries are bounded and the output is the
    only O(N) allocation (plus one compacting copy when some ids repeat in every row)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D [n, L], got shape {ids.shape}")
    n, L = ids.shape
    out = np.full((n, L), -1, dtype=np.int32)
    width, step = 0, max(1, chunk_rows)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = distinct_sorted_rows(torch.from_numpy(np.ascontiguousarray(ids[lo:hi], dtype=np.int32))).numpy()
        out[lo:hi, : block.shape[1]] = block
        width = max(width, block.shape[1])
    return out if width == L else np.ascontiguousarray(out[:, :width])


def valid_per_row(ids: np.ndarray, *, chunk_rows: int = 1 << 16) -> np.ndarray:
    """Ids ≥ 0 in each row: int64 [n], counted ``chunk_rows`` rows at a time (no full-size mask)."""
    ids = np.asarray(ids)
    out = np.empty(ids.shape[0], dtype=np.int64)
    step = max(1, chunk_rows)
    for lo in range(0, ids.shape[0], step):
        out[lo: lo + step] = np.count_nonzero(ids[lo: lo + step] >= 0, axis=1)
    return out


def _check_table(video_feats: torch.Tensor, caption_feats: torch.Tensor, n_captions: int, chunk: int = 1 << 16) -> None:
    """Validate the features once per update (finite, matching width, enough rows), in chunks (no full-size mask)."""
    if caption_feats.shape[0] < n_captions:
        raise ValueError(f"caption_feats has {caption_feats.shape[0]} rows but the cache holds {n_captions} captions")
    if caption_feats.shape[1] != video_feats.shape[1]:
        raise ValueError(f"caption features have d={caption_feats.shape[1]}, video features d={video_feats.shape[1]}")
    for name, t in (("caption_feats", caption_feats[:n_captions]), ("video_feats", video_feats)):
        for lo in range(0, t.shape[0], chunk):
            # max |x| is finite iff every element is (NaN propagates): 3x cheaper than isfinite().all() on fp16 CPU
            if t.shape[1] and not bool(torch.isfinite(t[lo: lo + chunk].abs().amax())):
                raise ValueError(f"{name} contains NaN or inf (rows {lo}..{min(lo + chunk, t.shape[0]) - 1})")


def _rerank(video_feats: torch.Tensor, caption_feats: torch.Tensor, cands: torch.Tensor, k: int):
    from rest_fast.ops import rerank_captions

    # check=False: _check_table validated the features once for this update, and the cache's ids are in range
    scores, ids = rerank_captions(video_feats, caption_feats, cands, k, check=False)
    return scores.float(), ids.to(torch.int64)


def _local_rows(neighbours: np.ndarray, n: int, mine: np.ndarray) -> tuple[np.ndarray, int]:
    """``(rows, first video)``: ``neighbours`` is either the whole graph [N, H] or this rank's block of it."""
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 2:
        raise ValueError(f"neighbours must be [N, H] or this rank's [n_r, H] rows, got shape {neighbours.shape}")
    if neighbours.shape[0] == n:
        return neighbours, 0
    if neighbours.shape[0] == len(mine):
        return neighbours, int(mine[0]) if len(mine) else 0
    raise ValueError(f"neighbours has {neighbours.shape[0]} rows: expected N={n} or this rank's {len(mine)}")


def num_videos_of(cache, video_feats: torch.Tensor) -> int:
    """N: the cache's video count (``num_videos`` of ``CaptionCache``, ``n`` of ``ShardedCaptionCache``), else the rows
    of ``video_feats`` (which under torchrun may be only this rank's block)."""
    n = getattr(cache, "num_videos", None)
    if n is None:
        n = getattr(cache, "n", None)
    return int(video_feats.shape[0]) if n is None else int(n)


def _local_video_feats(video_feats: torch.Tensor, n: int, mine: np.ndarray) -> torch.Tensor:
    """This rank's rows of ``video_feats``: it is either all N rows or already this rank's block."""
    lo = int(mine[0]) if len(mine) else 0
    if video_feats.shape[0] == n:
        return video_feats[lo: lo + len(mine)]
    if video_feats.shape[0] == len(mine):
        return video_feats
    raise ValueError(f"video_feats has {video_feats.shape[0]} rows: expected N={n} or this rank's {len(mine)}")


def retrieval_update(cache, video_feats: torch.Tensor, caption_feats: torch.Tensor, neighbours: np.ndarray, k: int,
                     env: DistEnv, *, initial_ids: np.ndarray | None = None, block: int | None = None,
                     budget_bytes: int = 64 << 20, progress=None) -> dict:
    """Replace every video's slots by the top-K distinct of W̃_i ∪ Ω_i (Eqs. 5–6); return summary stats.

    Args:
        cache: the ``CaptionCache`` (one process, or an identical replica on every rank: all are updated), or under
            torchrun a ``ShardedCaptionCache`` (each rank sets its own videos' slots).
        video_feats: float [N, D] L2-normalised CLIP video features (fp16 in the trainer; CPU or ``env.device``), or
            under torchrun only this rank's rows ``env.block(N)`` (N is taken from the cache).
        caption_feats: float [C, D] CLIP text features of every interned caption id (on ``env.device``); under
            torchrun this rank's shard only: the rows of ids ``c`` with ``c mod P == rank`` (``CaptionFeatures``).
        neighbours: int [N, H] neighbour indices (self excluded), or only this rank's rows ``env.shard(N)``.
        k: K, the slots per video.
        initial_ids: int32 [N, M] initial caption ids, given for the first update only (see module doc).
        block: at most this many videos re-ranked per call (default: as many as ``budget_bytes`` allows).
        budget_bytes: at most this many bytes of int32 candidates per call (bounds host and device memory; under
            torchrun the chunk buffers of ``sharded_rerank``). Each
            ``rerank_captions`` call validates the whole caption table, so few large calls keep that check small
            against the call's own reads (at K400 scale: 16M candidate rows read per call vs a 4M-row table).
        progress: optional wrapper of the block loop (a tqdm bar).
    Sharded by video over ranks; results are gathered so every replica sets the same rows.
    """
    n = num_videos_of(cache, video_feats)
    if env.distributed:
        return _sharded_update(cache, video_feats, caption_feats, neighbours, k, env, initial_ids=initial_ids,
                               budget_bytes=budget_bytes)
    mine = env.shard(n)
    video_feats = _local_video_feats(video_feats, n, mine)  # all N rows in one process
    _check_table(video_feats, caption_feats, len(cache))
    rows, row0 = _local_rows(neighbours, n, mine)
    dev = env.device
    vfeats = video_feats.to(dev)
    if initial_ids is not None:
        per_video = valid_per_row(initial_ids)  # for the stats: ids before any dedup
        initial_ids = distinct_rows(initial_ids)  # [N, M'] each video's distinct initial captions
    width = (rows.shape[1] + 1) * ((k + 1) + (initial_ids.shape[1] if initial_ids is not None else 0))
    block = max(1, min(block or len(mine) or 1, budget_bytes // (4 * max(1, width))))
    out_scores, out_ids = [], []
    considered = scored = 0
    starts = range(0, len(mine), block)
    for lo in (progress(starts) if progress else starts):
        vids = mine[lo: lo + block]
        nb = np.ascontiguousarray(rows[vids - row0], dtype=np.int32)
        cands = np.asarray(cache.candidates(vids.astype(np.int64), nb))
        if initial_ids is not None:
            extra = initial_candidates(initial_ids, rows, vids - row0, self_ids=vids)
            c = distinct_sorted_rows(torch.from_numpy(np.concatenate([cands, extra], axis=1)).to(dev))
            considered += int(per_video[vids].sum() + np.where(nb >= 0, per_video[np.maximum(nb, 0)], 0).sum())
            considered += int((cands >= 0).sum())
        else:
            c = torch.from_numpy(np.ascontiguousarray(cands, dtype=np.int32)).to(dev)
            considered += int((cands >= 0).sum())
        scored += int(c.shape[0] * c.shape[1])
        s, i = _rerank(vfeats[torch.from_numpy(vids).to(dev)], caption_feats, c, k)
        out_scores.append(s.cpu())
        out_ids.append(i.cpu())
    scores = torch.cat(out_scores) if out_scores else torch.empty((0, k), dtype=torch.float32)
    ids = torch.cat(out_ids) if out_ids else torch.empty((0, k), dtype=torch.int64)
    scores = gather_rows(env, scores.to(env.device) if env.device.type == "cuda" else scores).cpu()
    ids = gather_rows(env, ids.to(env.device) if env.device.type == "cuda" else ids).cpu()
    cache.set(np.arange(n, dtype=np.int64), ids.numpy().astype(np.int32), scores.numpy().astype(np.float32))
    return _summary(scores, ids, considered, scored)


def _summary(scores: torch.Tensor, ids: torch.Tensor, considered: int, scored: int) -> dict:
    filled = ids >= 0
    return {
        "mean_score": float(scores[filled].mean()) if bool(filled.any()) else float("nan"),
        "mean_top1_score": float(scores[:, 0][filled[:, 0]].mean()) if bool(filled[:, 0].any()) else float("nan"),
        "distinct_captions": int(np.unique(ids[filled].numpy()).size),
        "videos_short_of_k": int((~filled).any(dim=1).sum()),
        "candidates_considered": considered,  # this rank's candidate ids before de-duplication (−1 excluded)
        "candidates_scored": scored,  # this rank's candidate slots sent to the re-rank
    }


def _sharded_summary(cache, scores: torch.Tensor, ids: torch.Tensor, considered: int, scored: int) -> dict:
    """:func:`_summary` over every rank's videos, from this rank's rows and the replicated slot ids."""
    filled = ids >= 0
    sums = cache.comm.sum_floats([float(scores[filled].double().sum()), float(filled.sum()),
                                  float(scores[:, 0][filled[:, 0]].double().sum()), float(filled[:, 0].sum())])
    slots = cache.slot_ids
    return {
        "mean_score": float(sums[0] / sums[1]) if sums[1] else float("nan"),
        "mean_top1_score": float(sums[2] / sums[3]) if sums[3] else float("nan"),
        "distinct_captions": cache.distinct_in_slots(),
        "videos_short_of_k": int((slots < 0).any(axis=1).sum()),
        "candidates_considered": considered,
        "candidates_scored": scored,
    }


def _sharded_update(cache, video_feats: torch.Tensor, caption_feats: torch.Tensor, neighbours: np.ndarray, k: int,
                    env: DistEnv, *, initial_ids: np.ndarray | None, budget_bytes: int) -> dict:
    """:func:`retrieval_update` with this rank's shard of the caption features (rows of the ids ``c`` with
    ``c mod P == rank``): candidate rows are built chunk by chunk as in one process and re-ranked by
    :func:`rest_fast.retrieval.sharded_rerank.sharded_rerank`; ``budget_bytes`` bounds its chunk buffers."""
    n, P = num_videos_of(cache, video_feats), env.world_size
    mine = env.shard(n)
    video_feats = _local_video_feats(video_feats, n, mine)  # this rank's rows only (all N may be passed)
    sharded_cache = hasattr(cache, "set_own")
    own = len(range(env.rank, len(cache), P))
    if caption_feats.shape[0] < own:
        raise ValueError(f"caption_feats has {caption_feats.shape[0]} rows but this rank owns {own} of the "
                         f"{len(cache)} captions")
    _check_table(video_feats, caption_feats, own)  # this rank's video rows and caption rows
    rows, row0 = _local_rows(neighbours, n, mine)
    dev = env.device
    per_video = None
    if initial_ids is not None:
        per_video = valid_per_row(initial_ids)
        initial_ids = distinct_rows(initial_ids)
    width = (rows.shape[1] + 1) * ((k + 1) + (initial_ids.shape[1] if initial_ids is not None else 0))
    counts = [0, 0]  # candidates considered, scored

    def candidate_rows(lo: int, hi: int) -> torch.Tensor:
        vids = mine[lo:hi]
        nb = np.ascontiguousarray(rows[vids - row0], dtype=np.int32)
        cands = np.asarray(cache.candidates(vids.astype(np.int64), nb))
        if sharded_cache:  # its rows keep repeats; CaptionCache's hold each id once (the counts must agree)
            cands = distinct_rows(cands)
        counts[0] += int((cands >= 0).sum())
        if initial_ids is None:
            c = torch.from_numpy(np.ascontiguousarray(cands, dtype=np.int32))
        else:
            extra = initial_candidates(initial_ids, rows, vids - row0, self_ids=vids)
            c = distinct_sorted_rows(torch.from_numpy(np.concatenate([cands, extra], axis=1)))
            counts[0] += int(per_video[vids].sum() + np.where(nb >= 0, per_video[np.maximum(nb, 0)], 0).sum())
        counts[1] += int(c.shape[0] * c.shape[1])
        return c

    vfeats = video_feats.to(dev)
    s, i, comm = sharded_rerank(vfeats, candidate_rows, caption_feats, k, budget_bytes=budget_bytes, width=width,
                                rerank=_rerank)
    if sharded_cache:  # each rank sets its own videos' slots; only their ids are shared (16 B a video)
        sent = cache.comm.bytes_sent
        cache.set_own(i.cpu().numpy().astype(np.int32), s.cpu().numpy().astype(np.float32))
        slot_bytes = cache.comm.bytes_sent - sent
        return {**_sharded_summary(cache, s.cpu(), i.cpu(), counts[0], counts[1]),
                "rerank_bytes_sent": int(comm["bytes_sent"]) + slot_bytes, "rerank_chunks": int(comm["chunks"])}
    scores = gather_rows(env, s.to(env.device) if env.device.type == "cuda" else s.cpu()).cpu()
    ids = gather_rows(env, i.to(env.device) if env.device.type == "cuda" else i.cpu()).cpu()
    cache.set(np.arange(n, dtype=np.int64), ids.numpy().astype(np.int32), scores.numpy().astype(np.float32))
    return {**_summary(scores, ids, counts[0], counts[1]), "rerank_bytes_sent": int(comm["bytes_sent"]),
            "rerank_chunks": int(comm["chunks"])}
