"""Algorithm 1, caption round: generate w̃_i,new for every video, add it, embed new captions, re-rank.

After every R self-training epochs the current captioner describes every video (beam search on
the un-augmented clip, sharded by video); the new caption joins the video's pool as its pending
(K+1-th) caption, only captions the cache has never seen are sent to the CLIP text encoder, and the
retrieval update (Eqs. 5–6) picks the K best distinct captions of W̃_i ∪ Ω_i again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from rest_fast.train.distributed import DistEnv, autocast, gather_list
from rest_fast.train.features import CaptionFeatures
from rest_fast.train.retrieval_update import num_videos_of, retrieval_update


@torch.no_grad()
def generate_captions(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], env: DistEnv, *, prompt: str,
                      num_beams: int, max_length: int, min_length: int, amp: bool = True,
                      progress: Callable | None = None, gather: bool = True) -> list[str]:
    """One beam-search caption per video, gathered from all ranks in global video order (``gather=False``: this
    rank's block only, for a sharded caption cache).

    ``batches``: this rank's ``(video_indices int64 [B], clips float [B,T,3,S,S])``, its shard in order.
    """
    was_training = model.training
    model.eval()
    local: list[str] = []
    for _, clips in (progress(batches) if progress else batches):
        with autocast(env.device, amp):
            out = model.generate(clips.to(env.device, non_blocking=True), prompt=prompt, num_beams=num_beams,
                                 max_length=max_length, min_length=min_length)
        local.extend(s.strip() for s in out.texts)
    if was_training:
        model.train()
    return gather_list(env, local) if gather else local


def caption_round(r: int, generated: list[str], cache, text_feats: CaptionFeatures, clip, video_feats: torch.Tensor,
                  neighbours: np.ndarray, k: int, env: DistEnv, *, batch_size: int = 256, amp: bool = True,
                  initial_ids: np.ndarray | None = None, progress: Callable | None = None,
                  rerank_progress: Callable | None = None) -> dict:
    """Add the round's captions to the cache, embed the new ones, re-rank, and snapshot round ``r``.

    Args:
        generated: one caption per video (global order; this rank's block with a ``ShardedCaptionCache``), or
            ``None`` (round 0).
        video_feats: [N, D] video features, or under torchrun this rank's block ``env.block(N)`` (N: the cache's).
        initial_ids: int32 [N, T·P] initial caption ids, passed for round 0 only.
        progress, rerank_progress: optional wrappers (tqdm bars) of the text-embedding and re-ranking loops.
    Returns the round's summary (new captions embedded, distinct captions, mean scores).
    """
    n = num_videos_of(cache, video_feats)  # video_feats may be this rank's block only (under torchrun)
    new_caption_count = 0
    if generated is not None and hasattr(cache, "add_pending_own"):  # sharded: this rank's block of videos
        if len(generated) != cache.hi - cache.lo:
            raise ValueError(f"generated holds {len(generated)} captions for this rank's {cache.hi - cache.lo} videos")
        version = len(cache)
        ids = cache.intern(list(generated), np.arange(cache.lo, cache.hi), n)
        new_caption_count = len(cache) - version
        cache.add_pending_own(ids)
    elif generated is not None:
        if len(generated) != n:
            raise ValueError(f"generated holds {len(generated)} captions for {n} videos")
        version = cache.version
        ids = np.asarray(cache.intern(list(generated)), dtype=np.int32)
        new_caption_count = len(np.asarray(cache.new_since(version)))
        cache.add_pending(np.arange(n, dtype=np.int64), ids)
    embedded = text_feats.update(cache, clip, env, batch_size=batch_size, amp=amp, progress=progress)
    stats = retrieval_update(cache, video_feats, text_feats.valid, neighbours, k, env, initial_ids=initial_ids,
                             progress=rerank_progress)
    cache.snapshot_round(r)
    return {"round": r, "new_captions": new_caption_count, "embedded": embedded, "cache_size": len(cache), **stats}
