"""Evaluation protocols of the REST paper, with their class lists and video lists shipped as package data.

=====================  ======  ============  =====================================================================
name                   splits  classes       videos
=====================  ======  ============  =====================================================================
``hmdb51``             1–3     51            1,530 test videos per split; ``shots=2|4|8|16``: few-shot train list
``ucf101``             1–3     101           3,783 / 3,734 / 3,696 test videos; ``shots=``: few-shot train list
``k220``               1–3     160           ER-ZSAR split n: K600 videos of its 160 novel classes, 1-vs-160
``k220-generalized``   1–3     620           the same videos, labels into ER-ZSAR classes620 (K400 + 220), 1-vs-620
``k400``               —       400           Kinetics-400 validation set (19,877 videos)
=====================  ======  ============  =====================================================================

Few-shot training lists exist for split 1 only (the X-CLIP / ViFi-CLIP protocol trains on them and evaluates on
the split-1 test list). Paths are relative to the dataset root as the published lists write them (HMDB/UCF: bare
file names; Kinetics: ``train/…`` or ``val/…``); :meth:`Protocol.locate` also finds videos stored under class
sub-folders. Labels index ``class_names``; the names are kept as published (``ApplyEyeMakeup``, ``brush_hair``),
CLIP-TAM cleans them (:func:`rest_fast.eval.clip_tam.clean_class_name`). Provenance and traps:
``rest_fast/assets/SOURCES.md``.

Evaluate every split with ``[get(name, split=s) for s in splits(name)]``.

Few-shot training lists for splits 2 and 3 are not published; :func:`derive_few_shot` derives them from a data root
(recipe: every video under the root whose class is known — from its file name for HMDB-51/UCF-101, else its class
sub-folder — and that the split's official test list does not hold, sorted by path; M per class drawn with
``numpy.random.default_rng([seed, split, M, label])``, seed 0 by default). ``rest-fast finetune --shots M`` writes the
list it trained on to ``OUT/split<s>/train_videos.txt``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from importlib import resources

__all__ = [
    "Protocol",
    "get",
    "names",
    "splits",
    "shots",
    "read_class_list",
    "read_video_list",
    "class_from_path",
    "path_label_mismatches",
    "derive_few_shot",
]

_SPLIT_PROTOCOLS = ("hmdb51", "ucf101", "k220", "k220-generalized")
_NAMES = (*_SPLIT_PROTOCOLS, "k400")
_SHOTS = (2, 4, 8, 16)
_FEW_SHOT = ("hmdb51", "ucf101")
_ALIASES = {
    "hmdb": "hmdb51",
    "ucf": "ucf101",
    "kinetics400": "k400",
    "k220-gzsl": "k220-generalized",
    "k220-gen": "k220-generalized",
}

# The files each protocol reads (under rest_fast/assets/).
_CLASS_FILES = {"hmdb51": "hmdb51.txt", "ucf101": "ucf101.txt", "k400": "kinetics400.txt"}
_CLASSES620 = "erzsar_kinetics_zsl220_classes620.txt"
_SPLIT_PREFIX = {"hmdb51": "hmdb", "ucf101": "ucf"}


def _asset(kind: str, filename: str):
    return resources.files("rest_fast").joinpath("assets", kind, filename)


@functools.cache
def read_class_list(filename: str) -> tuple[str, ...]:
    """Class names of a shipped ``labels/`` file, one a line, in file order (index = label)."""
    text = _asset("labels", filename).read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(set(names)) != len(names):
        raise ValueError(f"labels/{filename}: duplicate class names")
    return names


@functools.cache
def read_video_list(filename: str) -> tuple[tuple[str, int], ...]:
    """``(relative path, label)`` pairs of a shipped ``splits/`` file (``<path> <label>`` lines)."""
    text = _asset("splits", filename).read_text(encoding="utf-8")
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"splits/{filename}:{lineno}: expected '<path> <label>', got {line!r}")
        out.append((parts[0], int(parts[1])))
    return tuple(out)


@functools.cache
def _erzsar_split_idx620(split: int) -> tuple[int, ...]:
    data = json.loads(_asset("labels", "erzsar_k220_splits.json").read_text(encoding="utf-8"))
    return tuple(int(i) for i in data[f"split{split}"]["test_idx620"])


class Protocol:
    """One evaluation (or few-shot training) set: class names and labelled videos.

    Attributes:
        name: canonical protocol name (``"hmdb51"``, ``"ucf101"``, ``"k220"``, ``"k220-generalized"``, ``"k400"``).
        split: 1–3, or ``None`` for ``k400``.
        shots: ``None`` for a test set; 2/4/8/16 for a few-shot training list.
        class_names: list of class names as published; ``videos`` labels index it.
        videos: list of ``(relative path, label int)``.
        video_list, class_list: the shipped files they came from.
    """

    def __init__(self, name, split, shots, class_names, videos, video_list, class_list):
        self.name = name
        self.split = split
        self.shots = shots
        self.class_names: list[str] = list(class_names)
        self.videos: list[tuple[str, int]] = list(videos)
        self.video_list = video_list
        self.class_list = class_list
        bad = [(p, y) for p, y in self.videos if not 0 <= y < len(self.class_names)]
        if bad:
            raise ValueError(
                f"{video_list}: {len(bad)} labels outside [0, {len(self.class_names)}), e.g. {bad[0]}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.videos]

    @property
    def is_train(self) -> bool:
        """True for a few-shot training list."""
        return self.shots is not None

    def __len__(self) -> int:
        return len(self.videos)

    def __repr__(self) -> str:
        extra = f", shots={self.shots}" if self.shots is not None else ""
        return (
            f"Protocol({self.name!r}, split={self.split}{extra}: {self.num_classes} classes, "
            f"{len(self.videos)} videos from {self.video_list})"
        )

    def candidate_paths(self, root: str | os.PathLike, rel: str, label: int) -> list[str]:
        """Where a listed video may be under ``root``, most likely first.

        The published lists are flat (``v_ApplyEyeMakeup_g01_c01.avi``, ``val/<id>.mp4``); the datasets as
        distributed keep class sub-folders (``ApplyEyeMakeup/v_…``, ``brush_hair/…``, ``val/<class name>/…``
        with spaces or underscores).
        """
        root = os.fspath(root)
        base = os.path.basename(rel)
        head = os.path.dirname(rel)
        cls = self.class_names[label]
        cls_dirs = list(dict.fromkeys([cls, cls.replace(" ", "_")]))
        out = [os.path.join(root, rel)]
        for d in cls_dirs:
            if head:
                out.append(os.path.join(root, head, d, base))
            out.append(os.path.join(root, d, base))
        out.append(os.path.join(root, base))
        return list(dict.fromkeys(out))

    def locate(self, root: str | os.PathLike, walk: bool = False) -> tuple[list[tuple[str, int]], list[str]]:
        """Find the listed videos under ``root``.

        Args:
            root: the dataset's root folder.
            walk: also index every file under ``root`` by name, for layouts :meth:`candidate_paths` does not
                know (one directory walk; the first file of a given name wins).
        Returns:
            ``(found, missing)``: ``[(absolute or root-joined path, label)]`` for the videos that exist, in list
            order, and the relative paths of the ones that do not (report them; do not fail on them).
        """
        by_name: dict[str, str] = {}
        if walk:
            for dirpath, _, files in os.walk(os.fspath(root)):
                for f in files:
                    by_name.setdefault(f, os.path.join(dirpath, f))
        found, missing = [], []
        for rel, label in self.videos:
            path = next((p for p in self.candidate_paths(root, rel, label) if os.path.isfile(p)), None)
            if path is None:
                path = by_name.get(os.path.basename(rel))
            if path is None:
                missing.append(rel)
            else:
                found.append((path, label))
        return found, missing


def names() -> tuple[str, ...]:
    """The protocol names :func:`get` accepts (canonical spelling)."""
    return _NAMES


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"protocol name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _NAMES:
        raise ValueError(f"unknown protocol {name!r}; expected one of {', '.join(_NAMES)}")
    return key


def splits(name: str) -> tuple[int | None, ...]:
    """The splits :func:`get` accepts for ``name``: ``(1, 2, 3)``, or ``(None,)`` for a protocol without splits.

    So ``[get(name, split=s) for s in splits(name)]`` always covers the whole protocol (``--split all``).
    """
    return (1, 2, 3) if _canonical(name) in _SPLIT_PROTOCOLS else (None,)


def shots(name: str) -> tuple[int, ...]:
    """The few-shot sizes :func:`get` accepts for ``name`` (empty if it has no few-shot lists)."""
    return _SHOTS if _canonical(name) in _FEW_SHOT else ()


def _check_split(name: str, split) -> int | None:
    valid = splits(name)
    if split is None:
        # Protocols with splits default to the first one (the few-shot protocol's evaluation split too).
        return valid[0]
    if isinstance(split, str) and split.strip().isdigit():
        split = int(split)
    if isinstance(split, bool) or not isinstance(split, int) or split not in valid:
        if valid == (None,):
            raise ValueError(f"protocol {name!r} has no splits; pass split=None, got split={split!r}")
        raise ValueError(f"protocol {name!r} has splits {valid}; got split={split!r}")
    return split


def get(name: str, split: int | None = None, shots: int | None = None) -> Protocol:
    """The class names and labelled videos of an evaluation protocol.

    Args:
        name: ``"hmdb51"``, ``"ucf101"``, ``"k220"``, ``"k220-generalized"`` or ``"k400"`` (case and ``_``/``-``
            insensitive; ``"hmdb"``, ``"ucf"``, ``"kinetics400"`` also accepted).
        split: 1, 2 or 3 for protocols with splits (``None``: split 1); must be ``None`` for ``k400``.
            ``"all"`` is the caller's job: loop over :func:`splits`.
        shots: ``None`` for the test set; 2, 4, 8 or 16 for the few-shot *training* list of ``hmdb51``/``ucf101``
            (split 1 only — evaluate those runs on ``get(name, split=1)``).
    Returns:
        a :class:`Protocol` with ``.class_names`` and ``.videos`` = ``[(relative path, label)]``.
    """
    key = _canonical(name)
    split = _check_split(key, split)
    if shots is not None:
        if key not in _FEW_SHOT:
            raise ValueError(
                f"protocol {key!r} has no few-shot lists; shots= is only for {', '.join(_FEW_SHOT)}"
            )
        if isinstance(shots, bool) or shots not in _SHOTS:
            raise ValueError(f"shots must be one of {_SHOTS}, got {shots!r}")
        if split != 1:
            raise ValueError(
                f"few-shot lists exist for split 1 only (train1, the X-CLIP/ViFi-CLIP protocol); got split={split}"
            )

    if key in ("hmdb51", "ucf101"):
        class_file = _CLASS_FILES[key]
        prefix = _SPLIT_PREFIX[key]
        video_file = (
            f"{prefix}_splits_train1_few_shot_{shots}.txt" if shots else f"{prefix}_splits_val{split}.txt"
        )
        videos = read_video_list(video_file)
    elif key == "k400":
        class_file, video_file = _CLASS_FILES[key], "k400_splits_val.txt"
        videos = read_video_list(video_file)
    else:
        video_file = f"k600_splits_ZS_split{split}_K600_eval.txt"
        videos = read_video_list(video_file)
        test160_file = f"erzsar_k220_split{split}_test160.txt"
        if key == "k220":
            class_file = test160_file
        else:
            # Same videos, labels remapped by name from the split's 160 list into the 620 list.
            class_file = _CLASSES620
            test160 = read_class_list(test160_file)
            index620 = {c: i for i, c in enumerate(read_class_list(_CLASSES620))}
            missing = [c for c in test160 if c not in index620]
            if missing:
                raise ValueError(f"{test160_file}: classes missing from {_CLASSES620}: {missing[:5]}")
            remap = [index620[c] for c in test160]
            if tuple(remap) != _erzsar_split_idx620(split):
                # Two ER-ZSAR files (names and indices) must agree before any label is remapped.
                raise ValueError(
                    f"{test160_file} disagrees with erzsar_k220_splits.json split{split} test_idx620"
                )
            videos = tuple((p, remap[y]) for p, y in videos)
    return Protocol(
        key,
        split if key != "k400" else None,
        shots,
        read_class_list(class_file),
        videos,
        video_file,
        class_file,
    )


# --------------------------------------------------------------------------- label ↔ file-name checks
# HMDB-51 names: <video title>_<class>_<body part>_<camera motion>_<people>_<viewpoint>_<quality>_<n>.avi
_HMDB_TAIL = re.compile(r"_[a-z]_(?:cm|nm)_np\d+_(?:fr|ba|le|ri)_(?:bad|med|goo)_\d+\.avi$")
# UCF-101 names: v_<Class>_g<group>_c<clip>.avi
_UCF_NAME = re.compile(r"^v_([A-Za-z]+)_g\d+_c\d+\.\w+$")


def class_from_path(name: str, path: str, class_names: Iterable[str] | None = None) -> str | None:
    """The class a HMDB-51 or UCF-101 video's file name says it belongs to (``None`` if it cannot tell).

    HMDB: the class is the longest class name that ends the title part (``…_kick_ball_f_cm_…`` → ``kick_ball``,
    not ``kick``). UCF: the CamelCase word after ``v_``, matched to the class list case-insensitively (files say
    ``HandStandPushups``, the class list ``HandstandPushups``).
    """
    key = _canonical(name)
    if key not in _FEW_SHOT:
        raise ValueError(
            f"class_from_path works for hmdb51 and ucf101 (file names carry the class), not {key!r}"
        )
    classes = list(class_names) if class_names is not None else list(read_class_list(_CLASS_FILES[key]))
    base = os.path.basename(path)
    if key == "hmdb51":
        m = _HMDB_TAIL.search(base)
        if m is None:
            return None
        title = base[: m.start()]
        hits = [c for c in classes if title == c or title.endswith("_" + c)]
        return max(hits, key=len) if hits else None
    m = _UCF_NAME.match(base)
    if m is None:
        return None
    lower = {c.lower(): c for c in classes}
    return lower.get(m.group(1).lower())


def path_label_mismatches(protocol: Protocol) -> list[tuple[str, str, str | None]]:
    """``(path, label's class, class the file name says)`` for every video whose two disagree (HMDB/UCF only).

    Empty for the shipped lists; a list whose class order is swapped (the kick/kick ball trap) shows up here.
    """
    out = []
    for path, label in protocol.videos:
        said = class_from_path(protocol.name, path, protocol.class_names)
        if said != protocol.class_names[label]:
            out.append((path, protocol.class_names[label], said))
    return out


# --------------------------------------------------------------------------- few-shot lists for splits 2 and 3
def _class_of(key: str, rel: str, class_names: list[str], lookup: dict[str, int]) -> int | None:
    """Label of a video found under a data root: its file name's class (HMDB/UCF), else its class sub-folder."""
    said = class_from_path(key, rel, class_names) if key in _FEW_SHOT else None
    if said is not None:
        return lookup[said]
    parent = os.path.basename(os.path.dirname(rel))
    for cand in (parent, parent.replace("_", " "), parent.replace(" ", "_")):
        if cand in lookup:
            return lookup[cand]
    return None


def derive_few_shot(name: str, split: int, shots: int, root: str | os.PathLike, *, seed: int = 0,
                    extensions: Iterable[str] | None = None) -> Protocol:
    """An M-shot training list for ``split`` of ``name``, derived from the videos under ``root``.

    Split 1 has a published list (:func:`get` with ``shots=``); for splits 2 and 3 this is the recipe in the
    module docstring: the videos under ``root`` whose class is known and that split's test list does not hold
    (matched by file name, as the HMDB/UCF lists are flat), sorted by relative path, then ``shots`` per class
    drawn with ``numpy.random.default_rng([seed, split, shots, label])`` (a class with fewer gives all it has). The
    same root and seed always give the same list. Paths in ``videos`` are relative to ``root``.
    """
    import numpy as np

    from rest_fast.data.index import VIDEO_EXTENSIONS

    key = _canonical(name)
    if key not in _FEW_SHOT:
        raise ValueError(f"protocol {key!r} has no few-shot setting; derive_few_shot is for {', '.join(_FEW_SHOT)}")
    split = _check_split(key, split)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    test = get(key, split=split)
    held = {os.path.basename(r) for r, _ in test.videos}
    exts = {e.lower() for e in (extensions or VIDEO_EXTENSIONS)}
    lookup = {c: i for i, c in enumerate(test.class_names)}
    by_class: dict[int, list[str]] = {}
    root = os.fspath(root)
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            if f in held or os.path.splitext(f)[1].lower() not in exts:
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            label = _class_of(key, rel, test.class_names, lookup)
            if label is not None:
                by_class.setdefault(label, []).append(rel)
    videos = []
    for label in sorted(by_class):
        cands = sorted(by_class[label])
        # one generator per class: a class's draw does not depend on what the root holds for the others
        pick = sorted(np.random.default_rng([seed, split, shots, label]).permutation(len(cands))[:shots].tolist())
        videos.extend((cands[i], label) for i in pick)
    source = f"derived: {root} minus {test.video_list}, {shots} per class, seed {seed}"
    return Protocol(key, split, shots, test.class_names, videos, source, test.class_list)
