"""The one exception type for ordinary user mistakes.

:class:`UserError` marks a problem with what the user gave (a path, a flag, a config value, a model that cannot
be downloaded) rather than a bug. :func:`rest_fast.cli.main` prints its message as ONE line on stderr and exits
with code 2; anything else keeps its traceback. It subclasses ``ValueError`` so callers that already catch
``ValueError`` keep working. This module imports nothing: every layer may raise it.
"""

from __future__ import annotations

__all__ = ["UserError", "one_line"]


class UserError(ValueError):
    """Bad input from the user; the message names the problem and, where it can, the fix."""


def one_line(exc: BaseException | str) -> str:
    """``exc``'s message on one line (newlines folded into '; ', runs of spaces collapsed)."""
    text = str(exc).strip() or type(exc).__name__
    parts = [" ".join(p.split()) for p in text.splitlines()]
    return "; ".join(p for p in parts if p)
