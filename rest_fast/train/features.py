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


GROWTH = 1.25  # capacity grows by at most this factor beyond what is needed (bounded over-allocation)


class CaptionFeatures:
    """CLIP text features of every interned caption, indexed by caption id, grown as the cache grows.

    ``feats`` is ``dtype`` (fp16 by default, docs/PRECISION: L2-normalised, then rounded once) ``[capacity, D]`` on
    the compute device; rows ``[0, len(self))`` are valid. Memory at K400 scale (≈4M captions × 512): 4 GiB in fp16.

    * Growth: to ``max(needed, 1.25 × capacity)`` rows (:data:`GROWTH`), so at most 25 % stays unused; the one copy a
      growth makes is of the old rows into the new buffer. :meth:`reserve` sizes the table ahead (the trainer reserves
      N more rows before each round, so a round grows it at most once).
    * New rows are written in place: each rank embeds its shard of the new captions and the shards are broadcast
      straight into their rows of the table (:func:`rest_fast.train.distributed.gather_rows_into`), no concatenated copy.
    * On disk only new rows are written each round (:meth:`save_new`); :meth:`load_rows` streams the round files back
      into place.
    """

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype = torch.float16) -> None:
        self.dim = int(dim)
        self.device = device
        self.dtype = dtype
        self.feats = torch.zeros((0, self.dim), dtype=dtype, device=device)
        self.count = 0
        self.saved = 0  # rows [0, saved) are on disk

    def __len__(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        return int(self.feats.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        return self.feats[: self.count]

    def reserve(self, n: int) -> None:
        """Make room for ``n`` rows in all (one allocation and one copy of the valid rows, when it grows)."""
        if n <= self.capacity:
            return
        new = torch.empty((n, self.dim), dtype=self.dtype, device=self.device)
        new[: self.count].copy_(self.feats[: self.count])
        self.feats = new  # the old buffer is released here: old + new coexist only during the copy

    def _grow(self, n: int) -> None:
        if n > self.capacity:
            self.reserve(max(n, int(self.capacity * GROWTH), 1024))

    @torch.no_grad()
    def update(self, cache, clip, env: DistEnv, *, batch_size: int = 256, amp: bool = True,
               progress: Callable | None = None) -> int:
        """Embed the captions interned since the last update; return how many were embedded.

        Ids are dense and assigned in intern order, so the new ids are exactly ``[len(self), len(cache))``
        (the same set ``cache.new_since`` reports); they are sharded over ranks and gathered into place.
        """
        from rest_fast.train.distributed import gather_rows_into

        total = len(cache)
        if total <= self.count:
            return 0
        new_ids = np.arange(self.count, total, dtype=np.int64)
        mine = new_ids[shard_range(len(new_ids), env.rank, env.world_size)]
        self._grow(total)
        lo = int(mine[0]) if len(mine) else total  # caption id == row
        chunks = range(0, len(mine), batch_size)
        for c0 in (progress(chunks) if progress else chunks):
            texts = list(cache.texts(mine[c0: c0 + batch_size].astype(np.int32)))
            with autocast(env.device, amp):
                f = clip.encode_text(texts)
            rows = self.feats[lo + c0: lo + c0 + len(texts)]
            if f.shape != rows.shape:
                raise RuntimeError(f"the text encoder returned {tuple(f.shape)} for {len(texts)} captions")
            rows.copy_(f.detach())  # rounded to fp16 once, here
        gather_rows_into(env, self.feats[self.count: total])
        self.count = total
        return len(new_ids)

    def save_new(self, path: str | Path) -> tuple[int, int]:
        """Write rows ``[saved, len)`` — those added since the last save — to ``path``; returns that row range."""
        lo, hi = self.saved, self.count
        atomic_save_numpy(path, self.feats[lo:hi].cpu().numpy())
        self.saved = hi
        return lo, hi

    def save(self, path: str | Path) -> None:
        """Write every valid row to ``path`` (one file; used by tools, not by the trainer's rounds)."""
        atomic_save_numpy(path, self.valid.cpu().numpy())

    def load_rows(self, paths, max_rows: int | None = None, *, chunk: int = 1 << 16) -> None:
        """Replace the table by the rows of ``paths`` in order (round files of :meth:`save_new`, or one full file).

        Files are memory-mapped and copied into place ``chunk`` rows at a time (no full-table host copy); at most
        ``max_rows`` rows are kept (a snapshot may predate later captions).
        """
        arrays = []
        for path in paths:
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise ValueError(f"{path}: expected [n, {self.dim}] caption features, got {arr.shape}")
            arrays.append(arr)
        n = sum(a.shape[0] for a in arrays)
        if max_rows is not None:
            n = min(n, max_rows)
        self.feats = torch.empty((0, self.dim), dtype=self.dtype, device=self.device)
        self.count = 0
        self.reserve(n)
        pos = 0
        for arr in arrays:
            take = min(arr.shape[0], n - pos)
            for c0 in range(0, take, chunk):
                c1 = min(take, c0 + chunk)
                block = torch.from_numpy(np.array(arr[c0:c1]))  # a writable copy of one chunk
                self.feats[pos + c0: pos + c1].copy_(block)
            pos += take
        self.count = self.saved = n

    def load(self, path: str | Path, max_rows: int | None = None) -> None:
        """Load one saved file (at most ``max_rows`` rows)."""
        self.load_rows([path], max_rows=max_rows)
