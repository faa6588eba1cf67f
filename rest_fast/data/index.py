"""VideoIndex: the list of clips (paths, optional integer labels, optional class names) a loader reads."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from rest_fast.errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")

UNLABELLED = -1  # label of an unlabelled video in a partly labelled index (the loaders' batch label too)

__all__ = ["VideoIndex", "VideoItem", "VIDEO_EXTENSIONS", "UNLABELLED"]


class VideoItem(NamedTuple):
    path: str
    label: int | None


def _check_missing(paths: list[str], skip_missing: bool, what: str) -> tuple[list[int], list[str]]:
    """Indices of existing paths, and the missing ones; raise unless ``skip_missing``."""
    keep, missing = [], []
    for i, p in enumerate(paths):
        if os.path.isfile(p):
            keep.append(i)
        else:
            missing.append(p)
    if missing and not skip_missing:
        first = "\n  ".join(missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} video files listed in {what} do not exist "
            f"(pass skip_missing=True to drop them); first ones:\n  {first}"
        )
    return keep, missing


@dataclass
class VideoIndex:
    """Clips to read: ``paths`` (absolute or as given), ``labels`` (ints, or None when unlabelled;
    :data:`UNLABELLED` (-1) marks the unlabelled videos of a partly labelled index), ``class_names``
    (label -> name, when known) and ``missing`` (paths dropped by ``skip_missing=True``; the loaders put
    them in the bad-files report).

    ``len(index)``, ``index[i]`` -> :class:`VideoItem` ``(path, label)``, ``index[a:b]`` -> a sub-index.
    """

    paths: list[str]
    labels: list[int] | None = None
    class_names: list[str] | None = None
    missing: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        if self.labels is not None:
            self.labels = [int(v) for v in self.labels]
            if len(self.labels) != len(self.paths):
                raise ValueError(f"labels has {len(self.labels)} entries but paths has {len(self.paths)}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return VideoIndex(self.paths[i], None if self.labels is None else self.labels[i], self.class_names)
        label = None if self.labels is None else self.labels[i]
        return VideoItem(self.paths[i], None if label == UNLABELLED else label)

    @property
    def num_unlabelled(self) -> int:
        """Videos without a label (all of them when ``labels`` is None)."""
        if self.labels is None:
            return len(self.paths)
        return sum(1 for y in self.labels if y == UNLABELLED)

    def labelled(self) -> VideoIndex:
        """The sub-index of the labelled videos (empty when ``labels`` is None)."""
        if self.labels is None:
            return VideoIndex([], [], self.class_names)
        keep = [i for i, y in enumerate(self.labels) if y != UNLABELLED]
        return VideoIndex([self.paths[i] for i in keep], [self.labels[i] for i in keep], self.class_names)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        nc = f", {len(self.class_names)} classes" if self.class_names else ""
        n_un = self.num_unlabelled
        lab = "unlabelled" if self.labels is None else f"{n_un} unlabelled" if n_un else "labelled"
        miss = f", {len(self.missing)} missing" if self.missing else ""
        return f"VideoIndex({len(self)} clips, {lab}{nc}{miss})"

    # ------------------------------------------------------------------------------------- builders
    @classmethod
    def from_list(cls, file: str | os.PathLike, root: str | os.PathLike = "", *, skip_missing: bool = False,
                  class_names: Sequence[str] | None = None) -> VideoIndex:
        """Read a split file of lines ``relative/path [label]`` (blank lines and ``#`` comments skipped).

        Paths are joined to ``root``. A line's last whitespace-separated token is its integer label when
        it parses as one; either every line has a label or none has. Paths may contain spaces.
        """
        paths, labels = [], []
        with open(file, encoding="utf-8") as f:
            for raw in f:
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(maxsplit=1)
                label = None
                if len(parts) == 2:
                    try:
                        label = int(parts[1])
                    except ValueError:
                        label = None
                rel = parts[0] if label is not None else line
                paths.append(os.path.join(os.fspath(root), rel))
                labels.append(label)
        has = [v is not None for v in labels]
        if any(has) and not all(has):
            bad = has.index(False) if has[0] else has.index(True)
            raise ValueError(f"{file}: some lines have a label and some do not (first mismatch: entry {bad + 1})")
        if not paths:
            raise UserError(f"{os.fspath(file)} lists no videos")
        keep, missing = _check_missing(paths, skip_missing, os.fspath(file))
        lab = [labels[i] for i in keep] if all(has) and has else None
        return cls([paths[i] for i in keep], lab, list(class_names) if class_names else None, missing)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, *, extensions: Iterable[str] = VIDEO_EXTENSIONS) -> VideoIndex:
        """Every video under ``root``; labels from its class sub-folders when it has them.

        * **class folders** — sub-folders of ``root`` holding videos (found recursively) are classes, sorted by
          name, labels 0..C-1 (a sub-folder without videos still names a class; hidden ones are skipped);
        * **flat** — videos directly in ``root`` and no class folder with videos: unlabelled (``labels=None``),
          as REST needs no labels;
        * **mixed** — both: the loose videos get :data:`UNLABELLED` and a warning says how many.

        Raises :class:`~rest_fast.errors.UserError` when ``root`` holds no video at all.
        """
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise UserError(f"{str(root)!r} is not a folder")
        exts = {e.lower() for e in extensions}

        def is_video(p: Path) -> bool:
            return p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")

        dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [sorted(p for p in (root / d).rglob("*") if is_video(p)) for d in dirs]
        loose = sorted(p for p in root.iterdir() if is_video(p))
        if not any(per_class):
            if not loose:
                raise UserError(f"{str(root)!r} holds no video files ({', '.join(sorted(exts))})")
            return cls([str(p) for p in loose], None, None)
        paths = [str(p) for vids in per_class for p in vids]
        labels = [c for c, vids in enumerate(per_class) for _ in vids]
        if loose:
            warnings.warn(f"{root}: {len(loose)} of {len(paths) + len(loose)} videos lie outside the class "
                          "sub-folders and are unlabelled (used for self-training, left out of accuracy)",
                          UserWarning, stacklevel=2)
            paths += [str(p) for p in loose]
            labels += [UNLABELLED] * len(loose)
        return cls(paths, labels, dirs)

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike], labels: Sequence[int] | None = None, *,
                   skip_missing: bool = False, class_names: Sequence[str] | None = None) -> VideoIndex:
        """An index over explicit paths (optionally with labels)."""
        paths = [os.fspath(p) for p in paths]
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"labels has {len(labels)} entries but paths has {len(paths)}")
        keep, missing = _check_missing(paths, skip_missing, "paths")
        lab = None if labels is None else [int(labels[i]) for i in keep]
        return cls([paths[i] for i in keep], lab, list(class_names) if class_names else None, missing)
