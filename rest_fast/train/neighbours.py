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

What each rank holds under torchrun: the trainer passes only its block of video features (``num_videos=N``, rows
``env.block(N)``, fp16 [N/P, D]; issue 20, item 5) and gets its block of graph rows. The cache tag is then the
sha256 of the P per-block :func:`~rest_fast.retrieval.feature_hash` digests (:func:`block_feature_hash`), so no rank
hashes, or holds, the whole table; the full table may still be passed (``num_videos=None``): the same tag results.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from rest_fast.train.distributed import DistEnv, all_gather_objects, barrier


def neighbour_graph(video_feats: torch.Tensor, h: int, env: DistEnv, *, cache_dir: str | Path,
                    include_self: bool = False, num_videos: int | None = None) -> np.ndarray:
    """int32 [n_r, h]: for each video of this rank's block ``env.shard(N)`` (all N videos in one process) its ``h``
    most similar other videos (global indices), most similar first (exact).

    ``video_feats``: [N, D] every video's features, or with ``num_videos=N`` given, only this rank's block
    ``env.block(N)`` of rows (what the trainer holds under torchrun; in one process the block is all N rows).
    ``h`` must already be capped at N−1 (:func:`rest_fast.retrieval.cap_neighbours`). ``include_self``: row
    ``i`` is ``i`` followed by its ``h - 1`` most similar others (``h`` capped at N; ``h = 1`` gives each video
    only itself, the paper's "self-training only" ablation).
    """
    n = int(video_feats.shape[0]) if num_videos is None else int(num_videos)
    if include_self:
        if not 1 <= h <= n:
            raise ValueError(f"h must be in [1, N] = [1, {n}] with the video itself included, got {h}")
        own = (env.shard(n) if env.distributed else np.arange(n)).astype(np.int32)[:, None]  # this rank's rows
        if h == 1:
            return own
        others = neighbour_graph(video_feats, h - 1, env, cache_dir=cache_dir, num_videos=num_videos)
        return np.ascontiguousarray(np.concatenate([own, others], axis=1), dtype=np.int32)

    from rest_fast.retrieval import NeighbourGraph, distributed_topk

    path = Path(cache_dir) / "neighbours"
    if not 1 <= h <= n - 1:
        raise ValueError(f"h must be in [1, N-1] = [1, {n - 1}], got {h}")
    mine = env.shard(n) if env.distributed else np.arange(n)
    if num_videos is not None and video_feats.shape[0] != len(mine):
        raise ValueError(f"video_feats has {video_feats.shape[0]} rows: expected this rank's {len(mine)} of "
                         f"{n} videos")
    if not env.distributed:
        g = NeighbourGraph.load_or_build(path, video_feats, h, exclude_self=True, device=env.device, cap=False)
        return np.ascontiguousarray(g.indices.numpy(), dtype=np.int32)  # a loaded graph stays memory-mapped

    idx_t = torch.from_numpy(mine)
    local = video_feats if num_videos is not None else video_feats[idx_t]  # this rank's rows
    digest = block_feature_hash(local, env)
    part = rank_graph_dir(path, env.rank, env.world_size)
    try:
        g = NeighbourGraph.load(part)  # memory-mapped: only this rank's rows, read when used
        hit = g.feature_hash == digest and g.k == h and g.exclude_self and g.n == len(mine)
    except (FileNotFoundError, ValueError, KeyError):
        hit = False
    if all(all_gather_objects(env, hit)):
        return np.ascontiguousarray(g.indices.numpy(), dtype=np.int32)
    local = local.to(env.device)
    scores, idx = distributed_topk(local, local, h, exclude=idx_t.to(env.device))
    NeighbourGraph(indices=idx.to(torch.int32).cpu(), scores=scores.float().cpu(), k=h, exclude_self=True,
                   feature_hash=digest).save(part)
    barrier(env)
    return np.ascontiguousarray(idx.to(torch.int32).cpu().numpy())


def block_feature_hash(block: torch.Tensor, env: DistEnv) -> str:
    """The features' tag under torchrun: each rank hashes its own block (:func:`rest_fast.retrieval.feature_hash`,
    streamed), the P digests are all-gathered and the tag is the sha256 of them joined in rank order (no rank needs
    the whole table; the same features cut into the same blocks give the same tag)."""
    from rest_fast.retrieval import feature_hash

    return blocks_tag(all_gather_objects(env, feature_hash(block)))


def blocks_tag(digests: list[str]) -> str:
    """sha256 hex of the per-block digests joined in rank order (see :func:`block_feature_hash`)."""
    return hashlib.sha256("|".join(digests).encode()).hexdigest()


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
