"""Algorithm 1, neighbour graph Ω: the H nearest videos of every video by frozen-CLIP feature, self excluded.

CLIP is frozen, so the graph is built once per run (exact inner-product top-H of the L2-normalised video
features) and kept as a :class:`rest_fast.retrieval.NeighbourGraph` under ``features/neighbours/``
(memory-mappable, tagged with the features' hash): a resumed run reuses it when the hash matches and
rebuilds it otherwise.

Each rank keeps only the rows of the videos it re-ranks (its :meth:`DistEnv.shard` block): at K400 scale the whole
graph is 240K × 2000 int32 = 1.9 GB, a rank's block an eighth of it on 8 GPUs.

One process: ``NeighbourGraph.load_or_build`` (a loaded graph stays memory-mapped). Under torchrun: every rank
searches with its own block of videos as queries over the keys of all ranks
(``rest_fast.retrieval.distributed_topk``; each rank's key shard is its block, so global key indices are video
indices; keys stream around the ranks when they do not all fit the memory budget), and saves *its own rows* as a
graph of its own under ``neighbours/world{P}_rank{r}/`` (:func:`rank_graph_dir`); on a resume each rank
memory-maps its own part when it was built from the same features, ``h`` and world size (all ranks agree, or all
rebuild). No rank ever holds the whole graph (at 10M videos × 2000 neighbours it is 80 GB of int32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rest_fast.train.distributed import DistEnv, all_gather_objects, barrier


def neighbour_graph(video_feats: torch.Tensor, h: int, env: DistEnv, *, cache_dir: str | Path,
                    include_self: bool = False) -> np.ndarray:
    """int32 [n_r, h]: for each video of this rank's block ``env.shard(N)`` (all N videos in one process) its ``h``
    most similar other videos (global indices), most similar first (exact).

    ``h`` must already be capped at N−1 (:func:`rest_fast.retrieval.cap_neighbours`). ``include_self``: row
    ``i`` is ``i`` followed by its ``h - 1`` most similar others (``h`` capped at N; ``h = 1`` gives each video
    only itself, the paper's "self-training only" ablation).
    """
    if include_self:
        n = int(video_feats.shape[0])
        if not 1 <= h <= n:
            raise ValueError(f"h must be in [1, N] = [1, {n}] with the video itself included, got {h}")
        own = (env.shard(n) if env.distributed else np.arange(n)).astype(np.int32)[:, None]  # this rank's rows
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
        return np.ascontiguousarray(g.indices.numpy(), dtype=np.int32)  # a loaded graph stays memory-mapped

    digest = feature_hash(video_feats)
    mine = env.shard(n)
    part = rank_graph_dir(path, env.rank, env.world_size)
    try:
        g = NeighbourGraph.load(part)  # memory-mapped: only this rank's rows, read when used
        hit = g.feature_hash == digest and g.k == h and g.exclude_self and g.n == len(mine)
    except (FileNotFoundError, ValueError, KeyError):
        hit = False
    if all(all_gather_objects(env, hit)):
        return np.ascontiguousarray(g.indices.numpy(), dtype=np.int32)
    idx_t = torch.from_numpy(mine)
    local = video_feats[idx_t].to(env.device)
    scores, idx = distributed_topk(local, local, h, exclude=idx_t.to(env.device))
    NeighbourGraph(indices=idx.to(torch.int32).cpu(), scores=scores.float().cpu(), k=h, exclude_self=True,
                   feature_hash=digest).save(part)
    barrier(env)
    return np.ascontiguousarray(idx.to(torch.int32).cpu().numpy())


def rank_graph_dir(path: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` keeps its rows of the graph (rows ``shard_range(N, rank, world_size)``)."""
    return Path(path) / f"world{world_size:03d}_rank{rank:03d}"


def read_rank_graphs(path: str | Path, world_size: int):
    """The per-rank parts under ``path`` joined in rank order, as one ``NeighbourGraph`` (tests, tools: it holds
    every row)."""
    from rest_fast.retrieval import NeighbourGraph

    parts = [NeighbourGraph.load(rank_graph_dir(path, r, world_size)) for r in range(world_size)]
    return NeighbourGraph(indices=torch.cat([p.indices for p in parts]), scores=torch.cat([p.scores for p in parts]),
                          k=parts[0].k, exclude_self=parts[0].exclude_self, feature_hash=parts[0].feature_hash)
