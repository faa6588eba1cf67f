"""The one exception type for ordinary user mistakes.

:class:`UserError` marks a problem with what the user gave (a path, a flag, a config value, a model that cannot
be downloaded) rather than a bug. :func:`rest_fast.cli.main` prints its message as ONE line on stderr and exits
with code 2; anything else keeps its traceback. It subclasses ``ValueError`` so callers that already catch
``ValueError`` keep working. This module imports nothing of rest_fast: every layer may raise it.

:func:`storage_problem` recognises the storage errors a command cannot fix but the user can (a read-only
folder, a full disk or quota, a file-size limit), which the CLI also reports as one line.
"""

from __future__ import annotations

import errno

__all__ = ["UserError", "one_line", "storage_problem"]


class UserError(ValueError):
    """Bad input from the user; the message names the problem and, where it can, the fix."""


def one_line(exc: BaseException | str) -> str:
    """``exc``'s message on one line (newlines folded into '; ', runs of spaces collapsed)."""
    text = str(exc).strip() or type(exc).__name__
    parts = [" ".join(p.split()) for p in text.splitlines()]
    return "; ".join(p for p in parts if p)


# errno -> what the user can do about it
_STORAGE = {
    errno.EROFS: "the folder is on a read-only file system: pass a writable one",
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
    errno.EFBIG: "the file is larger than the file-size limit (ulimit -f) allows: raise it or write elsewhere",
    errno.EACCES: "no permission to write there: pass a folder you can write to",
    errno.EPERM: "no permission to write there: pass a folder you can write to",
}
# the same conditions when a library reports them as text (safetensors' SafetensorError: "File too large ...")
_STORAGE_TEXT = {"Read-only file system": errno.EROFS, "No space left on device": errno.ENOSPC,
                 "Disk quota exceeded": errno.EDQUOT, "File too large": errno.EFBIG}


def storage_problem(exc: BaseException) -> str | None:
    """One line for a storage error the user can fix (read-only folder, full disk, quota, file-size limit,
    no permission), naming the file when known; None for anything else."""
    code, where = None, None
    if isinstance(exc, OSError) and exc.errno in _STORAGE:
        code, where = exc.errno, exc.filename
    elif not isinstance(exc, OSError) and type(exc).__name__ in ("SafetensorError", "RuntimeError", "OSError"):
        code = next((c for text, c in _STORAGE_TEXT.items() if text in str(exc)), None)
    if code is None:
        return None
    what = f"cannot write {where}" if where else "cannot write"
    return f"{what}: {_STORAGE[code]} ({errno.errorcode.get(code, code)}: {one_line(exc)})"
