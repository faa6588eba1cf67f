"""Guards the commands put around their output folder (issue 23, items 3 and 9).

* :func:`locked_output`: ``prepare --out`` is locked as ``train --out`` is (``.lock``: pid and host; a dead
  holder's lock on this host is taken over with a warning, a live one refuses in one line), so two prepares
  never write the same shards. A folder the guard made is removed again when the command fails before it
  wrote anything into it.
* :func:`interrupted_train` / :func:`interrupted_prepare`: the one line a Ctrl-C prints — where the run
  stands and the command that continues it.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rest_fast.run.rundir import LOCK_FILE, RunLock

__all__ = ["locked_output", "interrupted_train", "interrupted_prepare", "is_lock_file"]


def is_lock_file(name: str) -> bool:
    """``.lock`` and the temporaries :class:`RunLock` makes beside it (``.lock.PID.NS.tmp``, ``.lock.stale.*``)."""
    return name == LOCK_FILE or name.startswith(LOCK_FILE + ".")


@contextmanager
def locked_output(out: str | os.PathLike, holder: str) -> Iterator[Path]:
    """Hold ``out``'s lock (creating the folder when needed) for the body; ``holder`` names the command in
    the message a second one gets (``"prepare"``). Raises :class:`~rest_fast.run.rundir.RunLockedError`."""
    out = Path(out).expanduser()
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, holder=holder)
    try:
        lock.acquire()
        yield out
    finally:
        lock.release()
        if made:
            try:
                out.rmdir()  # only when empty: a failed start leaves nothing behind, a started one keeps its work
            except OSError:
                pass


def interrupted_train(root: str | os.PathLike, verb: str = "interrupted") -> str:
    """Where a stopped run stands (from its ``state.json``) and how to continue it, in one line starting with
    ``verb``."""
    root = Path(root)
    resume = f"`rest-fast train --out {shlex.quote(str(root))} --resume auto`"
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict):
        if not (root / "config.yaml").is_file():
            return f"{verb} before the run started; nothing to continue"
        return (f"{verb} before round 0 finished: {root} keeps its config and what round 0 saved; "
                f"continue with {resume}")
    ckpt = state.get("checkpoint") or "no checkpoint yet"
    return (f"{verb}: {root} keeps its last complete state intact (state.json: epoch {state.get('epoch')}, round "
            f"{state.get('round')}, {ckpt}); what came after is redone; continue with {resume}")


def interrupted_prepare(out: str | os.PathLike, command: str) -> str:
    """How far a stopped ``prepare`` got (from its ``manifest.json``) and how to continue it, in one line."""
    out = Path(out)
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        done, shards = int(manifest.get("next", 0)), len(manifest.get("shards", []))
    except (OSError, ValueError, TypeError, AttributeError):
        done, shards = 0, 0
    return (f"interrupted: {out} keeps the first {done} video(s) in {shards} complete shard(s); rerun the same "
            f"command to continue: {command}")
