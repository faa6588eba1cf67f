"""Algorithm 1, neighbour graph Ω: the H nearest videos of every video by frozen-CLIP feature, self excluded.

CLIP is frozen, so the graph is built once per run (exact inner-product top-H of the L2-normalised video
features) and kept as a :class:`rest_fast.retrieval.NeighbourGraph` under ``features/neighbours/``
(memory-mappable, tagged with the features' hash): a resumed run reuses it when the hash matches and
rebuilds it otherwise.

One process: ``NeighbourGraph.load_or_build``. Under torchrun: every rank searches with its own block of
videos as queries over the keys of all ranks (``rest_fast.retrieval.distributed_topk``; each rank's key
shard is its block, so global key indices are video indices), the rows are gathered in rank order, and
rank 0 saves the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rest_fast.train.distributed import DistEnv, barrier, broadcast_object, gather_rows


def neighbour_graph(video_feats: torch.Tensor, h: int, env: DistEnv, *, cache_dir: str | Path,
                    include_self: bool = False) -> np.ndarray:
    """int32 [N, h]: for each video its ``h`` most similar other videos, most similar first (exact).

    ``h`` must already be capped at N−1 (:func:`rest_fast.retrieval.cap_neighbours`). ``include_self``: row
    ``i`` is ``i`` followed by its ``h - 1`` most similar others (``h`` capped at N; ``h = 1`` gives each video
    only itself, the paper's "self-training only" ablation).
    """
    if include_self:
        n = int(video_feats.shape[0])
        if not 1 <= h <= n:
            raise ValueError(f"h must be in [1, N] = [1, {n}] with the video itself included, got {h}")
        own = np.arange(n, dtype=np.int32)[:, None]
        if h == 1:
            return own
        others = neighbour_graph(video_feats, h - 1, env, cache_dir=cache_dir)
        return np.ascontiguousarray(np.concatenate([own, others], axis=1), dtype=np.int32)

    from rest_fast.retrieval import NeighbourGraph, distributed_topk, feature_hash

    path = Path(cache_dir) / "neighbours"
    n = int(video_feats.shape[0])
    if not 1 <= h <= n - 1:
        raise ValueError(f"h must be in [1, N-1] = [1, {n - 1}], got {h}")
    if not env.distributed:
        g = NeighbourGraph.load_or_build(path, video_feats, h, exclude_self=True, device=env.device, cap=False)
        return np.ascontiguousarray(g.indices.numpy(), dtype=np.int32)

    digest = feature_hash(video_feats)
    cached = None
    if env.is_main:
        try:
            g = NeighbourGraph.load(path)
            if g.feature_hash == digest and g.k == h and g.exclude_self and g.n == n:
                cached = np.ascontiguousarray(g.indices.numpy(), dtype=np.int32)
        except (FileNotFoundError, ValueError, KeyError):
            cached = None
    cached = broadcast_object(env, cached)
    if cached is not None:
        return cached
    mine = torch.from_numpy(env.shard(n))
    local = video_feats[mine].to(env.device)
    scores, idx = distributed_topk(local, local, h, exclude=mine.to(env.device))
    comm = (lambda t: t) if env.device.type == "cuda" else (lambda t: t.cpu())
    all_idx = gather_rows(env, comm(idx.to(torch.int32))).cpu()
    all_scores = gather_rows(env, comm(scores.float())).cpu()
    if env.is_main:
        NeighbourGraph(indices=all_idx, scores=all_scores, k=h, exclude_self=True, feature_hash=digest).save(path)
    barrier(env)
    return np.ascontiguousarray(all_idx.numpy(), dtype=np.int32)
