"""Round 0's initial captions in chunks: a kill loses at most one chunk, a stop signal nothing.

The initial captions (T×P beam searches per video — most of round 0's time: 19 min on one H100 at K400 scale) are
written as they are made: each rank saves every :data:`CHUNK_BATCHES` eval batches of its block of videos as
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

from rest_fast.run.rundir import atomic_write_json, atomic_write_jsonl, read_jsonl
from rest_fast.train.distributed import DistEnv, all_gather_objects, barrier, gather_list, shard_range
from rest_fast.train.initial_captions import initial_captions
from rest_fast.train.preempt import Preempted, maybe_signal_self

CHUNK_BATCHES = 16  # eval batches per chunk file (K400 on 8 GPUs at eval_batch_size 64: ~30 chunks per rank)
_NAME = re.compile(r"^videos_(\d{8})_(\d{8})\.jsonl$")


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


def done_prefix(folder: Path, lo: int, hi: int, n_videos: int) -> list[list[str]]:
    """Captions of videos ``lo, lo+1, ...`` found in chunk files continuing each other from ``lo`` (up to ``hi``)."""
    chunks = {}
    for p in folder.glob("videos_*.jsonl"):
        m = _NAME.match(p.name)
        if m:
            chunks[int(m.group(1))] = (int(m.group(2)), p)
    out: list[list[str]] = []
    pos = lo
    while pos < hi and pos in chunks:
        end, path = chunks[pos]
        recs = read_jsonl(path)
        if end > hi or end <= pos or [r.get("index") for r in recs] != list(range(pos, end)):
            break  # another split of the videos (a changed world size), or a file we cannot trust: redo from here
        out.extend(r["captions"] for r in recs)
        pos = end
    return out


def write_chunk(folder: Path, lo: int, captions: list[list[str]]) -> None:
    hi = lo + len(captions)
    atomic_write_jsonl(folder / f"videos_{lo:08d}_{hi:08d}.jsonl",
                       [{"index": lo + k, "captions": c} for k, c in enumerate(captions)])


def chunked_initial_captions(model, batches_from: Callable[[int], Iterator], n_videos: int, env: DistEnv, *,
                             folder: Path, key: str, batch_size: int, control, signals, run_root: Path,
                             progress: Callable | None = None, **caption_kw) -> list[list[str]]:
    """:func:`initial_captions` of every video (gathered in global order), resumable chunk by chunk.

    ``batches_from(start)``: this rank's eval batches of BLIP clips from global video ``start`` to the end of its
    block. ``control``: the trainer's :class:`~rest_fast.train.preempt.Control` (stop signals agreed over ranks).
    """
    prepare_parts(folder, key, env)
    mine = shard_range(n_videos, env.rank, env.world_size)
    lo, hi = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
    local = done_prefix(folder, lo, hi, n_videos)
    start = lo + len(local)
    todo = -(-(hi - start) // batch_size)
    rounds = max(all_gather_objects(env, todo))  # every rank takes part in every stop decision
    it = iter(batches_from(start)) if todo else iter(())
    if progress is not None:
        it = iter(progress(it))
    pending: list[list[str]] = []
    pending_lo = start
    for k in range(rounds):
        if k < todo:
            local_batch = next(it)
            pending.extend(initial_captions(model, [local_batch], env=_single(env), **caption_kw))
        maybe_signal_self("round0", k + 1)
        _, stop = control.decide(timed=False)
        if pending and (stop or len(pending) >= CHUNK_BATCHES * batch_size or k + 1 == todo):
            write_chunk(folder, pending_lo, pending)
            local.extend(pending)
            pending_lo += len(pending)
            pending = []
        if stop:
            raise Preempted(signals.signame, f"during round 0 (initial captions of {pending_lo - lo} of this "
                            f"rank's {hi - lo} videos are saved)", run_root)
    if len(local) != hi - lo:
        raise RuntimeError(f"initial captions: {len(local)} of this rank's {hi - lo} videos")
    return gather_list(env, local)


def _single(env: DistEnv) -> DistEnv:
    """``env`` as one process: a batch's captions stay on this rank (gathered once, at the end)."""
    return DistEnv(rank=0, world_size=1, local_rank=env.local_rank, device=env.device)


def drop_parts(folder: Path, env: DistEnv) -> None:
    """Rank 0, once ``initial.jsonl`` is written: the chunks are no longer needed."""
    barrier(env)
    if env.is_main and folder.exists():
        shutil.rmtree(folder)
