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
that may retrieve it. This costs N×(H+1)×T×P scores once (about T×P/(K+1) regular rounds), done in
blocks of videos so memory stays bounded.
"""

from __future__ import annotations

import numpy as np
import torch

from rest_fast.train.distributed import DistEnv, gather_rows


def initial_candidates(initial_ids: np.ndarray, neighbours: np.ndarray, videos: np.ndarray) -> np.ndarray:
    """Initial caption ids of each video and of its neighbours: int32 [n, (H+1)·M], −1 where there is none.

    Args:
        initial_ids: int32 [N, M] — the M = T×P initial caption ids of every video (−1 = none).
        neighbours: int32/int64 [N, H] — neighbour video indices (self excluded; −1 = no neighbour).
        videos: int64 [n] — the videos to build rows for.
    Duplicated ids within a row are kept and −1 may sit anywhere: ``rerank_captions`` returns distinct ids
    and skips −1 wherever it is, so the rows are not compacted (a sort per row would cost more than it saves).
    """
    initial_ids = np.asarray(initial_ids)
    videos = np.asarray(videos, dtype=np.int64)
    nb = np.asarray(neighbours)[videos]  # [n, H]
    rows = np.concatenate([videos[:, None], nb], axis=1)  # [n, H+1]
    gathered = initial_ids[np.where(rows >= 0, rows, 0)]  # [n, H+1, M]
    gathered = np.where((rows >= 0)[:, :, None], gathered, -1)
    return np.ascontiguousarray(gathered.reshape(len(videos), -1), dtype=np.int32)


def _rerank(video_feats: torch.Tensor, caption_feats: torch.Tensor, cands: np.ndarray, k: int, device: torch.device):
    from rest_fast.ops import rerank_captions

    v = video_feats.to(device)
    c = torch.from_numpy(np.ascontiguousarray(cands, dtype=np.int32)).to(device)
    scores, ids = rerank_captions(v, caption_feats, c, k)
    return scores.float(), ids.to(torch.int64)


def retrieval_update(cache, video_feats: torch.Tensor, caption_feats: torch.Tensor, neighbours: np.ndarray, k: int,
                     env: DistEnv, *, initial_ids: np.ndarray | None = None, block: int = 1024,
                     progress=None) -> dict:
    """Replace every video's slots by the top-K distinct of W̃_i ∪ Ω_i (Eqs. 5–6); return summary stats.

    Args:
        cache: the ``CaptionCache`` (every rank holds an identical replica; all are updated).
        video_feats: float [N, D] L2-normalised CLIP video features (CPU or on ``env.device``).
        caption_feats: float [C, D] CLIP text features of every interned caption id (on ``env.device``).
        neighbours: int [N, H] neighbour indices, self excluded.
        k: K, the slots per video.
        initial_ids: int32 [N, M] initial caption ids, given for the first update only (see module doc).
        block: videos re-ranked per call (bounds the candidate matrix).
        progress: optional wrapper of the block loop (a tqdm bar).
    Sharded by video over ranks; results are gathered so every replica sets the same rows.
    """
    n = int(video_feats.shape[0])
    if caption_feats.shape[0] < len(cache):
        raise ValueError(f"caption_feats has {caption_feats.shape[0]} rows but the cache holds {len(cache)} captions")
    mine = env.shard(n)
    neighbours = np.asarray(neighbours)
    out_scores, out_ids = [], []
    if initial_ids is not None:  # rows are (H+1)·M wide: keep a block's candidate matrix near 64 MiB
        width = (neighbours.shape[1] + 1) * np.asarray(initial_ids).shape[1]
        block = max(1, min(block, (1 << 24) // max(1, width)))
    starts = range(0, len(mine), block)
    for lo in (progress(starts) if progress else starts):
        vids = mine[lo: lo + block]
        cands = np.asarray(cache.candidates(vids.astype(np.int64), np.ascontiguousarray(neighbours[vids], dtype=np.int32)))
        if initial_ids is not None:
            cands = np.concatenate([cands, initial_candidates(initial_ids, neighbours, vids)], axis=1)
        s, i = _rerank(video_feats[torch.from_numpy(vids)], caption_feats, cands, k, env.device)
        out_scores.append(s.cpu())
        out_ids.append(i.cpu())
    scores = torch.cat(out_scores) if out_scores else torch.empty((0, k), dtype=torch.float32)
    ids = torch.cat(out_ids) if out_ids else torch.empty((0, k), dtype=torch.int64)
    scores = gather_rows(env, scores.to(env.device) if env.device.type == "cuda" else scores).cpu()
    ids = gather_rows(env, ids.to(env.device) if env.device.type == "cuda" else ids).cpu()
    cache.set(np.arange(n, dtype=np.int64), ids.numpy().astype(np.int32), scores.numpy().astype(np.float32))
    filled = ids >= 0
    return {
        "mean_score": float(scores[filled].mean()) if bool(filled.any()) else float("nan"),
        "mean_top1_score": float(scores[:, 0][filled[:, 0]].mean()) if bool(filled[:, 0].any()) else float("nan"),
        "distinct_captions": int(np.unique(ids[filled].numpy()).size),
        "videos_short_of_k": int((~filled).any(dim=1).sum()),
    }
