"""A round's outputs (its captions file; CLIP-TAM when the cache is sharded over ranks, ``ShardedCaptionCache``).

No rank gathers every caption: under torchrun each rank writes the records of its own block of videos to a part file, fetching
the texts of their slot ids from the ranks that hold them, and rank 0 joins the parts into the one
``captions/round_XX.jsonl`` (and ``captions/initial.jsonl``) by streaming copies — the reader API and the file are
those of a one-process run. CLIP-TAM scores each caption on the rank that holds its feature (``id mod P``) and sums
the correct counts. Every function here is collective: all ranks call it together.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from rest_fast.atomic_io import atomic_open
from rest_fast.run.rundir import iter_jsonl
from rest_fast.train.distributed import DistEnv, barrier

__all__ = ["write_jsonl_by_rank", "write_round_captions", "read_initial_block", "clip_tam_sharded"]


def _part(path: Path, rank: int, world: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank:03d}_of{world:03d}.part")


def write_jsonl_by_rank(path: Path, records: Iterable[dict], env: DistEnv) -> None:
    """Every rank writes its ``records`` (its block of videos, in order); rank 0 joins the parts in rank order into
    ``path`` (atomic) and removes them. With one process this is a plain atomic write."""
    path = Path(path)
    target = path if not env.distributed else _part(path, env.rank, env.world_size)
    with atomic_open(target, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if not env.distributed:
        return
    barrier(env)
    if env.is_main:
        parts = [_part(path, r, env.world_size) for r in range(env.world_size)]
        with atomic_open(path, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        for p in parts:
            p.unlink()
    barrier(env)


def write_round_captions(path: Path, cache, env: DistEnv, *, rel: Callable[[int], str],
                         generated: list[str] | None, labels, class_names, chunk: int = 4096,
                         sample: int = 16) -> list[dict]:
    """``captions/round_XX.jsonl``: one record per video in video order, streamed ``chunk`` videos at a time (no
    rank holds all records). ``cache``: a ``CaptionCache`` (one process) or a ``ShardedCaptionCache`` (each rank
    writes its block, texts fetched from their owners). ``generated``: the generated captions of the videos this
    process writes (all, or this rank's block), or None. Returns rank 0's first ``sample`` records (the dashboards'
    table)."""
    from rest_fast.cache.sharded import video_block

    n, world = cache.num_videos, getattr(cache, "world", 1)
    lo, hi = getattr(cache, "lo", 0), getattr(cache, "hi", n)
    texts_of = getattr(cache, "texts_of", None) or (lambda ids: [cache.text(int(c)) if c >= 0 else None for c in ids])
    steps = max(-(-(b - a) // chunk) for a, b in (video_block(n, r, world) for r in range(world)))
    first: list[dict] = []

    def records():
        for t in range(steps):  # every rank runs the same number of (collective) text fetches
            a, b = min(hi, lo + t * chunk), min(hi, lo + (t + 1) * chunk)
            ids, scores = cache.get(np.arange(a, b, dtype=np.int64))
            texts = texts_of(ids.reshape(-1))
            for j in range(b - a):
                i = a + j
                row = ids[j]
                rec = {"video": str(rel(i)), "index": i,
                       "captions": [texts[j * cache.k + s] for s in range(cache.k) if row[s] >= 0],
                       "scores": [round(float(x), 6) for x, c in zip(scores[j], row) if c >= 0]}
                if generated is not None:
                    rec["generated"] = generated[i - lo]
                if labels is not None and labels[i] >= 0:
                    rec["label"] = class_names[labels[i]]
                if len(first) < sample:
                    first.append(rec)
                yield rec

    write_jsonl_by_rank(path, records(), env)
    return first


def read_initial_block(path: Path, n: int, lo: int, hi: int, per_video: int | None = None) -> tuple[list, int]:
    """``(captions of videos [lo, hi), records in the file)`` from ``captions/initial.jsonl``, streamed (only the
    block is kept). ``per_video``: drop the block (return ``[]``) when a record holds another number of captions."""
    block: list = []
    count = 0
    for rec in iter_jsonl(path):
        if lo <= count < hi:
            caps = rec.get("captions")
            if not isinstance(caps, list) or (per_video is not None and len(caps) != per_video):
                return [], -1
            block.append(caps)
        count += 1
    return block, count


def clip_tam_sharded(cache, text_feats, clip, class_emb: torch.Tensor, labels: np.ndarray,
                     rows: dict[str, np.ndarray | None], env: DistEnv) -> dict:
    """CLIP-TAM top-1/top-5 of this round's captions over every labelled video.

    Args:
        labels: int ``[hi - lo]`` this rank's videos' labels (``-1`` unlabelled).
        rows: ``{name: caption ids int [hi - lo] or None}`` (``-1``: no caption, scored as the empty caption, as in
            one process).
    Each id travels with its label to the rank holding its feature, which scores it; the counts are summed.
    """
    from rest_fast.run.clip_tam import nearest_classes

    have = np.flatnonzero(np.asarray(labels) >= 0)
    P, comm = cache.world, cache.comm
    total = int(comm.sum_ints([have.size])[0])
    if total == 0:
        return {}
    topk = min(5, class_emb.shape[0])
    dev = text_feats.device
    out = {"tam_videos": total}
    empty = None
    for name, ids in rows.items():
        if not int(comm.sum_ints([ids is not None])[0]) == P:
            continue
        ids = np.asarray(ids, dtype=np.int64)[have]
        lab = np.asarray(labels, dtype=np.int64)[have]
        dest = np.where(ids >= 0, ids % P, cache.rank)  # no caption: scored here
        order = np.argsort(dest, kind="stable")
        cut = np.searchsorted(dest[order], np.arange(P + 1))
        got_ids = np.concatenate(comm.arrays([ids[order[cut[d]: cut[d + 1]]] for d in range(P)]))
        got_lab = np.concatenate(comm.arrays([lab[order[cut[d]: cut[d + 1]]] for d in range(P)]))
        hits = np.zeros(2, dtype=np.int64)
        if got_ids.size:
            feats = text_feats.feats[torch.from_numpy(np.maximum(got_ids, 0) // P).to(dev)].float()
            if (got_ids < 0).any():
                if empty is None:
                    empty = clip.encode_text([""]).float().to(dev)
                feats[torch.from_numpy(got_ids < 0).to(dev)] = empty
            pred, _ = nearest_classes(feats, class_emb.to(dev), topk)
            pred = pred.cpu().numpy()
            hits[:] = [int((pred[:, 0] == got_lab).sum()), int((pred == got_lab[:, None]).any(axis=1).sum())]
        hits = comm.sum_ints(hits)
        out[f"{name}_top1"] = float(hits[0]) / total
        out[f"{name}_top5"] = float(hits[1]) / total
    return out
