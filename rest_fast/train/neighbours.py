"""Algorithm 1, neighbour graph Ω: the H nearest videos of every video by frozen-CLIP feature, self excluded.

CLIP is frozen, so the graph is computed once per run (exact inner-product top-H of the L2-normalised
video features, ``rest_fast.ops.topk_similarity`` with ``exclude`` = the video itself) and saved as
``features/neighbours.npy`` with the hash of the features it came from; a later call (a resumed run)
reuses it when the hash matches and recomputes it otherwise. Under torchrun the queries are sharded
by video over the ranks (every rank holds all the features) and the rows gathered in order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from rest_fast.train.distributed import DistEnv, barrier, broadcast_object, gather_rows
from rest_fast.train.rundir import atomic_save_numpy, atomic_write_json


def features_hash(feats: torch.Tensor) -> str:
    """SHA-256 of the float32 feature bytes (and shape)."""
    a = np.ascontiguousarray(feats.detach().cpu().numpy().astype(np.float32))
    h = hashlib.sha256(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_neighbours(video_feats: torch.Tensor, h: int, env: DistEnv, *, block: int = 4096) -> np.ndarray:
    """int32 [N, h]: for each video the ``h`` most similar other videos, most similar first (exact)."""
    from rest_fast.ops.topk import topk_similarity

    n = int(video_feats.shape[0])
    if not 1 <= h <= n - 1:
        raise ValueError(f"h must be in [1, N-1] = [1, {n - 1}], got {h}")
    keys = video_feats.to(env.device)
    mine = torch.from_numpy(env.shard(n))
    rows = []
    for lo in range(0, len(mine), block):
        q_idx = mine[lo: lo + block].to(env.device)
        _, idx = topk_similarity(keys[q_idx], keys, h, exclude=q_idx)
        rows.append(idx.to(torch.int32))
    local = torch.cat(rows) if rows else torch.zeros((0, h), dtype=torch.int32, device=env.device)
    allr = gather_rows(env, local if env.device.type == "cuda" else local.cpu())
    return allr.cpu().numpy()


def neighbour_graph(video_feats: torch.Tensor, h: int, env: DistEnv, *, cache_dir: str | Path) -> np.ndarray:
    """The cached graph int32 [N, h] for these features, computed when missing or stale (see module doc)."""
    cache_dir = Path(cache_dir)
    npy, meta = cache_dir / "neighbours.npy", cache_dir / "neighbours.json"
    digest = features_hash(video_feats)
    hit = False
    if env.is_main and npy.exists() and meta.exists():
        try:
            m = json.loads(meta.read_text())
            hit = m.get("features_sha256") == digest and int(m.get("h", -1)) == h
        except (json.JSONDecodeError, ValueError):
            hit = False
    if not broadcast_object(env, hit):
        graph = compute_neighbours(video_feats, h, env)
        if env.is_main:
            atomic_save_numpy(npy, graph)
            atomic_write_json(meta, {"features_sha256": digest, "h": h, "num_videos": int(graph.shape[0])})
        barrier(env)
        return graph
    graph = np.load(npy, mmap_mode="r") if env.is_main else None
    graph = broadcast_object(env, None if graph is None else np.asarray(graph))
    return np.ascontiguousarray(graph, dtype=np.int32)
