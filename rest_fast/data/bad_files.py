"""The bad-files report: which files could not be read, why, and how often they were hit."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rest_fast.atomic_io import atomic_write_text

__all__ = ["BadFilesReport", "TooManyBadFiles"]


class TooManyBadFiles(RuntimeError):
    """More distinct bad files than the loader's ``max_bad_fraction`` allows."""


@dataclass
class _Entry:
    reason: str
    count: int


class BadFilesReport:
    """``path -> (reason, count)``: the first reason seen and how many times the file was hit.

    Loaders fill it (``loader.bad_files``); the trainer writes it into its run directory with
    :meth:`write` (``bad_files.tsv`` and ``bad_files.json``, atomically).
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def add(self, path: str, reason: str, count: int = 1) -> None:
        e = self._entries.get(path)
        if e is None:
            self._entries[path] = _Entry(reason, count)
        else:
            e.count += count

    def merge(self, other: BadFilesReport) -> None:
        for p, e in other._entries.items():
            self.add(p, e.reason, e.count)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: str) -> bool:
        return path in self._entries

    def rows(self) -> list[tuple[str, str, int]]:
        """(path, reason, count), most-hit first then by path."""
        return sorted(((p, e.reason, e.count) for p, e in self._entries.items()), key=lambda r: (-r[2], r[0]))

    def summary(self, limit: int = 5) -> str:
        rows = self.rows()
        if not rows:
            return "no bad files"
        lines = [f"{len(rows)} bad file(s):"] + [f"  {p}: {r} (x{c})" for p, r, c in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"  ... and {len(rows) - limit} more")
        return "\n".join(lines)

    def write(self, run_dir: str | os.PathLike) -> Path:
        """Write ``bad_files.tsv`` (path, reason, count) and ``bad_files.json`` under ``run_dir``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        tsv = "path\treason\tcount\n" + "".join(
            f"{p}\t{r.replace(chr(9), ' ').replace(chr(10), ' ')}\t{c}\n" for p, r, c in rows)
        js = json.dumps([{"path": p, "reason": r, "count": c} for p, r, c in rows], indent=1)
        for name, text in (("bad_files.tsv", tsv), ("bad_files.json", js)):
            atomic_write_text(run_dir / name, text)
        return run_dir / "bad_files.tsv"
