"""Round 0's initial captions in chunks: a kill loses at most one chunk, a stop signal nothing.

The CLIP video features (``features/video_parts/``, ``.npy`` chunks) and the initial captions (T×P beam searches
per video — most of round 0's time: 19 min on one H100 at K400 scale) are written as they are made: each rank saves every :data:`CHUNK_BATCHES` eval batches of its block of videos as
``captions/initial_parts/videos_LLLLLLLL_HHHHHHHH.jsonl`` (global videos ``[L, H)``, one record per video; an atomic
write each). A resumed run reads the chunks that continue its block from the start and captions the rest, starting
at a batch boundary of the block, so its batches — and captions — are those of an uninterrupted run. A stop signal
(:mod:`rest_fast.train.preempt`) is checked after every batch, on every rank together: the batches done are written
as a chunk and the run stops with :class:`~rest_fast.train.preempt.Preempted`. Once ``captions/initial.jsonl`` holds
every video the chunks are deleted. ``initial_parts/key.json`` records what the captions depend on (the same key
as ``initial.json``); chunks made under another key are discarded.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from rest_fast.run.rundir import atomic_save_numpy, atomic_write_json, atomic_write_jsonl, read_jsonl
from rest_fast.train.distributed import DistEnv, all_gather_objects, barrier, gather_list, shard_range
from rest_fast.train.initial_captions import initial_captions
from rest_fast.train.preempt import Preempted, maybe_signal_self

CHUNK_BATCHES = 16  # eval batches per chunk file (K400 on 8 GPUs at eval_batch_size 64: ~30 chunks per rank)
_NAME = re.compile(r"^videos_(\d{8})_(\d{8})\.(jsonl|npy)$")


def features_cached(cache_dir: Path, key: str, env: DistEnv) -> bool:
    """Whether :func:`~rest_fast.train.features.video_features` will find its cache (rank 0 decides, all follow)."""
    from rest_fast.train.distributed import broadcast_object

    hit = False
    meta, npy = Path(cache_dir) / "video_clip.json", Path(cache_dir) / "video_clip.npy"
    if env.is_main and meta.is_file() and npy.is_file():
        try:
            hit = json.loads(meta.read_text()).get("key") == key
        except (OSError, ValueError, AttributeError):
            hit = False
    return bool(broadcast_object(env, hit))


def parts_dir(run_root: Path) -> Path:
    return Path(run_root) / "captions" / "initial_parts"


def prepare_parts(folder: Path, key: str, env: DistEnv) -> None:
    """Rank 0: keep the chunks made under ``key``, drop those of another key (all ranks wait for it)."""
    if env.is_main:
        meta = folder / "key.json"
        try:
            same = json.loads(meta.read_text()).get("key") == key
        except (OSError, ValueError, AttributeError):
            same = False
        if not same and folder.exists():
            shutil.rmtree(folder)  # ours (made by this run under an older key), never a user's folder
        folder.mkdir(parents=True, exist_ok=True)
        if not same:
            atomic_write_json(meta, {"key": key})
    barrier(env)


class CaptionChunks:
    """Chunk files of initial captions: ``videos_L_H.jsonl``, one ``{"index", "captions"}`` record per video."""

    ext = ".jsonl"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def read(self, path: Path, lo: int, hi: int) -> list | None:
        recs = read_jsonl(path)
        if [r.get("index") for r in recs] != list(range(lo, hi)):
            return None
        return [r["captions"] for r in recs]

    def write(self, lo: int, rows: list) -> None:
        atomic_write_jsonl(self.folder / f"videos_{lo:08d}_{lo + len(rows):08d}{self.ext}",
                           [{"index": lo + k, "captions": c} for k, c in enumerate(rows)])


class FeatureChunks:
    """Chunk files of CLIP video features: ``videos_L_H.npy``, float32 [H-L, D] (exact: saved as computed)."""

    ext = ".npy"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def read(self, path: Path, lo: int, hi: int) -> list | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return list(arr) if arr.ndim == 2 and arr.shape[0] == hi - lo else None

    def write(self, lo: int, rows: list) -> None:
        atomic_save_numpy(self.folder / f"videos_{lo:08d}_{lo + len(rows):08d}{self.ext}",
                          np.stack(rows).astype(np.float32))


def done_prefix(store, lo: int, hi: int) -> list:
    """Rows of videos ``lo, lo+1, ...`` found in ``store``'s chunk files continuing each other from ``lo`` (to ``hi``)."""
    chunks = {}
    for p in store.folder.glob(f"videos_*{store.ext}"):
        m = _NAME.match(p.name)
        if m and p.name.endswith(store.ext):
            chunks[int(m.group(1))] = (int(m.group(2)), p)
    out: list = []
    pos = lo
    while pos < hi and pos in chunks:
        end, path = chunks[pos]
        rows = store.read(path, pos, end) if pos < end <= hi else None
        if rows is None:
            break  # another split of the videos (a changed world size), or a file we cannot trust: redo from here
        out.extend(rows)
        pos = end
    return out


def chunked_pass(compute: Callable[[tuple], list], batches_from: Callable[[int], Iterator], n_videos: int,
                 env: DistEnv, *, store, batch_size: int, control, signals, run_root: Path, what: str,
                 progress: Callable | None = None, hook: str = "round0") -> list:
    """This rank's rows (one per video of its block, in order) of a pass over its eval batches, resumable.

    ``compute(batch) -> rows`` of one ``(indices, clips)`` batch; ``batches_from(start)``: this rank's eval batches
    from global video ``start`` to the end of its block. Rows already in ``store``'s chunk files are read, not
    recomputed; new rows are written every :data:`CHUNK_BATCHES` batches, at the block's end, and when a stop
    signal (agreed over ranks by ``control``, the trainer's :class:`~rest_fast.train.preempt.Control`) ends the pass
    with :class:`~rest_fast.train.preempt.Preempted`.
    """
    mine = shard_range(n_videos, env.rank, env.world_size)
    lo, hi = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
    local = done_prefix(store, lo, hi)
    start = lo + len(local)
    todo = -(-(hi - start) // batch_size)
    rounds = max(all_gather_objects(env, todo))  # every rank takes part in every stop decision
    it = iter(batches_from(start)) if todo else iter(())
    if progress is not None:
        it = iter(progress(it))
    pending: list = []
    pending_lo = start
    for k in range(rounds):
        if k < todo:
            pending.extend(compute(next(it)))
        maybe_signal_self(hook, k + 1)  # tests: REST_FAST_TEST_SIGNAL=round0:N / features:N
        _, stop = control.decide(timed=False)
        if pending and (stop or len(pending) >= CHUNK_BATCHES * batch_size or k + 1 == todo):
            store.write(pending_lo, pending)
            local.extend(pending)
            pending_lo += len(pending)
            pending = []
        if stop:
            raise Preempted(signals.signame, f"during round 0 ({what} of {pending_lo - lo} of this rank's "
                            f"{hi - lo} videos are saved)", run_root)
    if len(local) != hi - lo:
        raise RuntimeError(f"{what}: {len(local)} rows for this rank's {hi - lo} videos")
    return local


def chunked_initial_captions(model, batches_from: Callable[[int], Iterator], n_videos: int, env: DistEnv, *,
                             folder: Path, key: str, batch_size: int, control, signals, run_root: Path,
                             progress: Callable | None = None, gather: bool = True,
                             **caption_kw) -> list[list[str]]:
    """:func:`initial_captions` of every video (gathered in global order; with ``gather=False`` this rank's block
    only), resumable chunk by chunk (:func:`chunked_pass`; ``caption_kw``: :func:`initial_captions`' arguments)."""
    prepare_parts(folder, key, env)
    local = chunked_pass(lambda batch: initial_captions(model, [batch], env=_single(env), **caption_kw),
                         batches_from, n_videos, env, store=CaptionChunks(folder), batch_size=batch_size,
                         control=control, signals=signals, run_root=run_root, what="initial captions",
                         progress=progress)
    return gather_list(env, local) if gather else local


def chunked_video_rows(clip, batches_from: Callable[[int], Iterator], n_videos: int, env: DistEnv, *, folder: Path,
                       key: str, batch_size: int, control, signals, run_root: Path, amp, progress: Callable | None = None):
    """This rank's CLIP video features float32 [n_r, D] (``clip.encode_frames`` per batch), resumable chunk by chunk;
    :func:`rest_fast.train.features.video_features` gathers and caches them (see :class:`PrecomputedRows`)."""
    import torch

    from rest_fast.train.distributed import autocast

    @torch.no_grad()
    def compute(batch) -> list:
        with autocast(env.device, amp):
            f = clip.encode_frames(batch[1].to(env.device, non_blocking=True))
        return list(f.float().cpu().numpy())

    prepare_parts(folder, key, env)
    local = chunked_pass(compute, batches_from, n_videos, env, store=FeatureChunks(folder), batch_size=batch_size,
                         control=control, signals=signals, run_root=run_root, what="CLIP video features",
                         progress=progress, hook="features")
    dim = int(getattr(clip, "embed_dim", 0) or getattr(clip, "dim", 0) or 0)
    return torch.from_numpy(np.stack(local)) if local else torch.zeros((0, dim))


class PrecomputedRows:
    """Stands in for CLIP in :func:`~rest_fast.train.features.video_features`: its "clips" are the rows already
    computed (``encode_frames`` returns them), so that function gathers, checks and caches them as it always does."""

    def __init__(self, embed_dim: int) -> None:
        self.embed_dim = embed_dim

    def encode_frames(self, rows):
        return rows


def _single(env: DistEnv) -> DistEnv:
    """``env`` as one process: a batch's captions stay on this rank (gathered once, at the end)."""
    return DistEnv(rank=0, world_size=1, local_rank=env.local_rank, device=env.device)


def drop_parts(folder: Path, env: DistEnv) -> None:
    """Rank 0, once ``initial.jsonl`` is written: the chunks are no longer needed."""
    barrier(env)
    if env.is_main and folder.exists():
        shutil.rmtree(folder)
