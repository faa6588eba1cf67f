"""Property tests: random operation sequences (valid and invalid) give identical results and identical
exception types from the C++ class and the pure-Python class, including through save/load."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rest_fast import cache
from rest_fast.cache import PyCaptionCache, normalize_caption

pytestmark = pytest.mark.skipif(not cache.NATIVE_AVAILABLE, reason=f"native extension: {cache.NATIVE_ERROR}")
if cache.NATIVE_AVAILABLE:
    from rest_fast import _C

# Few distinct characters so that normalisation collisions (case, whitespace runs) are frequent;
# non-ASCII letters, NBSP and \x1c check the ASCII-only rules.
ALPHABET = [" ", "  ", "\t", "\n", "\x0b", "\x1c", "\u00a0", "a", "A", "b", "B", "é", "É", "ß", "日"]
caption = st.lists(st.sampled_from(ALPHABET), max_size=6).map("".join)


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_normalize_matches_native_on_any_text(text):
    assert _C.normalize_caption(text) == normalize_caption(text)
    assert normalize_caption(normalize_caption(text)) == normalize_caption(text)


@given(st.lists(caption, max_size=8))
@settings(max_examples=100, deadline=None)
def test_normalize_matches_native_on_whitespace_heavy_text(parts):
    text = "".join(parts)
    assert _C.normalize_caption(text) == normalize_caption(text)


def _ops(max_video: int, max_id: int):
    video = st.integers(-1, max_video)
    cid = st.integers(-2, max_id)
    videos = st.lists(video, max_size=5)
    score = st.floats(allow_nan=True, allow_infinity=True, width=32)
    return st.one_of(
        st.tuples(st.just("intern"), st.lists(caption, max_size=6)),
        st.tuples(st.just("set"), videos, st.data()),
        st.tuples(st.just("pending"), videos, st.lists(cid, max_size=5)),
        st.tuples(st.just("candidates"), videos, st.data()),
        st.tuples(st.just("sample"), videos, st.integers(-(2**64), 2**65)),
        st.tuples(st.just("get"), videos),
        st.tuples(st.just("texts"), st.lists(cid, max_size=4)),
        st.tuples(st.just("text"), cid),
        st.tuples(st.just("new_since"), st.integers(-1, max_id)),
        st.tuples(st.just("snapshot"), st.integers(-1, 6)),
        st.tuples(st.just("history"), video),
        st.tuples(st.just("save_load"), st.booleans()),
    ), cid, score


def _call(c, op, args):
    """Run one operation; return ('ok', result) or ('err', exception type)."""
    try:
        return "ok", getattr(c, op)(*args)
    except (TypeError, ValueError, IndexError) as exc:
        return "err", type(exc)


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    return a == b


@given(st.integers(1, 6), st.integers(1, 4), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_operation_sequences_agree(tmp_path_factory, n, k, data):
    py, nat = PyCaptionCache(n, k), _C.CaptionCache(n, k)
    ops, ops_cid, score = _ops(n, 12)
    for step in range(data.draw(st.integers(1, 25), label="steps")):
        op = data.draw(ops, label=f"op{step}")
        # Mostly valid ids (so that the cache fills up), sometimes anything (so that errors are hit).
        valid = st.integers(-1, len(py) - 1)
        cid = st.one_of(valid, valid, valid, ops_cid)
        name = op[0]
        if name == "intern":
            calls = [("intern", (op[1],))]
        elif name == "set":
            rows = len(op[1])
            width = data.draw(st.sampled_from([k, k, k, k + 1]), label="width")
            ids = data.draw(st.lists(st.lists(cid, min_size=width, max_size=width), min_size=rows, max_size=rows))
            sc = data.draw(st.lists(st.lists(score, min_size=width, max_size=width), min_size=rows,
                                    max_size=rows))
            ids_arr = np.array(ids, dtype=np.int64).reshape(rows, width)
            sc_arr = np.array(sc, dtype=np.float32).reshape(rows, width)
            calls = [("set", (op[1], ids_arr, sc_arr))]
        elif name == "pending":
            ids = data.draw(st.lists(cid, min_size=len(op[1]), max_size=len(op[1]) + 1), label="pending")
            calls = [("add_pending", (op[1], ids))]
        elif name == "candidates":
            rows = len(op[1])
            h = data.draw(st.integers(0, 6), label="H")
            nb = data.draw(st.lists(st.lists(st.integers(-2, n) | st.integers(-1, n - 1), min_size=h, max_size=h), min_size=rows,
                                    max_size=rows))
            nb_arr = np.array(nb, dtype=np.int32).reshape(rows, h)
            calls = [("candidates", (op[1], nb_arr)), ("candidates", (op[1], nb_arr.T.copy().T))]
        elif name == "sample":
            calls = [("sample", (op[1], op[2]))]
        elif name == "get":
            calls = [("get", (op[1],))]
        elif name == "texts":
            calls = [("texts", (op[1],))]
        elif name == "text":
            calls = [("text", (op[1],))]
        elif name == "new_since":
            calls = [("new_since", (op[1],))]
        elif name == "snapshot":
            calls = [("snapshot_round", (op[1],))]
        elif name == "history":
            calls = [("history", (op[1],))]
        else:  # save with one class, load with the other (or the same), then continue on the loaded pair
            d = tmp_path_factory.mktemp("rt")
            py.save(d / "py.rfc")
            nat.save(d / "nat.rfc")
            assert (d / "py.rfc").read_bytes() == (d / "nat.rfc").read_bytes()
            mm = op[1]
            py, nat = PyCaptionCache.load(d / "nat.rfc", mmap=mm), _C.CaptionCache.load(d / "py.rfc", mmap=mm)
            calls = []
        for meth, args in calls:
            a, b = _call(py, meth, args), _call(nat, meth, args)
            assert a[0] == b[0] and _same(a[1], b[1]), (meth, args, a, b)
        assert len(py) == len(nat) and py.version == nat.version and py.rounds == nat.rounds
    videos = np.arange(n)
    assert _same(py.get(videos), nat.get(videos))
    assert py.texts(np.arange(len(py))) == nat.texts(np.arange(len(nat)))
