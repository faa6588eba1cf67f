"""The caption cache of REST: every video's K best pseudo-captions, its pending caption, the per-round
candidate gather over neighbours, seeded sampling, round snapshots, and a checksummed file format.

``CaptionCache`` is the C++ class ``rest_fast._C.CaptionCache`` when the native extension loads, else the
pure-Python :class:`PyCaptionCache` (same API, results, exceptions and file format). Set
``REST_FAST_NO_NATIVE=1`` to force the Python class; :data:`NATIVE_AVAILABLE` / :data:`NATIVE_ERROR` say
which one you got and why.

Contract (both classes; N videos, K slots per video)
---------------------------------------------------
``CaptionCache(num_videos, k)``
    1 <= num_videos < 2**31, 1 <= k <= 1024.
``intern(texts) -> int32 [n]``
    Normalises each ``str`` with :func:`normalize_caption` and returns its dense id; new strings get
    ids ``len(cache), len(cache)+1, ...`` in order of first appearance. Non-``str`` -> ``TypeError``;
    strings with lone surrogates -> ``ValueError``. All or nothing. The empty caption is a caption.
``text(id) -> str``, ``texts(ids) -> list[str]``, ``len(cache)``
    ``len`` = number of distinct captions. Id outside ``[0, len)`` -> ``IndexError``.
``version``, ``new_since(version) -> int32``
    ``version == len(cache)`` (grows by one per new string); ``new_since(v)`` = ids ``v .. version-1``.
``get(videos) -> (ids int32 [n, K], scores float32 [n, K])``
    Empty slots are ``-1`` / ``-inf``.
``set(videos, ids int [n, K], scores float [n, K])``
    Replaces the K slots (slot order kept as given). ``-1`` = empty slot (its score is stored as
    ``-inf``). Ids outside ``[-1, len)`` -> ``IndexError``; a repeated id within a row or a NaN score on a
    filled slot -> ``ValueError``. A video repeated in ``videos`` keeps its last row. Everything is
    validated before anything changes.
``add_pending(videos, ids int [n])``
    The caption generated for each video this round (the K+1-th); ``-1`` clears it.
``candidates(videos, neighbours int [n, H]) -> int32 [n, L]``
    Row i: the video's slot ids (slot order), its pending id, then for each neighbour column in order
    that neighbour's slot ids and pending id; ``-1`` skipped, each id kept at its first occurrence;
    padded right with ``-1`` to L = the longest row of this call. ``neighbours`` value ``-1`` = none;
    other values outside ``[0, N)`` -> ``IndexError``. (W~_i ∪ Ω_i of Eqs. 5-6 of the REST paper.)
``sample(videos, seed) -> int32 [n]``
    One filled slot per video: ``h = splitmix64(splitmix64(seed mod 2**64) ^ video)``, the
    ``h mod count``-th filled slot in slot order; ``-1`` for a video with no filled slot. Deterministic
    for (seed, video), so a repeated video gets the same caption.
``snapshot_round(r)``, ``history(video) -> [(round, [texts]), ...]``, ``rounds``
    A snapshot copies every video's slot ids; ``r`` must be >= the latest snapshot round (equal
    replaces it). ``history`` lists, per snapshot, the texts of the filled slots in slot order.
``save(path)``, ``CaptionCache.load(path, mmap=False)``
    Format in :mod:`rest_fast.cache._format`; files are interchangeable between the two classes
    (byte-identical for the same state). Temp file + fsync + rename: a failed save leaves the old file
    intact. A truncated/corrupted file -> ``ValueError`` naming the problem. ``mmap=True`` parses through
    a memory map (the loaded cache still owns its memory).

Index arguments accept any integer dtype (int32/int64 are read in place, whatever their strides;
others are converted to int64; uint64 values >= 2**63 -> ``IndexError``) and Python lists; other
dtypes -> ``TypeError`` naming the argument, wrong rank or shape -> ``ValueError`` naming it. The
native bulk calls release the GIL and run on all cores (``REST_FAST_NUM_THREADS`` caps the count);
both classes are safe to call from several threads at once.
"""

from __future__ import annotations

from rest_fast._native import load_native
from rest_fast.cache._pycache import PyCaptionCache, normalize_caption, splitmix64

__all__ = ["CaptionCache", "PyCaptionCache", "normalize_caption", "splitmix64", "NATIVE_AVAILABLE",
           "NATIVE_ERROR"]

_C, NATIVE_ERROR = load_native("CaptionCache")
NATIVE_AVAILABLE = _C is not None

if NATIVE_AVAILABLE:
    CaptionCache = _C.CaptionCache
else:
    CaptionCache = PyCaptionCache
