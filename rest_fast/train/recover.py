"""A run folder without ``state.json`` (issue 23, item 1): continue it from what it holds, or refuse.

``state.json`` is written when round 0 ends and replaced after every epoch and round. A run stopped before
round 0 ends (a preemption while it captions the videos: minutes at Kinetics scale) has ``config.yaml``, its
models, features and perhaps initial captions, but no state; a finished run whose ``state.json`` was lost has
checkpoints too. Such a folder is still the run its ``config.yaml`` describes:

* ``--resume auto`` (or a fresh start with the same identity) continues it under its saved config — never the
  demo preset, never another config;
* with checkpoints, the state is rebuilt from the newest intact checkpoint whose round files (caption cache
  and caption features) are there, so no checkpoint is trained over; with none, round 0 restarts from what is
  saved (video features and initial captions are reused when they match);
* checkpoints that cannot be continued from are never overwritten or pruned: the run is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from rest_fast.errors import UserError
from rest_fast.run.config import TrainConfig, identity_differences, load_run_config
from rest_fast.run.rundir import RunDir, verify_checkpoint

__all__ = ["StatelessRunRefused", "saved_config_conflict", "state_from_checkpoints"]


class StatelessRunRefused(UserError):
    """A run folder without ``state.json`` that cannot be continued without overwriting what it holds."""


def _round_files(run: RunDir, r: int) -> bool:
    """The caption cache of round ``r`` and the caption features of rounds 0..r are in the run."""
    if run.saved_cache(r) is None:
        return False
    feats = run.path("features")
    rows = all((feats / f"caption_rows_{i:02d}.npy").is_file() or any(feats.glob(f"caption_rows_{i:02d}.rank000_of*.npy"))
               for i in range(r + 1))  # one process, or rank 0's part of a torchrun's
    return rows or run.path("features", f"captions_{r:02d}.npy").is_file()  # older runs: one table per round


def state_from_checkpoints(run: RunDir) -> dict | None:
    """The state of a run whose ``state.json`` is missing, rebuilt from its checkpoints.

    None when the run has no checkpoint (round 0 restarts from what is saved). Raises
    :class:`StatelessRunRefused` when it has checkpoints but none is intact with its round's files (training
    on would overwrite or prune them)."""
    ckpts = run.list_checkpoints()
    if not ckpts:
        return None
    problems = []
    for ckpt in reversed(ckpts):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            try:
                meta = json.loads((ckpt / "meta.json").read_text())
                epoch, rnd = int(meta["epoch"]), int(meta["round"])
            except (OSError, ValueError, KeyError, TypeError):
                problems.append(f"{ckpt.name}: meta.json has no epoch/round")
                continue
            if _round_files(run, rnd):
                return {"epoch": epoch, "round": rnd, "checkpoint": str(ckpt.relative_to(run.root)),
                        "cache": str(run.saved_cache(rnd).relative_to(run.root)),
                        "caption_features": f"features/caption_rows_{rnd:02d}.npy", "recovered": True}
            problems.append(f"{ckpt.name}: the caption cache of round {rnd} is missing")
        else:
            problems.append(problem)
    raise StatelessRunRefused(
        f"{run.root} has no state.json and none of its {len(ckpts)} checkpoint(s) can be continued "
        f"({'; '.join(problems[:3])}); nothing was changed: move {run.root / 'checkpoints'} aside to restart the "
        "run from round 0, or start a new run with another --out")


def saved_config_conflict(root: str | Path, cfg: TrainConfig) -> str | None:
    """Why ``cfg`` may not start in ``root``, a folder holding another run's ``config.yaml`` (None: it may).

    The folder is that run's: a start whose identity keys differ (another ``data``, the demo preset, ...) would
    overwrite its config and mix its files, so it is refused, naming the first differing keys."""
    path = Path(root) / "config.yaml"
    if not path.is_file():
        return None
    diffs = identity_differences(load_run_config(path), cfg)
    if not diffs:
        return None
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    return (f"{root} holds another run's config.yaml (it differs in {shown}): pass --resume auto to continue "
            "that run with its own config, or another --out (nothing in it was changed)")
