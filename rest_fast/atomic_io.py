"""Crash-safe file writes shared by every part of rest_fast that persists state.

A write goes to a unique temporary file in the destination folder, is flushed and fsynced, then renamed
over the final name (atomic on POSIX) and the folder is fsynced: a reader, or a job restarted after
``kill -9``, sees the old file or the new one, never a torn one. A failed write removes its temporary
file and leaves the previous file intact.

Permissions follow the user's umask (``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders), as
``open()`` and ``mkdir()`` would give: ``tempfile`` creates private 0600/0700 entries, which would leave a
run folder unreadable to the teammates the umask means to share it with.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc``), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path_or_fd: str | os.PathLike | int, *, directory: bool = False) -> None:
    """Give a file (or a folder) made by ``tempfile`` the mode a plain ``open``/``mkdir`` would have given."""
    mode = (0o777 if directory else 0o666) & ~current_umask()
    if isinstance(path_or_fd, int):
        os.fchmod(path_or_fd, mode)
    else:
        os.chmod(path_or_fd, mode)


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new uniquely named folder in ``parent`` with umask permissions (for a folder renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=os.fspath(parent)))
    apply_umask(tmp, directory=True)
    return tmp


def _file_stats(folder: Path) -> dict[Path, tuple[int, int, int]]:
    out = {}
    for p in folder.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        out[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


@contextmanager
def new_files_follow_umask(folder: str | os.PathLike) -> Iterator[None]:
    """Give every file and folder created or rewritten under ``folder`` inside the block the umask's mode.

    For writers we do not control: ``safetensors`` (hence HF ``save_pretrained``) creates its files 0600
    whatever the umask. Entries that were there before the block and were not rewritten (same inode,
    mtime and size) keep their mode: we never change files we did not write. Symlinks are left alone."""
    folder = Path(folder)
    before = _file_stats(folder) if folder.is_dir() else {}
    yield
    for p, stat in _file_stats(folder).items():
        if before.get(p) == stat or p.is_symlink():
            continue
        apply_umask(p, directory=p.is_dir())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or creation inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                make_parents: bool = True) -> Iterator[IO]:
    """``with atomic_open(p) as f: f.write(...)``: ``p`` appears complete when the block exits normally.

    ``make_parents=False`` makes a missing parent folder an error (``FileNotFoundError``) instead."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            apply_umask(f.fileno())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
