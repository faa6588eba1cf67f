"""Algorithm 1, frozen-CLIP features: video features once (cached, memory-mapped), caption features incrementally.

CLIP is frozen, so a video's feature never changes: it is computed once per run, sharded by video
over the ranks, saved as ``features/video_clip.npy`` with a key (video list, CLIP model, T, size) and
reused — memory-mapped — whenever the key matches (a resumed run, or a second run pointing at the
same features). Caption features follow the caption cache: only captions interned since the last
update (``CaptionCache.new_since(version)``) are sent to the text encoder.

What each rank holds under torchrun (issue 20, item 5): its own block of video features only (``env.block(N)``, the
trainer keeps it in fp16, N·D·2/P bytes); rank 0 writes the file from the other ranks' rows received in bounded
chunks, so no rank ever holds all N rows. One process: all N rows, as before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from rest_fast.atomic_io import atomic_open
from rest_fast.run.rundir import atomic_save_numpy, atomic_write_json
from rest_fast.train.distributed import DistEnv, autocast, barrier, shard_range


def features_key(**parts) -> str:
    """A short hash of what the features depend on (JSON of ``parts``)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]



CHUNK_BYTES = 64 << 20  # rows sent to rank 0 per message when it writes video_clip.npy (bounds its memory)


@torch.no_grad()
def video_features(clip, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_videos: int, env: DistEnv, *,
                   cache_dir: str | Path, key: str, amp: bool = True, progress: Callable | None = None,
                   rows: tuple[int, int] | None = None, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """L2-normalised CLIP video features float32 [N, D] of every video (or rows ``[lo, hi)``), computed once and cached.

    Args:
        clip: a ``FrozenCLIP`` (``encode_frames([B,T,3,S,S]) -> [B,D]``, mean over T, L2-normalised).
        batches: this rank's ``(video_indices int64 [B], clips float [B,T,3,S,S])`` in CLIP's normalisation;
            a callable returning the iterable is accepted too, so nothing is decoded on a cache hit.
        num_videos: N.
        cache_dir: folder of ``video_clip.npy`` / ``video_clip.json``.
        key: :func:`features_key` of the inputs; a cached file with another key is recomputed.
        rows: ``(lo, hi)``: return only those rows (the trainer under torchrun passes ``env.block(N)``).
        chunk_bytes: under torchrun, at most this many bytes of rows per message to rank 0.
    Returns the features on CPU (a copy of rows ``[lo, hi)``, default all N, of the memory-mapped file).

    What each rank holds: each computes its block ``env.block(N)`` only. In one process the block is written with
    ``np.save``; under torchrun rank 0 writes its own block into a memory-mapped temporary file and receives the
    other ranks' blocks in chunks of at most ``chunk_bytes`` (point to point, nothing is gathered on every rank),
    then renames it into place (rows go in with file writes at their offsets); so no rank ever holds all N rows (issue 20, item 5): rank 0 peaks at its block plus
    one chunk, the others at their block, and each returns only the rows it asks for.
    """
    cache_dir = Path(cache_dir)
    npy, meta = cache_dir / "video_clip.npy", cache_dir / "video_clip.json"
    lo, hi = (0, num_videos) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= lo <= hi <= num_videos:
        raise ValueError(f"rows must satisfy 0 <= lo <= hi <= {num_videos}, got {rows}")
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
            block = torch.cat(out)
            del out
            order = torch.cat(seen)
            expected = torch.from_numpy(mine)
            if not torch.equal(order, expected):
                raise RuntimeError("video feature batches did not cover this rank's shard in order")
        else:
            block = torch.zeros((0, _probe_dim(clip)), device=env.device)
        if env.distributed:
            _write_blocks_on_main(env, block, npy, num_videos, chunk_bytes)
            dim = int(block.shape[1])
        else:
            if block.shape[0] != num_videos:
                raise RuntimeError(f"gathered {block.shape[0]} video features for {num_videos} videos")
            atomic_save_numpy(npy, block.cpu().numpy().astype(np.float32))
            dim = int(block.shape[1])
        del block
        if env.is_main:
            atomic_write_json(meta, {"key": key, "num_videos": num_videos, "dim": dim})
        barrier(env)
    arr = np.load(npy, mmap_mode="r")
    if arr.shape[0] != num_videos:
        raise ValueError(f"{npy}: {arr.shape[0]} rows for {num_videos} videos")
    out = torch.from_numpy(np.array(arr[lo:hi], dtype=np.float32))  # only these rows' pages are read
    del arr  # unmapped here: the mapping's pages leave the resident set with it
    return out


RECEIVED_CHUNKS: list[int] = []  # rows per chunk rank 0 received in its last write (tests check the bound)


def _write_blocks_on_main(env: DistEnv, block: torch.Tensor, npy: Path, num_videos: int, chunk_bytes: int) -> None:
    """Rank 0 writes ``npy`` (float32 [N, D]) from every rank's block: its own first, then each other rank's in
    chunks of at most ``chunk_bytes`` (send/recv; CPU tensors on gloo, CUDA tensors on NCCL), through ``atomic_open``
    (a temporary file in the same folder, flushed, fsynced and renamed into place; umask permissions)."""
    import torch.distributed as dist

    from rest_fast.comm import comm_device
    from rest_fast.train.distributed import all_gather_objects

    shapes = all_gather_objects(env, (int(block.shape[0]), int(block.shape[1])))
    dims = {d for _, d in shapes}
    if len(dims) != 1:
        raise RuntimeError(f"the ranks computed video features of different widths {sorted(dims)}")
    dim = dims.pop()
    for r, (count, _) in enumerate(shapes):
        if count != len(shard_range(num_videos, r, env.world_size)):
            raise RuntimeError(f"rank {r} computed {count} video features for its "
                               f"{len(shard_range(num_videos, r, env.world_size))} videos")
    cdev = comm_device(None, env.device)
    step = max(1, int(chunk_bytes) // max(1, 4 * dim))
    if not env.is_main:
        for c0 in range(0, block.shape[0], step):
            dist.send(block[c0: c0 + step].to(cdev, torch.float32).contiguous(), dst=0)
        return
    RECEIVED_CHUNKS.clear()
    # the header np.save writes, then the rows with plain file writes at their offsets: nothing is memory-mapped, so
    # no written page stays in this process's resident set (a mapped write would keep all N rows' pages in rank 0)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (num_videos, dim)}
    row_bytes = 4 * dim
    with atomic_open(npy, "wb") as f:  # temp file, umask, fsync, rename; removed on error
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        f.truncate(offset + num_videos * row_bytes)

        def put(row: int, rows: torch.Tensor) -> None:
            f.seek(offset + row * row_bytes)
            f.write(memoryview(np.ascontiguousarray(rows.cpu().numpy(), dtype=np.float32)))

        own = block.shape[0]
        for c0 in range(0, own, step):  # rank 0's block is rows [0, own)
            put(c0, block[c0: c0 + step])
        buf = torch.empty((min(step, max(c for c, _ in shapes)), dim), dtype=torch.float32, device=cdev)
        for r in range(1, env.world_size):
            rlo = (num_videos * r) // env.world_size
            for c0 in range(0, shapes[r][0], step):
                m = min(step, shapes[r][0] - c0)
                dist.recv(buf[:m], src=r)
                put(rlo + c0, buf[:m])
                RECEIVED_CHUNKS.append(m)


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
      growth makes is of the old rows into the new buffer (old and new coexist during it: 2× the table for a
      moment). :meth:`plan_capacity` avoids that: the trainer plans the captions its whole run can add (≤ N per
      remaining round) at round 0 and on resume, so the table is allocated once, at its final size, and a run that
      cannot hold its last round's table fails at round 0, not hours later.
    * New rows are written in place (each rank embeds the new captions it owns, see below), no concatenated copy.
    * On disk only new rows are written each round (:meth:`save_new`); :meth:`load_rows` streams the round files back
      into place.
    * Sharded over ranks (``world_size > 1``, the trainer under torchrun): rank ``r`` holds only the captions it owns,
      ids ``j·P + r`` at row ``j`` (the layout of :class:`rest_fast.retrieval.sharded_rerank.ShardedIds`), embeds only
      those when they are new and writes only those; no rank ever holds the whole table (issue 20, item 2). The
      re-rank reads it through :func:`rest_fast.retrieval.sharded_rerank.sharded_rerank`. ``len()`` and
      :meth:`reserve` count caption ids (all ranks'); :attr:`valid` is this rank's rows.
    """

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype = torch.float16, *, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dim = int(dim)
        self.device = device
        self.dtype = dtype
        self.rank, self.world_size = int(rank), int(world_size)
        self.feats = torch.zeros((0, self.dim), dtype=dtype, device=device)
        self.count = 0  # caption ids [0, count) are embedded (each on its owner rank)
        self.saved = 0  # ids [0, saved) are on disk
        self.planned = 0  # caption ids every allocation makes room for (plan_capacity)

    def local_rows(self, ids: int) -> int:
        """How many of the caption ids ``[0, ids)`` this rank owns (its rows for them)."""
        return max(0, -(-(ids - self.rank) // self.world_size))

    def __len__(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        return int(self.feats.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        """This rank's rows of the ids embedded so far (all of them in one process)."""
        return self.feats[: self.local_rows(self.count)]

    def plan_capacity(self, n: int) -> None:
        """The caption ids (all ranks') this table will hold by the end of the run: make room for them now (one
        allocation, one copy of the valid rows if any), and have every later allocation (:meth:`reserve`, the loads
        of a resume) take at least that room, so the table never grows (never copies) again."""
        self.planned = max(self.planned, int(n))
        self.reserve(self.planned)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` caption ids in all, at least :attr:`planned` (one allocation and one copy of the valid
        rows, when it grows)."""
        rows = self.local_rows(max(int(n), self.planned))
        if rows <= self.capacity:
            return
        have = self.local_rows(self.count)
        new = torch.empty((rows, self.dim), dtype=self.dtype, device=self.device)
        new[:have].copy_(self.feats[:have])
        self.feats = new  # the old buffer is released here: old + new coexist only during the copy

    def _grow(self, n: int) -> None:
        if self.local_rows(n) > self.capacity:
            self.reserve(max(n, int(self.capacity * self.world_size * GROWTH), 1024))

    @torch.no_grad()
    def update(self, cache, clip, env: DistEnv, *, batch_size: int = 256, amp: bool = True,
               progress: Callable | None = None) -> int:
        """Embed the captions interned since the last update; return how many were embedded.

        Ids are dense and assigned in intern order, so the new ids are exactly ``[len(self), len(cache))``
        (the same set ``cache.new_since`` reports). In one process all of them are embedded; sharded, each rank embeds
        the ones it owns (``id mod P == rank``) into its own rows, and nothing is exchanged. Returns the number of new
        ids (all ranks').
        """
        total = len(cache)
        if total <= self.count:
            return 0
        self._grow(total)
        lo, hi = self.local_rows(self.count), self.local_rows(total)  # this rank's new rows
        chunks = range(lo, hi, batch_size)
        for c0 in (progress(chunks) if progress else chunks):
            rows = self.feats[c0: min(hi, c0 + batch_size)]
            ids = np.arange(c0, c0 + rows.shape[0], dtype=np.int64) * self.world_size + self.rank
            texts = list(cache.texts(ids.astype(np.int32)))
            with autocast(env.device, amp):
                f = clip.encode_text(texts)
            if f.shape != rows.shape:
                raise RuntimeError(f"the text encoder returned {tuple(f.shape)} for {len(texts)} captions")
            rows.copy_(f.detach())  # rounded to fp16 once, here
        new = total - self.count
        self.count = total
        return new

    def save_new(self, path: str | Path) -> tuple[int, int]:
        """Write this rank's rows of the ids added since the last save to ``path``; returns that row range."""
        lo, hi = self.local_rows(self.saved), self.local_rows(self.count)
        atomic_save_numpy(path, self.feats[lo:hi].cpu().numpy())
        self.saved = self.count
        return lo, hi

    def save(self, path: str | Path) -> None:
        """Write every valid row to ``path`` (one file; used by tools, not by the trainer's rounds)."""
        atomic_save_numpy(path, self.valid.cpu().numpy())

    def load_rows(self, paths, max_rows: int | None = None, *, chunk: int = 1 << 16) -> None:
        """Replace the table by the rows of ``paths`` in order (round files of :meth:`save_new`, or one full file).

        Files are memory-mapped and copied into place ``chunk`` rows at a time (no full-table host copy); at most
        ``max_rows`` caption ids are kept (a snapshot may predate later captions). Sharded, ``paths`` are this rank's
        files and hold only its rows.
        """
        arrays = []
        for path in paths:
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise ValueError(f"{path}: expected [n, {self.dim}] caption features, got {arr.shape}")
            arrays.append(arr)
        n = sum(a.shape[0] for a in arrays)
        if max_rows is not None:
            n = min(n, self.local_rows(max_rows))
        self.count = 0  # the rows are replaced: a buffer already large enough (planned) is reused, nothing copied
        self.reserve(n * self.world_size)
        pos = 0
        for arr in arrays:
            take = min(arr.shape[0], n - pos)
            for c0 in range(0, take, chunk):
                c1 = min(take, c0 + chunk)
                block = torch.from_numpy(np.array(arr[c0:c1]))  # a writable copy of one chunk
                self.feats[pos + c0: pos + c1].copy_(block)
            pos += take
        # the ids covered: all of [0, max_rows) when every row of this rank's is here, else up to its last row
        full = max_rows is not None and n == self.local_rows(max_rows)
        self.count = self.saved = max_rows if full else n * self.world_size

    def load_resharded(self, parts: list[list[Path]], old_world: int, total: int, *, chunk: int = 1 << 16) -> list[int]:
        """This rank's rows, read from the per-rank round files of a run made with ``old_world`` ranks (issue 20,
        item 6: a resume on another world size re-shards instead of re-embedding; the rows are the saved bytes).

        ``parts[t][r0]``: old rank ``r0``'s file of round ``t`` (its rows of the ids added that round). ``total``:
        the caption ids to keep (``len(cache)``). Returns the caption count after each round (``count_t``), from
        which :meth:`save_round_files` writes this world size's files. Raises ``ValueError`` when rows are missing.
        """
        self.count = 0  # as in load_rows: replaced rows, a planned buffer reused
        self.reserve(total)
        base = [0] * old_world  # old local row where each old rank's file of this round starts
        filled, counts = 0, []
        for files in parts:
            if len(files) != old_world:
                raise ValueError(f"expected {old_world} per-rank caption-feature files per round, got {len(files)}")
            for r0, path in enumerate(files):
                arr = np.load(path, mmap_mode="r")
                if arr.ndim != 2 or arr.shape[1] != self.dim:
                    raise ValueError(f"{path}: expected [n, {self.dim}] caption features, got {arr.shape}")
                for c0 in range(0, arr.shape[0], chunk):
                    c1 = min(arr.shape[0], c0 + chunk)
                    ids = np.arange(base[r0] + c0, base[r0] + c1, dtype=np.int64) * old_world + r0
                    keep = (ids % self.world_size == self.rank) & (ids < total)
                    if keep.any():
                        block = torch.from_numpy(np.array(arr[c0:c1][keep]))
                        self.feats[torch.from_numpy(ids[keep] // self.world_size).to(self.device)] = \
                            block.to(self.device, self.dtype)
                        filled += int(keep.sum())
                base[r0] += arr.shape[0]
            counts.append(min(total, sum(base)))
        if filled != self.local_rows(total):
            raise ValueError(f"the {old_world}-rank caption-feature files hold {filled} of this rank's "
                             f"{self.local_rows(total)} rows")
        self.count = self.saved = total
        return counts

    def save_round_files(self, counts: list[int], name_of) -> None:
        """Write this rank's rows round by round (``counts[t]`` = caption ids after round ``t``) to ``name_of(t)``."""
        prev = 0
        for t, c in enumerate(counts):
            atomic_save_numpy(name_of(t), self.feats[self.local_rows(prev): self.local_rows(c)].cpu().numpy())
            prev = c

    def load(self, path: str | Path, max_rows: int | None = None) -> None:
        """Load one saved file (at most ``max_rows`` rows)."""
        self.load_rows([path], max_rows=max_rows)
