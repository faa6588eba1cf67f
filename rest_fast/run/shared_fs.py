"""Refuse a multi-node run whose output folder is not one folder for every rank.

Rank 0 alone writes a run folder and the other ranks read what it wrote (cached features, the caption
cache, checkpoints on resume), so on several nodes ``--out`` must sit on a shared filesystem. A node-local
path (``/scratch/runs/x`` on each node) would otherwise give each node its own half-empty run and fail much
later, or silently diverge. :func:`check_shared_folder` makes it a one-line error at start: rank 0 writes a
random nonce into the folder, every rank reads it back (waiting a little for network filesystems' attribute
caches), and all ranks learn who could not.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

from rest_fast.errors import UserError

CHECK_FILE = ".rest_fast_shared_check"
# How long a rank waits for rank 0's file to appear (NFS may cache a directory's listing for seconds).
WAIT_ENV = "REST_FAST_SHARED_FS_WAIT_S"
DEFAULT_WAIT_S = 30.0


def _reads_nonce(path: Path, nonce: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text(encoding="ascii").strip() == nonce:
                return True
        except (OSError, UnicodeDecodeError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _wait_s() -> float:
    raw = os.environ.get(WAIT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise UserError(f"{WAIT_ENV}={raw!r} is not a number of seconds") from None


def check_shared_folder(folder: str | os.PathLike, rank: int, world_size: int, *, what: str = "--out") -> None:
    """Raise :class:`UserError` on every rank unless all ranks see the same ``folder`` (no-op for 1 process).

    Collective: every rank of the initialised default process group calls it; rank 0 must have created
    ``folder``. The check file is removed again before it returns."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    from rest_fast.atomic_io import atomic_write_text

    folder = Path(folder)
    path = folder / CHECK_FILE
    box: list = [None]
    if rank == 0:
        box[0] = secrets.token_hex(16)
        atomic_write_text(path, box[0])
    dist.broadcast_object_list(box, src=0)
    wait_s = _wait_s()
    seen = _reads_nonce(path, box[0], wait_s)
    views: list = [None] * world_size
    dist.all_gather_object(views, (seen, socket.gethostname(), str(folder.absolute())))
    if rank == 0:
        path.unlink(missing_ok=True)
    blind = [(r, host, where) for r, (ok, host, where) in enumerate(views) if not ok]
    if blind:
        r, host, where = blind[0]
        more = f" (and {len(blind) - 1} more rank(s))" if len(blind) > 1 else ""
        raise UserError(f"{what} {folder} is not one folder for all ranks: rank {r} on {host} does not see, in "
                        f"{where}, the file rank 0 on {views[0][1]} wrote in {views[0][2]} (waited {wait_s:g} s)"
                        f"{more}; a multi-node run needs {what} on a shared filesystem (NFS, Lustre, GPFS, ...)")
