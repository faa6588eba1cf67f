"""Caption cache: API behaviour of both classes, error cases, native/Python agreement, threads.

Every behavioural test runs on the pure-Python class and, when the extension is built, on the C++
class. The randomized C++-vs-Python comparison lives in test_caption_cache_props.py, the file format in
test_caption_cache_io.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from rest_fast import cache
from rest_fast.cache import PyCaptionCache, normalize_caption, splitmix64

CLASSES = [PyCaptionCache]
if cache.NATIVE_AVAILABLE:
    from rest_fast import _C

    CLASSES.append(_C.CaptionCache)

needs_native = pytest.mark.skipif(not cache.NATIVE_AVAILABLE, reason=f"native extension: {cache.NATIVE_ERROR}")


@pytest.fixture(params=CLASSES, ids=lambda c: "python" if c is PyCaptionCache else "native")
def cls(request):
    return request.param


def filled_cache(cls, n=6, k=3):
    """A small cache: videos 0-3 have slots, 4 only a pending caption, 5 nothing."""
    c = cls(n, k)
    c.intern([f"caption {i}" for i in range(10)])
    c.set([0, 1, 2, 3], [[0, 1, 2], [2, 3, -1], [-1, -1, 4], [5, 6, 7]],
          np.arange(12, dtype=np.float32).reshape(4, 3))
    c.add_pending([0, 1, 4], [8, 0, 9])
    return c


# ---- normalisation -----------------------------------------------------------------------------------

NORMALIZE_CASES = [
    ("  A  Dog\tRUNS \n", "a dog runs"),
    ("", ""),
    (" \t\n\v\f\r ", ""),
    ("x\r\ny", "x y"),
    ("ÀÉÎ Straße", "ÀÉÎ straße"),  # ASCII-only lower-casing: non-ASCII letters are kept
    ("a\u00a0b", "a\u00a0b"),  # NO-BREAK SPACE is not ASCII whitespace
    ("a\x1cb\x1fc", "a\x1cb\x1fc"),  # str.split() would split here; the ASCII rule does not
    ("a\u2003 b", "a\u2003 b"),  # EM SPACE kept, the ASCII space after it stays one space
    ("日本語  テキスト", "日本語 テキスト"),
    ("emoji 😀  OK", "emoji 😀 ok"),
    ("a\0b", "a\0b"),
]


@pytest.mark.parametrize("text,expected", NORMALIZE_CASES)
def test_normalize_caption_rules(text, expected):
    assert normalize_caption(text) == expected
    if cache.NATIVE_AVAILABLE:
        assert _C.normalize_caption(text) == expected


def test_normalize_caption_errors():
    with pytest.raises(TypeError, match="text"):
        normalize_caption(b"bytes")
    with pytest.raises(ValueError):
        normalize_caption("bad \ud800 surrogate")


def test_public_exports():
    import rest_fast

    assert rest_fast.normalize_caption is normalize_caption
    assert rest_fast.CaptionCache is cache.CaptionCache
    assert (cache.CaptionCache is not PyCaptionCache) == cache.NATIVE_AVAILABLE
    assert (cache.NATIVE_ERROR is None) == cache.NATIVE_AVAILABLE


def test_kill_switch_selects_python_class():
    code = ("import rest_fast.cache as c; "
            "assert not c.NATIVE_AVAILABLE and c.CaptionCache is c.PyCaptionCache, c.CaptionCache; "
            "print(c.NATIVE_ERROR)")
    env = {**os.environ, "REST_FAST_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "REST_FAST_NO_NATIVE" in out.stdout


# ---- hashing helpers ---------------------------------------------------------------------------------

def test_splitmix64_reference_values():
    # First outputs of the SplitMix64 generator seeded with 0 (state advances by the golden gamma).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    if cache.NATIVE_AVAILABLE:
        rng = np.random.default_rng(0)
        for x in [0, 1, 2**64 - 1, *rng.integers(0, 2**63, 50).tolist()]:
            assert _C._splitmix64(x) == splitmix64(x)


@needs_native
def test_native_crc32_matches_zlib():
    rng = np.random.default_rng(1)
    assert _C._crc32(b"123456789") == 0xCBF43926
    for n in [0, 1, 7, 8, 9, 63, 64, 1000, 4097]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _C._crc32(data) == zlib.crc32(data)
        assert _C._crc32(data[n // 2:], _C._crc32(data[: n // 2])) == zlib.crc32(data)


# ---- interning ---------------------------------------------------------------------------------------

def test_intern_dedups_after_normalisation(cls):
    c = cls(2, 3)
    assert len(c) == 0 and c.version == 0
    ids = c.intern(["A dog", "a  dog ", "cat", "\tCAT", "ÉTÉ", "ÉtÉ", ""])
    assert ids.dtype == np.int32 and ids.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert len(c) == 4 and c.version == 4
    # ASCII-only lower-casing: "ÉTÉ" and "ÉtÉ" are the same caption, "étÉ" would not be
    assert c.texts(ids) == ["a dog", "a dog", "cat", "cat", "ÉtÉ", "ÉtÉ", ""]
    assert c.texts(np.array([0, 1, 2, 3])) == ["a dog", "cat", "ÉtÉ", ""]
    assert c.text(2) == "ÉtÉ"
    v = c.version
    more = c.intern(iter(["cat", "new one", "NEW ONE", "another"]))  # any iterable
    assert more.tolist() == [1, 4, 4, 5]
    assert c.new_since(v).tolist() == [4, 5]
    assert c.new_since(c.version).tolist() == []
    assert c.new_since(0).tolist() == list(range(6))
    assert c.intern([]).shape == (0,)
    assert c.intern(np.array(["cat", "x"])).tolist() == [1, 6]  # numpy str_ items are str


def test_intern_errors_are_atomic(cls):
    c = cls(1, 1)
    c.intern(["kept"])
    with pytest.raises(TypeError, match="texts"):
        c.intern("a single string")
    with pytest.raises(TypeError, match="texts"):
        c.intern(b"bytes")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        c.intern(["new", 3, "other"])
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        c.intern([b"bytes item"])
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        c.intern(["new", "bad \udcff"])
    with pytest.raises(TypeError):
        c.intern(5)
    assert len(c) == 1 and c.texts([0]) == ["kept"]


def test_text_lookup_errors(cls):
    c = cls(1, 1)
    c.intern(["a", "b"])
    for bad in (-1, 2, 2**70):
        with pytest.raises(IndexError):
            c.text(bad)
    with pytest.raises(TypeError, match="id"):
        c.text(1.0)
    with pytest.raises(IndexError, match="ids"):
        c.texts([0, 2])
    with pytest.raises(IndexError, match="ids"):
        c.texts([-1])
    with pytest.raises(TypeError, match="ids"):
        c.texts([0.0])
    with pytest.raises(ValueError, match="ids"):
        c.texts([[0]])
    with pytest.raises(ValueError, match="version"):
        c.new_since(3)
    with pytest.raises(ValueError, match="version"):
        c.new_since(-1)
    with pytest.raises(TypeError, match="version"):
        c.new_since("1")


# ---- slots -------------------------------------------------------------------------------------------

def test_constructor_validation(cls):
    for n, k in [(0, 3), (5, 0), (5, 1025), (-1, 3), (2**31, 1)]:
        with pytest.raises(ValueError):
            cls(n, k)
    with pytest.raises(TypeError):
        cls(5.0, 3)
    c = cls(np.int64(4), 2)
    assert c.num_videos == 4 and c.k == 2


def test_get_set_round_trip(cls):
    c = filled_cache(cls)
    ids, scores = c.get([3, 0, 5, 2, 3])
    assert ids.dtype == np.int32 and scores.dtype == np.float32 and ids.shape == (5, 3)
    assert ids.tolist() == [[5, 6, 7], [0, 1, 2], [-1, -1, -1], [-1, -1, 4], [5, 6, 7]]
    assert scores[0].tolist() == [9, 10, 11]
    assert np.isneginf(scores[2]).all() and np.isneginf(scores[3, :2]).all() and scores[3, 2] == 8
    # -1 slots store -inf whatever score was passed; a repeated video keeps its last row
    c.set(np.array([5, 5]), np.array([[1, -1, 2], [3, -1, 4]]), np.array([[1.0, 9.0, 2.0], [3.0, 9.0, 4.0]]))
    ids, scores = c.get([5])
    assert ids.tolist() == [[3, -1, 4]] and scores[0, 0] == 3 and np.isneginf(scores[0, 1])
    e_ids, e_scores = c.get([])
    assert e_ids.shape == (0, 3) and e_scores.shape == (0, 3)
    c.set([], np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32))


def test_set_validation_leaves_state_unchanged(cls):
    c = filled_cache(cls)
    before = c.get(np.arange(6))
    f32 = np.zeros((1, 3), np.float32)
    cases = [
        (TypeError, "videos", ([0.5], [[0, 1, 2]], f32)),
        (ValueError, "videos", ([[0]], [[0, 1, 2]], f32)),
        (TypeError, "ids", ([0], [[0.0, 1.0, 2.0]], f32)),
        (TypeError, "ids", ([0], np.array([[True, False, True]]), f32)),
        (ValueError, "ids", ([0], [[0, 1]], np.zeros((1, 2), np.float32))),  # row width != k
        (ValueError, "ids", ([0], [0, 1, 2], f32)),
        (ValueError, "ids", ([0, 1], [[0, 1, 2]], f32)),
        (TypeError, "scores", ([0], [[0, 1, 2]], np.zeros((1, 3), np.int32))),
        (ValueError, "scores", ([0], [[0, 1, 2]], np.zeros((1, 4), np.float32))),
        (IndexError, "videos", ([6], [[0, 1, 2]], f32)),
        (IndexError, "videos", ([-1], [[0, 1, 2]], f32)),
        (IndexError, "ids", ([0], [[0, 1, 10]], f32)),
        (IndexError, "ids", ([0], [[0, -2, 1]], f32)),
        (ValueError, "repeats", ([0], [[4, 1, 4]], f32)),
        (ValueError, "NaN", ([0], [[4, 1, 5]], np.array([[0, np.nan, 0]], np.float32))),
    ]
    for exc, match, args in cases:
        with pytest.raises(exc, match=match):
            c.set(*args)
    # a valid first row does not get written when a later row is bad
    with pytest.raises(ValueError):
        c.set([0, 1], [[9, 8, 7], [1, 1, 2]], np.zeros((2, 3), np.float32))
    after = c.get(np.arange(6))
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    c.set([0], [[4, -1, -1]], np.array([[0, np.nan, np.nan]]))  # NaN on an empty slot is fine
    assert c.get([0])[0].tolist() == [[4, -1, -1]]


def test_add_pending_validation(cls):
    c = filled_cache(cls)
    with pytest.raises(ValueError, match="ids"):
        c.add_pending([0, 1], [1])
    with pytest.raises(IndexError, match="ids"):
        c.add_pending([0], [10])
    with pytest.raises(IndexError, match="videos"):
        c.add_pending([7], [1])
    with pytest.raises(TypeError, match="ids"):
        c.add_pending([0], ["1"])
    c.add_pending([0], [-1])  # clears it
    assert c.candidates([0], np.full((1, 0), -1)).tolist() == [[0, 1, 2]]


# ---- candidates --------------------------------------------------------------------------------------

def test_candidates_order_dedup_padding(cls):
    c = filled_cache(cls)
    nb = np.array([[1, -1, 3, 0], [0, 0, -1, -1], [-1, -1, -1, -1], [4, 2, 5, 1]])
    out = c.candidates([0, 4, 5, 2], nb)
    assert out.dtype == np.int32
    assert out.tolist() == [
        [0, 1, 2, 8, 3, 5, 6, 7],  # own slots, own pending, video 1 (2 dup, 3, 0 dup), video 3, video 0 dups
        [9, 0, 1, 2, 8, -1, -1, -1],  # own pending first, then neighbour 0 (twice -> once)
        [-1] * 8,  # nothing anywhere
        [4, 9, 2, 3, 0, -1, -1, -1],
    ]
    assert c.candidates([], np.zeros((0, 5), np.int64)).shape == (0, 0)
    assert c.candidates([5], [[5, -1]]).shape == (1, 0)


def test_candidates_accepts_any_integer_layout(cls):
    c = filled_cache(cls)
    rng = np.random.default_rng(3)
    nb64 = rng.integers(-1, 6, (5, 7))
    videos = np.array([0, 1, 2, 3, 4])
    ref = c.candidates(videos, nb64)
    wide = np.zeros((5, 14), np.int32)
    wide[:, ::2] = nb64
    variants = [nb64.astype(np.int32), nb64.astype(np.int16), nb64.astype(np.int8), wide[:, ::2],
                np.asfortranarray(nb64), nb64.astype(">i4"), nb64.astype(">i8"), nb64.tolist(),
                nb64[::-1][::-1]]
    for nb in variants:
        assert np.array_equal(c.candidates(videos, nb), ref)
    nbu = np.where(nb64 < 0, 5, nb64).astype(np.uint8)
    assert np.array_equal(c.candidates(videos, nbu), c.candidates(videos, nbu.astype(np.int64)))
    vids_strided = np.zeros(10, np.int64)
    vids_strided[::2] = videos
    assert np.array_equal(c.candidates(vids_strided[::2], nb64), ref)
    assert np.array_equal(c.candidates(videos.astype(np.uint16), nb64), ref)


def test_candidates_errors(cls):
    c = filled_cache(cls)
    with pytest.raises(IndexError, match=r"neighbours\[1, 0\]"):
        c.candidates([0, 1], [[1, 2], [6, -1]])
    with pytest.raises(IndexError, match="neighbours"):
        c.candidates([0], [[-2]])
    with pytest.raises(IndexError, match="neighbours"):
        c.candidates([0], np.array([[2**63 + 5]], np.uint64))
    with pytest.raises(IndexError, match="videos"):
        c.candidates([9], [[1]])
    with pytest.raises(ValueError, match="neighbours"):
        c.candidates([0, 1], [[1, 2]])
    with pytest.raises(ValueError, match="neighbours"):
        c.candidates([0], [1, 2])
    with pytest.raises(TypeError, match="neighbours"):
        c.candidates([0], [[1.0]])
    with pytest.raises(TypeError, match="videos"):
        c.candidates(["0"], [[1]])


# ---- sample ------------------------------------------------------------------------------------------

def test_sample_rule_and_determinism(cls):
    c = filled_cache(cls)
    videos = np.array([0, 1, 2, 3, 4, 5, 0])
    for seed in [0, 1, 12345, -7, 2**64 + 3, 2**70]:
        out = c.sample(videos, seed)
        assert out.dtype == np.int32
        slots = c.get(videos)[0]
        base = splitmix64(seed % 2**64)
        for r, v in enumerate(videos.tolist()):
            filled = [x for x in slots[r].tolist() if x >= 0]
            expect = filled[splitmix64(base ^ v) % len(filled)] if filled else -1
            assert out[r] == expect
        assert out[0] == out[6]  # same (seed, video) -> same caption
        assert np.array_equal(out, c.sample(videos, seed))
    assert c.sample([4, 5], 3).tolist() == [-1, -1]  # pending only / nothing: no filled slot
    assert np.array_equal(c.sample([0], -1), c.sample([0], 2**64 - 1))
    with pytest.raises(TypeError, match="seed"):
        c.sample([0], 1.5)
    with pytest.raises(IndexError, match="videos"):
        c.sample([6], 1)


def test_sample_is_uniform_over_filled_slots(cls):
    c = cls(3000, 3)
    c.intern(["a", "b", "c"])
    n = 3000
    c.set(np.arange(n), np.tile([0, -1, 2], (n, 1)), np.zeros((n, 3), np.float32))
    counts = np.bincount(c.sample(np.arange(n), 99), minlength=3)
    assert counts[1] == 0
    # two filled slots: Binomial(3000, 1/2) has sd ~27; 5 sd bound
    assert abs(int(counts[0]) - n // 2) < 140


# ---- history -----------------------------------------------------------------------------------------

def test_snapshots_and_history(cls):
    c = filled_cache(cls)
    assert c.history(0) == [] and c.rounds == []
    c.snapshot_round(0)
    c.set([0], [[9, -1, 3]], np.zeros((1, 3), np.float32))
    c.snapshot_round(2)
    assert c.history(0) == [(0, ["caption 0", "caption 1", "caption 2"]), (2, ["caption 9", "caption 3"])]
    c.set([0], [[-1, -1, -1]], np.zeros((1, 3), np.float32))
    c.snapshot_round(2)  # same round replaces
    assert c.history(0) == [(0, ["caption 0", "caption 1", "caption 2"]), (2, [])]
    assert c.history(5) == [(0, []), (2, [])]
    assert c.rounds == [0, 2]
    with pytest.raises(ValueError, match="round"):
        c.snapshot_round(1)
    with pytest.raises(ValueError, match="round"):
        c.snapshot_round(-1)
    with pytest.raises(TypeError, match="round"):
        c.snapshot_round("3")
    with pytest.raises(IndexError, match="video"):
        c.history(6)
    with pytest.raises(TypeError, match="video"):
        c.history(None)


# ---- native vs Python on a mid-size random instance -------------------------------------------------

def random_pair(n=400, k=3, h=50, captions=3000, seed=0):
    rng = np.random.default_rng(seed)
    words = ["a", "person", "is", "Playing", "the", "guitar", "DOG", "runs", "in", "park", "é", "ß"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 7))) + ("  " if i % 3 else "") + str(i % 997)
             for i in range(captions)]
    caches = [PyCaptionCache(n, k), _C.CaptionCache(n, k)]
    for c in caches:
        ids = c.intern(texts)
    slot = rng.integers(-1, len(caches[0]), (n, k))
    slot = np.where(np.arange(k) < rng.integers(0, k + 1, (n, 1)), slot, -1)
    for r in range(n):  # repeated ids within a row -> keep the first, blank the rest
        _, first = np.unique(slot[r], return_index=True)
        keep = np.zeros(k, bool)
        keep[first] = True
        slot[r] = np.where(keep, slot[r], -1)
    scores = rng.standard_normal((n, k)).astype(np.float32)
    pend = rng.integers(-1, len(caches[0]), n)
    for c in caches:
        c.set(np.arange(n), slot, scores)
        c.add_pending(np.arange(n), pend)
    nb = rng.integers(-1, n, (n, h))
    return caches, ids, nb, rng


@needs_native
def test_native_matches_python_random():
    (py, nat), ids, nb, rng = random_pair()
    assert len(py) == len(nat)
    assert py.texts(np.arange(len(py))) == nat.texts(np.arange(len(nat)))
    videos = rng.permutation(nb.shape[0])
    assert np.array_equal(py.candidates(videos, nb), nat.candidates(videos, nb))
    for seed in (0, 5, 2**63 + 1):
        assert np.array_equal(py.sample(videos, seed), nat.sample(videos, seed))
    for a, b in zip(py.get(videos), nat.get(videos)):
        assert np.array_equal(a, b)


@needs_native
def test_native_matches_python_many_captions():
    """70000 captions (bitset dedup over caption ids), repeated neighbours included."""
    (py, nat), ids, nb, rng = random_pair(n=200, h=30, captions=70000, seed=5)
    assert len(nat) > 65536
    videos = rng.permutation(200)
    assert np.array_equal(py.candidates(videos, nb), nat.candidates(videos, nb))
    nb_dup = np.concatenate([nb, nb[:, ::-1]], axis=1)  # every neighbour twice
    assert np.array_equal(py.candidates(videos, nb_dup), nat.candidates(videos, nb_dup))


@needs_native
def test_native_matches_python_hashed_dedup():
    """Few rows over many captions: the native dedup takes the hashed stamp table instead of zeroing a
    bitset over all caption ids (that switch depends on the call's size, so both sizes are checked)."""
    n, k, captions = 40, 3, 300_000
    rng = np.random.default_rng(9)
    texts = [f"caption {i}" for i in range(captions)]
    py, nat = PyCaptionCache(n, k), _C.CaptionCache(n, k)
    for c in (py, nat):
        c.intern(texts)
    pool = rng.choice(captions, 60, replace=False)  # a small pool, so rows share many ids
    slot = np.stack([rng.choice(pool, k, replace=False) for _ in range(n)])
    slot[rng.random((n, k)) < 0.2] = -1
    pend = np.where(rng.random(n) < 0.2, -1, rng.choice(pool, n))
    for c in (py, nat):
        c.set(np.arange(n), slot, np.ones((n, k), np.float32))
        c.add_pending(np.arange(n), pend)
    for rows, h in ((3, 7), (1, 300), (n, 300)):  # table, table, bitset
        videos = rng.integers(0, n, rows)
        nb = rng.integers(-1, n, (rows, h)).astype(np.int32)
        nb_strided = np.asfortranarray(nb.astype(np.int64))[:, ::-1]  # non-contiguous, int64
        for arr in (nb, nb_strided):
            assert np.array_equal(py.candidates(videos, arr), nat.candidates(videos, arr))


@needs_native
def test_native_thread_counts_agree(monkeypatch):
    (py, nat), ids, nb, rng = random_pair(n=300, h=40, seed=2)
    videos = np.arange(300)
    ref = py.candidates(videos, nb)
    for threads in ("1", "2", "3", "7"):
        monkeypatch.setenv("REST_FAST_NUM_THREADS", threads)
        assert np.array_equal(nat.candidates(videos, nb), ref)
        assert np.array_equal(nat.sample(videos, 11), py.sample(videos, 11))
        fresh = _C.CaptionCache(1, 1)
        assert np.array_equal(fresh.intern(nat.texts(np.arange(len(nat)))), np.arange(len(nat)))


@needs_native
def test_native_concurrent_bulk_calls():
    """Bulk calls from several Python threads (GIL released) while another thread interns and writes."""
    (py, nat), ids, nb, rng = random_pair(n=300, h=60, seed=4)
    videos = np.arange(300)
    ref_c, ref_s = nat.candidates(videos, nb), nat.sample(videos, 3)
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def reader():
        try:
            start.wait()
            for _ in range(15):
                assert np.array_equal(nat.candidates(videos, nb), ref_c)
                assert np.array_equal(nat.sample(videos, 3), ref_s)
                nat.get(videos)
                nat.texts(np.arange(100))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    row_ids, row_scores = nat.get([0])
    pending0 = _pending_of(nat, 0)

    def writer():  # exclusive-lock paths; rewrites video 0 with its own values so answers stay fixed
        try:
            start.wait()
            for i in range(15):
                new = nat.intern([f"concurrent caption {i} {j}" for j in range(200)])
                assert new.min() >= len(py)
                nat.set([0], row_ids, row_scores)
                nat.add_pending([0], [pending0])
                nat.snapshot_round(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(nat) == len(py) + 15 * 200


def _pending_of(c, video):
    """The pending id of a video, read through candidates with no neighbours."""
    slots = set(c.get([video])[0][0].tolist())
    row = [x for x in c.candidates([video], np.zeros((1, 0), np.int64))[0].tolist() if x >= 0]
    rest = [x for x in row if x not in slots]
    return rest[0] if rest else -1
