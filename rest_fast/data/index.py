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


# Labels of a list without a class file index classes 0..C-1, so C = max label + 1 names are made. Beyond
# this many classes (or far beyond the distinct labels) a label is a typo or a hostile file, not a dataset.
MAX_CLASSES = 100_000


def entry_problem(path: str | os.PathLike) -> str | None:
    """Why a video entry cannot be read as a file (None for a regular file, or a link to one), without opening
    it: a named pipe would block the reader, a device would stream forever."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"dangling symbolic link (to {os.readlink(path)!r}, which does not exist)"
        return "missing file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
            or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file")
    link = f"a symbolic link to {os.readlink(path)!r}, " if os.path.islink(path) else ""
    return f"{link}{kind}, not a video file"


def _check_missing(paths: list[str], skip_missing: bool, what: str) -> tuple[list[int], list[str], dict[str, str]]:
    """Indices of readable files, the others, and why each other one is unusable; raise unless ``skip_missing``."""
    keep, missing, reasons = [], [], {}
    for i, p in enumerate(paths):
        problem = entry_problem(p)
        if problem is None:
            keep.append(i)
        else:
            missing.append(p)
            reasons[p] = problem
    if missing and not skip_missing:
        first = "\n  ".join(missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} video files listed in {what} do not exist "
            f"(pass skip_missing=True to drop them); first ones:\n  {first}"
        )
    return keep, missing, reasons


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
    # why each missing entry is unusable ("missing file", "a named pipe (FIFO), not a video file", ...)
    bad_reasons: dict[str, str] = field(default_factory=dict)

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
        with open(file, encoding="utf-8-sig") as f:  # -sig: a leading BOM is not part of the first path
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
        if all(has):
            _check_labels(labels, class_names, os.fspath(file))
        keep, missing, reasons = _check_missing(paths, skip_missing, os.fspath(file))
        lab = [labels[i] for i in keep] if all(has) and has else None
        return cls([paths[i] for i in keep], lab, list(class_names) if class_names else None, missing, reasons)

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

        unusable: dict[str, str] = {}  # FIFOs, dangling links, links to devices: counted bad files, not dropped

        def is_video(p: Path) -> bool:
            if p.suffix.lower() not in exts or p.name.startswith("."):
                return False
            problem = entry_problem(p)
            if problem is not None and problem != "a folder, not a video file":
                unusable[str(p)] = problem
            return problem is None

        dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [sorted(p for p in (root / d).rglob("*") if is_video(p)) for d in dirs]
        loose = sorted(p for p in root.iterdir() if is_video(p))
        missing = sorted(unusable)
        if not any(per_class):
            if not loose:
                raise UserError(f"{str(root)!r} holds no video files ({', '.join(sorted(exts))})")
            return cls([str(p) for p in loose], None, None, missing, unusable)
        paths = [str(p) for vids in per_class for p in vids]
        labels = [c for c, vids in enumerate(per_class) for _ in vids]
        if loose:
            warnings.warn(f"{root}: {len(loose)} of {len(paths) + len(loose)} videos lie outside the class "
                          "sub-folders and are unlabelled (used for self-training, left out of accuracy)",
                          UserWarning, stacklevel=2)
            paths += [str(p) for p in loose]
            labels += [UNLABELLED] * len(loose)
        return cls(paths, labels, dirs, missing, unusable)

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike], labels: Sequence[int] | None = None, *,
                   skip_missing: bool = False, class_names: Sequence[str] | None = None) -> VideoIndex:
        """An index over explicit paths (optionally with labels)."""
        paths = [os.fspath(p) for p in paths]
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"labels has {len(labels)} entries but paths has {len(paths)}")
        keep, missing, reasons = _check_missing(paths, skip_missing, "paths")
        lab = None if labels is None else [int(labels[i]) for i in keep]
        return cls([paths[i] for i in keep], lab, list(class_names) if class_names else None, missing, reasons)


def _check_labels(labels: list[int], class_names: Sequence[str] | None, file: str) -> None:
    """Refuse labels that cannot index a class list: beyond a given class file, negative (but -1, unlabelled), or
    absurdly large without one (the classes 0..max would be built: ``99999999999999999999`` is 10^20 names)."""
    distinct = set(labels)
    top, low = max(distinct), min(distinct)
    if low < UNLABELLED:
        raise UserError(f"{file}: label {low} is negative (labels are class indices 0..C-1, -1 for unlabelled)")
    if class_names:
        if top >= len(class_names):
            raise UserError(f"{file}: label {top} is beyond the {len(class_names)} classes of the class file "
                            f"(labels are 0..{len(class_names) - 1})")
        return
    bound = max(MAX_CLASSES, 10 * len(distinct))
    if top >= bound:
        raise UserError(f"{file}: label {top} is absurd for a list of {len(distinct)} distinct labels (labels are "
                        f"class indices 0..C-1, at most {bound - 1} here): renumber them, or pass the class names")
