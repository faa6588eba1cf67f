"""Algorithm 1, frozen-CLIP features: video features once (cached, memory-mapped), caption features incrementally.

CLIP is frozen, so a video's feature never changes: it is computed once per run, sharded by video
over the ranks, saved as ``features/video_clip.npy`` with a key (video list, CLIP model, T, size) and
reused — memory-mapped — whenever the key matches (a resumed run, or a second run pointing at the
same features). Caption features follow the caption cache: only captions interned since the last
update (``CaptionCache.new_since(version)``) are sent to the text encoder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from rest_fast.run.rundir import atomic_save_numpy, atomic_write_json
from rest_fast.train.distributed import DistEnv, autocast, barrier, gather_rows, shard_range


def features_key(**parts) -> str:
    """A short hash of what the features depend on (JSON of ``parts``)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]



@torch.no_grad()
def video_features(clip, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_videos: int, env: DistEnv, *,
                   cache_dir: str | Path, key: str, amp: bool = True, progress: Callable | None = None) -> torch.Tensor:
    """L2-normalised CLIP video features float32 [N, D] of every video, computed once and cached.

    Args:
        clip: a ``FrozenCLIP`` (``encode_frames([B,T,3,S,S]) -> [B,D]``, mean over T, L2-normalised).
        batches: this rank's ``(video_indices int64 [B], clips float [B,T,3,S,S])`` in CLIP's normalisation;
            a callable returning the iterable is accepted too, so nothing is decoded on a cache hit.
        num_videos: N.
        cache_dir: folder of ``video_clip.npy`` / ``video_clip.json``.
        key: :func:`features_key` of the inputs; a cached file with another key is recomputed.
    Returns the features on CPU (a copy of the memory-mapped file).
    """
    cache_dir = Path(cache_dir)
    npy, meta = cache_dir / "video_clip.npy", cache_dir / "video_clip.json"
    hit = False
    if meta.exists() and npy.exists():
        try:
            hit = json.loads(meta.read_text()).get("key") == key
        except json.JSONDecodeError:
            hit = False
    hit = bool(_agree(env, hit))
    if not hit:
        mine = shard_range(num_videos, env.rank, env.world_size)
        out: list[torch.Tensor] = []
        seen: list[torch.Tensor] = []
        it = batches() if callable(batches) else batches
        for idx, clips in (progress(it) if progress else it):
            with autocast(env.device, amp):
                f = clip.encode_frames(clips.to(env.device, non_blocking=True))
            out.append(f.float())
            seen.append(idx.cpu())
        if out:
            rows = torch.cat(out)
            order = torch.cat(seen)
            expected = torch.from_numpy(mine)
            if not torch.equal(order, expected):
                raise RuntimeError("video feature batches did not cover this rank's shard in order")
        else:
            rows = torch.zeros((0, _probe_dim(clip)), device=env.device)
        feats = gather_rows(env, rows.to(env.device) if env.device.type == "cuda" else rows.cpu()).cpu()
        if feats.shape[0] != num_videos:
            raise RuntimeError(f"gathered {feats.shape[0]} video features for {num_videos} videos")
        if env.is_main:
            atomic_save_numpy(npy, feats.numpy().astype(np.float32))
            atomic_write_json(meta, {"key": key, "num_videos": num_videos, "dim": int(feats.shape[1])})
        barrier(env)
    arr = np.load(npy, mmap_mode="r")
    if arr.shape[0] != num_videos:
        raise ValueError(f"{npy}: {arr.shape[0]} rows for {num_videos} videos")
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def _probe_dim(clip) -> int:
    dim = getattr(clip, "embed_dim", None) or getattr(clip, "dim", None)
    if dim is None:
        raise RuntimeError("a rank got no videos and the CLIP model does not expose its embedding size")
    return int(dim)


def _agree(env: DistEnv, flag: bool) -> bool:
    """All ranks take the same branch: rank 0 decides (it owns the files)."""
    from rest_fast.train.distributed import broadcast_object

    return broadcast_object(env, flag)


class CaptionFeatures:
    """CLIP text features of every interned caption, indexed by caption id, grown as the cache grows.

    ``feats`` is float32 [capacity, D] on the compute device; rows ``[0, len(self))`` are valid.
    """

    def __init__(self, dim: int, device: torch.device) -> None:
        self.dim = int(dim)
        self.device = device
        self.feats = torch.zeros((0, self.dim), dtype=torch.float32, device=device)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def valid(self) -> torch.Tensor:
        return self.feats[: self.count]

    def _grow(self, n: int) -> None:
        if n <= self.feats.shape[0]:
            return
        cap = max(n, 2 * self.feats.shape[0], 1024)
        new = torch.zeros((cap, self.dim), dtype=torch.float32, device=self.device)
        new[: self.count] = self.feats[: self.count]
        self.feats = new

    @torch.no_grad()
    def update(self, cache, clip, env: DistEnv, *, batch_size: int = 256, amp: bool = True,
               progress: Callable | None = None) -> int:
        """Embed the captions interned since the last update; return how many were embedded.

        Ids are dense and assigned in intern order, so the new ids are exactly ``[len(self), len(cache))``
        (the same set ``cache.new_since`` reports); they are sharded over ranks and gathered.
        """
        total = len(cache)
        if total <= self.count:
            return 0
        new_ids = np.arange(self.count, total, dtype=np.int64)
        mine = new_ids[shard_range(len(new_ids), env.rank, env.world_size)]
        texts = list(cache.texts(mine.astype(np.int32))) if len(mine) else []
        parts = []
        chunks = range(0, len(texts), batch_size)
        for lo in (progress(chunks) if progress else chunks):
            with autocast(env.device, amp):
                f = clip.encode_text(texts[lo: lo + batch_size])
            parts.append(f.float().to(env.device))
        local = torch.cat(parts) if parts else torch.zeros((0, self.dim), device=env.device)
        allf = gather_rows(env, local if env.device.type == "cuda" else local.cpu()).to(self.device)
        if allf.shape[0] != len(new_ids):
            raise RuntimeError(f"embedded {allf.shape[0]} captions, expected {len(new_ids)}")
        self._grow(total)
        self.feats[self.count: total] = allf
        self.count = total
        return len(new_ids)

    def save(self, path: str | Path) -> None:
        atomic_save_numpy(path, self.valid.cpu().numpy())

    def load(self, path: str | Path, max_rows: int | None = None) -> None:
        """Load saved rows (at most ``max_rows``: a snapshot may predate later captions)."""
        arr = np.load(path)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{path}: expected [n, {self.dim}] caption features, got {arr.shape}")
        if max_rows is not None:
            arr = arr[:max_rows]
        self.feats = torch.zeros((0, self.dim), dtype=torch.float32, device=self.device)
        self.count = 0
        self._grow(arr.shape[0])
        self.feats[: arr.shape[0]] = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
        self.count = arr.shape[0]
