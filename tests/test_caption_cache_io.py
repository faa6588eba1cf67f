"""Caption cache files: round trips, cross-loading between the C++ and Python classes, corruption and
truncation anywhere raising ValueError, and saves that fail without touching the previous file."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from rest_fast import cache
from rest_fast.cache import PyCaptionCache

CLASSES = [PyCaptionCache]
if cache.NATIVE_AVAILABLE:
    from rest_fast import _C

    CLASSES.append(_C.CaptionCache)

needs_native = pytest.mark.skipif(not cache.NATIVE_AVAILABLE, reason=f"native extension: {cache.NATIVE_ERROR}")


def _name(c) -> str:
    return "python" if c is PyCaptionCache else "native"


@pytest.fixture(params=CLASSES, ids=_name)
def cls(request):
    return request.param


def build(cls, n=40, k=3, seed=0):
    rng = np.random.default_rng(seed)
    c = cls(n, k)
    texts = [f"Caption {i} " + "é" * (i % 3) + " ZZ" * (i % 2) for i in range(60)] + ["", "ab", "cd"]
    c.intern(texts)
    for r in range(3):
        ids = np.stack([rng.choice(len(c), k, replace=False) for _ in range(n)]).astype(np.int32)
        ids[rng.random((n, k)) < 0.3] = -1
        c.set(np.arange(n), ids, rng.standard_normal((n, k)))
        c.add_pending(rng.integers(0, n, 10), rng.integers(-1, len(c), 10))
        c.snapshot_round(2 * r)
    return c


def assert_same_state(a, b):
    assert (a.num_videos, a.k, len(a), a.version, a.rounds) == (b.num_videos, b.k, len(b), b.version, b.rounds)
    all_ids = np.arange(len(a))
    assert a.texts(all_ids) == b.texts(all_ids)
    videos = np.arange(a.num_videos)
    for x, y in zip(a.get(videos), b.get(videos)):
        assert np.array_equal(x, y)
    nb = np.random.default_rng(1).integers(-1, a.num_videos, (a.num_videos, 9))
    assert np.array_equal(a.candidates(videos, nb), b.candidates(videos, nb))
    assert np.array_equal(a.sample(videos, 17), b.sample(videos, 17))
    for v in (0, a.num_videos - 1):
        assert a.history(v) == b.history(v)


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_and_cross_load(tmp_path, mmap):
    for src in CLASSES:
        c = build(src)
        path = tmp_path / f"{_name(src)}.rfc"
        c.save(path)  # os.PathLike
        for dst in CLASSES:
            d = dst.load(str(path), mmap=mmap)
            assert type(d) is dst
            assert_same_state(c, d)
            # the rebuilt index finds every existing caption and appends new ones after them
            assert np.array_equal(d.intern(c.texts(np.arange(len(c)))), np.arange(len(c)))
            assert d.intern(["A  brand new caption"]).tolist() == [len(c)]
    assert sorted(os.listdir(tmp_path)) == sorted(f"{_name(s)}.rfc" for s in CLASSES)  # no temp files


@needs_native
def test_both_classes_write_identical_bytes(tmp_path):
    py, nat = build(PyCaptionCache), build(_C.CaptionCache)
    py.save(tmp_path / "a")
    nat.save(tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    empty_py, empty_nat = PyCaptionCache(3, 1), _C.CaptionCache(3, 1)
    empty_py.save(tmp_path / "c")
    empty_nat.save(tmp_path / "d")
    assert (tmp_path / "c").read_bytes() == (tmp_path / "d").read_bytes()
    assert_same_state(_C.CaptionCache.load(tmp_path / "c"), empty_py)


def test_save_overwrites(tmp_path, cls):
    path = tmp_path / "cache.rfc"
    build(cls, n=5).save(path)
    c = build(cls, n=7, seed=3)
    c.save(path)
    assert_same_state(cls.load(path), c)


def _load_all(data: bytes, tmp_path: Path, match: str | None = None, mmap_too: bool = True) -> None:
    path = tmp_path / "bad.rfc"
    path.write_bytes(data)
    for c in CLASSES:
        for mm in (False, True) if mmap_too else (False,):
            with pytest.raises(ValueError, match=match):
                c.load(path, mmap=mm)


def test_every_byte_flip_is_detected(tmp_path):
    src = PyCaptionCache(4, 2)
    src.intern(["ab", "cd", "é"])
    src.set([0, 1], [[0, 1], [2, -1]], np.ones((2, 2)))
    src.snapshot_round(1)
    src.save(tmp_path / "good.rfc")
    data = (tmp_path / "good.rfc").read_bytes()
    rng = np.random.default_rng(0)
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= int(rng.integers(1, 256))
        _load_all(bytes(bad), tmp_path, mmap_too=pos % 7 == 0)


def test_random_multi_byte_corruption_is_detected(tmp_path):
    build(PyCaptionCache).save(tmp_path / "good.rfc")
    data = (tmp_path / "good.rfc").read_bytes()
    rng = np.random.default_rng(1)
    for _ in range(40):
        bad = bytearray(data)
        for pos in rng.choice(len(data), int(rng.integers(2, 20)), replace=False):
            bad[pos] ^= int(rng.integers(1, 256))
        _load_all(bytes(bad), tmp_path, mmap_too=False)


def test_truncation_and_trailing_bytes(tmp_path):
    src = PyCaptionCache(3, 2)
    src.intern(["x", "y"])
    src.snapshot_round(0)
    src.save(tmp_path / "good.rfc")
    data = (tmp_path / "good.rfc").read_bytes()
    for n in range(len(data)):
        _load_all(data[:n], tmp_path, match="truncated", mmap_too=n % 5 == 0)
    _load_all(data + b"\0", tmp_path, match="trailing")
    _load_all(b"", tmp_path, match="truncated")


# ---- files with valid checksums but invalid content: the structural checks behind the CRC ----------

def _sections(data: bytes) -> dict[str, int]:
    k, n, c, a, s, _, _ = struct.unpack_from("<IQQQQQI", data, 12)
    off = 64
    arena = off + 8 * (c + 1)
    rows = arena + ((a + 7) & ~7)
    scores = rows + 4 * n * (k + 1)
    snaps = scores + 4 * n * k
    return dict(k=k, n=n, c=c, a=a, s=s, offsets=off, arena=arena, rows=rows, scores=scores, snaps=snaps)


def _reseal(buf: bytearray) -> bytes:
    """Recompute the body and header CRCs so only the structural checks can catch the change."""
    struct.pack_into("<I", buf, 56, zlib.crc32(bytes(buf[64:])))
    struct.pack_into("<I", buf, 60, zlib.crc32(bytes(buf[:60])))
    return bytes(buf)


def _tamper_cases():
    def put(fmt, where, value):
        return lambda b, s: struct.pack_into(fmt, b, s[where] if isinstance(where, str) else where(s), value)

    return {
        "bad magic": (lambda b, s: b.__setitem__(slice(0, 8), b"NOTCACHE"), "magic"),
        "future version": (put("<I", lambda s: 8, 2), "version"),
        "k zero": (put("<I", lambda s: 12, 0), "out of range"),
        "num_videos zero": (put("<Q", lambda s: 16, 0), "out of range"),
        "one caption more": (put("<Q", lambda s: 24, 4), "inconsistent"),
        "huge snapshot count": (put("<Q", lambda s: 40, 2**62), "out of range"),
        "body bytes off by 8": (lambda b, s: struct.pack_into("<Q", b, 48, struct.unpack_from("<Q", b, 48)[0] + 8),
                                "inconsistent"),
        "offsets decrease": (put("<Q", lambda s: s["offsets"] + 8, 5), "offsets"),
        "first offset": (put("<Q", lambda s: s["offsets"], 1), "offsets"),
        "upper-case caption": (lambda b, s: b.__setitem__(s["arena"], ord("A")), "normalised"),
        "double space": (lambda b, s: b.__setitem__(slice(s["arena"], s["arena"] + 2), b"  "), "normalised"),
        "invalid utf-8": (lambda b, s: b.__setitem__(s["arena"], 0xFF), "UTF-8"),
        "surrogate utf-8": (lambda b, s: b.__setitem__(slice(s["arena"] + 4, s["arena"] + 6), b"\xed\xa0"),
                            "UTF-8"),
        "duplicate caption": (lambda b, s: b.__setitem__(slice(s["arena"] + 2, s["arena"] + 4), b"ab"), "repeats"),
        "padding": (lambda b, s: b.__setitem__(s["arena"] + s["a"], 1), "padding"),
        "slot id too large": (put("<i", "rows", 3), "out of range"),
        "slot id below -1": (put("<i", "rows", -2), "out of range"),
        "pending id too large": (put("<i", lambda s: s["rows"] + 4 * s["k"], 99), "out of range"),
        "repeated slot id": (put("<i", lambda s: s["rows"] + 4, 0), "repeats"),
        "NaN score": (put("<f", "scores", float("nan")), "score"),
        "finite score on an empty slot": (put("<f", lambda s: s["scores"] + 4 * (2 * s["k"] - 1), 0.5), "score"),
        "negative round": (put("<q", "snaps", -1), "rounds"),
        "snapshot id too large": (put("<i", lambda s: s["snaps"] + 8, 7), "out of range"),
    }


@pytest.mark.parametrize("case", list(_tamper_cases()))
def test_structural_corruption_is_detected(tmp_path, case):
    src = PyCaptionCache(3, 2)
    src.intern(["ab", "cd", "é"])  # arena "abcdé": 6 bytes, 2 of padding
    src.set([0, 1], [[0, 1], [2, -1]], np.array([[1.0, 2.0], [3.0, 0.0]]))
    src.snapshot_round(1)
    src.save(tmp_path / "good.rfc")
    buf = bytearray((tmp_path / "good.rfc").read_bytes())
    for c in CLASSES:  # the untouched file loads
        assert_same_state(c.load(tmp_path / "good.rfc"), src)
    edit, match = _tamper_cases()[case]
    edit(buf, _sections(bytes(buf)))
    _load_all(_reseal(buf), tmp_path, match=match)


# ---- I/O errors -----------------------------------------------------------------------------------

def test_load_os_errors(tmp_path, cls):
    with pytest.raises(FileNotFoundError):
        cls.load(tmp_path / "missing.rfc")
    with pytest.raises(IsADirectoryError):
        cls.load(tmp_path)


def test_save_onto_a_directory_fails_cleanly(tmp_path, cls):
    target = tmp_path / "dir"
    target.mkdir()
    with pytest.raises(OSError):
        build(cls, n=3).save(target)
    assert sorted(os.listdir(tmp_path)) == ["dir"] and os.listdir(target) == []
    with pytest.raises(OSError):
        build(cls, n=3).save(tmp_path / "no" / "such" / "dir" / "f.rfc")


_FAILING_SAVE = r"""
import resource, signal, sys
import numpy as np
from rest_fast import cache
cls = cache.PyCaptionCache if sys.argv[1] == "python" else cache.CaptionCache
assert sys.argv[1] == "python" or cache.NATIVE_AVAILABLE
c = cls(5000, 3)
c.intern([f"caption number {i}" for i in range(3000)])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
try:
    c.save(sys.argv[2])
except OSError as exc:
    print("OSError", exc.errno)
else:
    print("saved")
"""


def test_failed_save_leaves_previous_file_intact(tmp_path, cls):
    """A save that dies half-way (file size limit -> EFBIG) keeps the old file and leaves no temp file."""
    path = tmp_path / "cache.rfc"
    old = build(cls, n=4)
    old.save(path)
    before = path.read_bytes()
    out = subprocess.run([sys.executable, "-c", _FAILING_SAVE, _name(cls), str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OSError"), out.stdout
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cache.rfc"]
    assert_same_state(cls.load(path), old)
