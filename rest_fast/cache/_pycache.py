"""Pure-Python caption cache: the reference for, and fallback of, the C++ ``rest_fast._C.CaptionCache``.

Same API, same results, same exceptions, same file format; the rules are listed in
:mod:`rest_fast.cache` and in ``csrc/caption_cache.hpp``. Written for clarity, not speed: per-row
loops with Python containers (the benchmark measures the native class against it).
"""

from __future__ import annotations

import operator
import os
import threading

import numpy as np

from rest_fast.atomic_io import atomic_open
from rest_fast.cache import _format

_MASK64 = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1


def normalize_caption(text: str) -> str:
    """Strip, collapse internal whitespace to one space, lower-case: ASCII rules only.

    Whitespace is the six ASCII characters space, ``\\t \\n \\v \\f \\r``; lower-casing maps ``A-Z`` only.
    Non-ASCII characters pass through unchanged (``"ÉTÉ"`` stays ``"ÉTÉ"``, U+00A0 is not a space),
    which makes the C++ implementation byte-for-byte identical and locale-free.

    Raises ``TypeError`` for a non-``str`` and ``ValueError`` (``UnicodeEncodeError``) for a string that
    is not valid Unicode (lone surrogates).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    # bytes.split() splits on exactly the ASCII whitespace set; bytes.lower() maps only A-Z.
    return b" ".join(text.encode("utf-8").split()).lower().decode("utf-8")


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser on a 64-bit unsigned int (the counter-based hash behind ``sample``)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _as_index(obj, name: str, ndim: int, layout: str) -> np.ndarray:
    """Any integer dtype and strides -> int64 array; the same checks, in the same order, as bindings.cpp."""
    a = np.asarray(obj)
    kind = a.dtype.kind
    if a.size == 0 and kind == "f":  # np.asarray([]) is float64: an empty list is a fine index list
        a = a.astype(np.int64)
        kind = "i"
    if kind not in ("i", "u"):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {a.shape}")
    if kind == "u" and a.dtype.itemsize == 8 and a.size and int(a.max()) > _INT64_MAX:
        raise IndexError(f"{name} holds a value >= 2**63, out of range")
    return a.astype(np.int64, copy=False)


def _as_int(obj, name: str) -> int:
    try:
        return operator.index(obj)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(obj).__name__}") from None


def _range_error(arg: str, pos: tuple[int, ...], value: int, what: str, lo: int, hi: int) -> IndexError:
    where = ", ".join(str(p) for p in pos)
    return IndexError(f"{arg}[{where}] = {value} is out of range: {what} must lie in [{lo}, {hi})")


def _check_range(a: np.ndarray, arg: str, what: str, lo: int, hi: int) -> None:
    bad = (a < lo) | (a >= hi)
    if bad.any():
        pos = tuple(int(x) for x in np.argwhere(bad)[0])
        raise _range_error(arg, pos, int(a[pos]), what, lo, hi)


class PyCaptionCache:
    """Caption cache in pure Python (numpy for storage). See :mod:`rest_fast.cache` for the contract."""

    def __init__(self, num_videos: int, k: int):
        n = _as_int(num_videos, "num_videos")
        kk = _as_int(k, "k")
        if not 1 <= n <= _format.MAX_VIDEOS:
            raise ValueError(f"num_videos must lie in [1, {_format.MAX_VIDEOS}], got {n}")
        if not 1 <= kk <= _format.MAX_K:
            raise ValueError(f"k must lie in [1, {_format.MAX_K}], got {kk}")
        self._n, self._k = n, kk
        self._strings: list[str] = []
        self._index: dict[str, int] = {}
        self._rows = np.full((n, kk + 1), -1, dtype=np.int32)  # k slot ids, then the pending id
        self._scores = np.full((n, kk), -np.inf, dtype=np.float32)
        self._snapshots: dict[int, np.ndarray] = {}  # round -> slot ids [N, k], increasing rounds
        self._lock = threading.RLock()

    # -- properties ------------------------------------------------------------------------------
    @property
    def num_videos(self) -> int:
        return self._n

    @property
    def k(self) -> int:
        return self._k

    @property
    def version(self) -> int:
        return len(self._strings)

    @property
    def rounds(self) -> list[int]:
        with self._lock:
            return list(self._snapshots)

    @property
    def nbytes(self) -> int:
        """Approximate bytes held by the caption store (str objects, list and dict)."""
        import sys

        with self._lock:
            return (sum(sys.getsizeof(s) for s in self._strings) + sys.getsizeof(self._strings)
                    + sys.getsizeof(self._index))

    def __len__(self) -> int:
        return len(self._strings)

    def __repr__(self) -> str:
        return f"PyCaptionCache(num_videos={self._n}, k={self._k}, captions={len(self)}, python)"

    # -- captions --------------------------------------------------------------------------------
    def intern(self, texts) -> np.ndarray:
        """Normalise and intern ``texts`` (iterable of str); returns their ids, int32 [n]."""
        if isinstance(texts, (str, bytes, bytearray)):
            raise TypeError(f"texts must be a sequence of str, not a single {type(texts).__name__}")
        items = tuple(texts)
        norm = []
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
            try:
                b = t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"texts[{i}] cannot be encoded as UTF-8: {exc}") from None
            if len(b) > 0xFFFFFFFF:  # the C++ class stores lengths as uint32 and refuses, so do we
                raise ValueError(f"texts[{i}] is longer than 4 GiB")
            norm.append(b" ".join(b.split()).lower().decode("utf-8"))  # == normalize_caption(t)
        out = np.empty(len(norm), dtype=np.int32)
        with self._lock:
            added: list[str] = []
            for i, s in enumerate(norm):
                cid = self._index.get(s)
                if cid is None:
                    if len(self._strings) >= _format.MAX_CAPTIONS:
                        for t in added:  # all or nothing, as in C++
                            del self._index[t]
                        del self._strings[len(self._strings) - len(added):]
                        raise ValueError(f"the caption cache is full ({_format.MAX_CAPTIONS} captions)")
                    cid = len(self._strings)
                    self._strings.append(s)
                    self._index[s] = cid
                    added.append(s)
                out[i] = cid
        return out

    def text(self, id: int) -> str:  # noqa: A002 - the public API name
        i = _as_int(id, "id")
        with self._lock:
            if not 0 <= i < len(self._strings):
                raise IndexError(f"caption id {i} is out of range [0, {len(self._strings)})")
            return self._strings[i]

    def texts(self, ids) -> list[str]:
        a = _as_index(ids, "ids", 1, "[n]")
        with self._lock:
            _check_range(a, "ids", "caption ids", 0, len(self._strings))
            return [self._strings[i] for i in a.tolist()]

    def new_since(self, version: int) -> np.ndarray:
        """Ids of the captions interned after ``version`` (an earlier value of :attr:`version`)."""
        v = _as_int(version, "version")
        with self._lock:
            c = len(self._strings)
            if not 0 <= v <= c:
                raise ValueError(f"version {v} is not in [0, {c}] (the current version)")
            return np.arange(v, c, dtype=np.int32)

    # -- slots -----------------------------------------------------------------------------------
    def _videos(self, videos) -> np.ndarray:
        return _as_index(videos, "videos", 1, "[n]")

    def get(self, videos) -> tuple[np.ndarray, np.ndarray]:
        """Slot ids int32 [n, k] (-1 = empty) and scores float32 [n, k] (-inf = empty)."""
        v = self._videos(videos)
        _check_range(v, "videos", "video ids", 0, self._n)
        with self._lock:
            return self._rows[v, : self._k].copy(), self._scores[v].copy()

    def set(self, videos, ids, scores) -> None:
        """Replace the k slots of each video. ids int [n, k] (-1 = empty), scores float [n, k]."""
        v = self._videos(videos)
        n, k = v.shape[0], self._k
        i = _as_index(ids, "ids", 2, "[n, k]")
        if i.shape != (n, k):
            raise ValueError(f"ids must have shape (n, k) = ({n}, {k}), got {i.shape}")
        s = np.asarray(scores)
        if s.dtype.kind != "f" and not (s.size == 0 and s.dtype.kind in ("i", "u")):
            raise TypeError(f"scores must be a floating-point array, got dtype {s.dtype}")
        if s.shape != (n, k):
            raise ValueError(f"scores must have shape (n, k) = ({n}, {k}), got {s.shape}")
        s = np.ascontiguousarray(s, dtype=np.float32)
        _check_range(v, "videos", "video ids", 0, self._n)
        with self._lock:
            _check_range(i, "ids", "caption ids", -1, len(self._strings))
            for r in range(n):
                filled = [x for x in i[r].tolist() if x >= 0]
                if len(set(filled)) != len(filled):
                    rep = sorted(x for x in set(filled) if filled.count(x) > 1)[0]
                    raise ValueError(f"ids[{r}] repeats caption id {rep}")
            nan = np.isnan(s) & (i >= 0)
            if nan.any():
                r, j = (int(x) for x in np.argwhere(nan)[0])
                raise ValueError(f"scores[{r}, {j}] is NaN for a filled slot")
            for r, video in enumerate(v.tolist()):  # in order: a repeated video keeps its last row
                self._rows[video, :k] = i[r]
                self._scores[video] = np.where(i[r] < 0, -np.inf, s[r])

    def add_pending(self, videos, ids) -> None:
        """Set the pending (K+1-th, newly generated) caption of each video; -1 clears it."""
        v = self._videos(videos)
        i = _as_index(ids, "ids", 1, "[n]")
        if i.shape[0] != v.shape[0]:
            raise ValueError(f"ids must have shape (n,) = ({v.shape[0]},), got {i.shape}")
        _check_range(v, "videos", "video ids", 0, self._n)
        with self._lock:
            _check_range(i, "ids", "caption ids", -1, len(self._strings))
            for video, cid in zip(v.tolist(), i.tolist()):
                self._rows[video, self._k] = cid

    def candidates(self, videos, neighbours) -> np.ndarray:
        """Own slots ∪ own pending ∪ neighbours' slots and pending, first occurrence kept, int32 [n, L]."""
        v = self._videos(videos)
        nb = _as_index(neighbours, "neighbours", 2, "[n, H]")
        if nb.shape[0] != v.shape[0]:
            raise ValueError(f"neighbours must have n = {v.shape[0]} rows, got shape {nb.shape}")
        _check_range(v, "videos", "video ids", 0, self._n)
        _check_range(nb, "neighbours", "video ids", -1, self._n)
        with self._lock:
            rows = self._rows
            out_rows = []
            for r, video in enumerate(v.tolist()):
                row_nb = nb[r]
                # own row (k slots + pending), then each neighbour's row in column order
                seq = rows[video].tolist() + rows[row_nb[row_nb >= 0]].ravel().tolist()
                out_rows.append([x for x in dict.fromkeys(seq) if x >= 0])  # dicts keep first-insertion order
        width = max((len(r) for r in out_rows), default=0)
        out = np.full((len(out_rows), width), -1, dtype=np.int32)
        for r, ids in enumerate(out_rows):
            out[r, : len(ids)] = ids
        return out

    def sample(self, videos, seed: int) -> np.ndarray:
        """One filled slot per video, uniform, deterministic for (seed, video); -1 if none filled."""
        v = self._videos(videos)
        s = _as_int(seed, "seed") & _MASK64
        _check_range(v, "videos", "video ids", 0, self._n)
        base = splitmix64(s)
        out = np.empty(v.shape[0], dtype=np.int32)
        with self._lock:
            for r, video in enumerate(v.tolist()):
                filled = [x for x in self._rows[video, : self._k].tolist() if x >= 0]
                out[r] = filled[splitmix64(base ^ video) % len(filled)] if filled else -1
        return out

    # -- history ---------------------------------------------------------------------------------
    def snapshot_round(self, round: int) -> None:  # noqa: A002 - the public API name
        """Record every video's slot ids as round ``round`` (>= the latest; equal replaces it)."""
        r = _as_int(round, "round")
        with self._lock:
            if r < 0:
                raise ValueError(f"round must be >= 0, got {r}")
            if self._snapshots and r < next(reversed(self._snapshots)):
                raise ValueError(f"round {r} is older than the latest snapshot "
                                 f"(round {next(reversed(self._snapshots))})")
            self._snapshots[r] = self._rows[:, : self._k].copy()

    def history(self, video: int) -> list[tuple[int, list[str]]]:
        """``[(round, [texts of the filled slots, in slot order]), ...]`` over the snapshots."""
        vi = _as_int(video, "video")
        if not 0 <= vi < self._n:
            raise _range_error("video", (0,), vi, "video ids", 0, self._n)
        with self._lock:
            return [(r, [self._strings[x] for x in ids[vi].tolist() if x >= 0])
                    for r, ids in self._snapshots.items()]

    # -- persistence -----------------------------------------------------------------------------
    def _state(self) -> _format.State:
        return _format.State(self._n, self._k, self._strings, self._rows, self._scores, self._snapshots)

    def save(self, path) -> None:
        """Write the cache to ``path`` atomically: temp file in the same directory, fsync, rename."""
        path = os.fsdecode(os.fspath(path))
        with self._lock:
            header, pieces = _format.pack(self._state())
        with atomic_open(path, "wb", make_parents=False) as f:
            f.write(header)
            for p in pieces:
                f.write(p)

    @classmethod
    def load(cls, path, mmap: bool = False) -> PyCaptionCache:
        """Read a file written by either implementation. Corrupt/truncated -> ``ValueError``.

        ``mmap=True`` parses through a read-only memory map instead of reading the file into a buffer
        first (lower peak memory); the loaded cache always owns its data.
        """
        import mmap as _mmap

        path = os.fsdecode(os.fspath(path))
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if mmap and size > 0:
                m = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
                error = None
                try:
                    state = _format.unpack(m, normalize_caption)
                except ValueError as exc:
                    # Re-raised after the map is closed: the traceback's frames hold views of it.
                    error = str(exc)
                finally:
                    try:
                        m.close()
                    except BufferError:  # a non-ValueError is propagating with views alive; GC closes it
                        pass
                if error is not None:
                    raise ValueError(error)
            else:
                state = _format.unpack(f.read(), normalize_caption)
        obj = cls(state.num_videos, state.k)
        obj._strings = state.strings
        obj._index = {s: i for i, s in enumerate(state.strings)}
        obj._rows, obj._scores, obj._snapshots = state.rows, state.scores, state.snapshots
        return obj
