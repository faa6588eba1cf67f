"""The caption cache file format, in Python (the C++ twin is ``CaptionCache::save/from_bytes``).

Both implementations write byte-identical files for the same state and apply the same checks in the
same order when reading. Little-endian throughout.

Header, 64 bytes::

    0  magic b"RFCCACHE"      8  u32 format version (1)   12 u32 k
    16 u64 num_videos N       24 u64 captions C            32 u64 arena bytes A
    40 u64 snapshots S        48 u64 body bytes            56 u32 CRC-32 of the body
    60 u32 CRC-32 of header bytes [0, 60)

Body::

    u64 offsets[C + 1]                      caption i is arena[offsets[i]:offsets[i + 1]] (UTF-8)
    u8  arena[A], zero padding to a multiple of 8
    i32 rows[N, k + 1]                      k slot ids then the pending id (-1 = none)
    f32 scores[N, k]                        -inf for empty slots
    S x (i64 round, i32 slot ids[N, k])     snapshots in increasing round order

CRC-32 is zlib's (``zlib.crc32``). Any inconsistency raises ``ValueError`` naming it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"RFCCACHE"
FORMAT_VERSION = 1
HEADER_BYTES = 64
MAX_K = 1024
MAX_VIDEOS = 2**31 - 1
MAX_CAPTIONS = 2**31 - 2
_HEAD = struct.Struct("<8sIIQQQQQI")  # everything before the header CRC (60 bytes)


@dataclass
class State:
    """Everything a cache file holds (arrays owned, not views of the file)."""

    num_videos: int
    k: int
    strings: list[str]
    rows: np.ndarray  # int32 [N, k + 1]
    scores: np.ndarray  # float32 [N, k]
    snapshots: dict[int, np.ndarray]  # round -> int32 [N, k], increasing rounds


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def pack(state: State) -> tuple[bytes, list[bytes]]:
    """Return ``(header, body pieces)``; the file is the header followed by the pieces."""
    enc = [s.encode("utf-8") for s in state.strings]
    offsets = np.zeros(len(enc) + 1, dtype="<u8")
    if enc:
        np.cumsum(np.fromiter((len(b) for b in enc), dtype=np.uint64, count=len(enc)), out=offsets[1:])
    arena = b"".join(enc)
    pieces = [offsets.tobytes(), arena, b"\0" * (_pad8(len(arena)) - len(arena)),
              np.ascontiguousarray(state.rows, dtype="<i4").tobytes(),
              np.ascontiguousarray(state.scores, dtype="<f4").tobytes()]
    for r in sorted(state.snapshots):
        pieces.append(struct.pack("<q", r))
        pieces.append(np.ascontiguousarray(state.snapshots[r], dtype="<i4").tobytes())
    crc, nbytes = 0, 0
    for p in pieces:
        crc = zlib.crc32(p, crc)
        nbytes += len(p)
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, state.k, state.num_videos, len(enc), len(arena),
                      len(state.snapshots), nbytes, crc)
    return head + struct.pack("<I", zlib.crc32(head)), pieces


def _check_ids(ids: np.ndarray, k: int, num_captions: int, what: str) -> None:
    """ids: int32 [N, w >= k]; every id in [-1, C), no repeat among the first k of a row."""
    bad = (ids < -1) | (ids >= num_captions)
    if bad.any():
        v, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"{what}: caption id {int(ids[v, j])} of video {v} is out of range")
    s = np.sort(ids[:, :k], axis=1)
    rep = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if rep.any():
        v, j = (int(x) for x in np.argwhere(rep)[0])
        raise ValueError(f"{what}: video {v} repeats caption id {int(s[v, j + 1])}")


def unpack(buf, normalize) -> State:
    """Parse a whole file image (bytes, memoryview or mmap); ``normalize`` is normalize_caption."""
    size = len(buf)
    if size < HEADER_BYTES:
        raise ValueError(f"truncated file: {size} bytes, the header alone needs {HEADER_BYTES}")
    if bytes(buf[:8]) != MAGIC:
        raise ValueError("not a rest_fast caption cache file (bad magic)")
    (version,) = struct.unpack_from("<I", buf, 8)
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported caption cache format version {version} "
                         f"(this build reads version {FORMAT_VERSION})")
    if zlib.crc32(bytes(buf[:60])) != struct.unpack_from("<I", buf, 60)[0]:
        raise ValueError("header checksum mismatch: the header is corrupted")
    _, _, k, n, c, a, s, body_bytes, body_crc = _HEAD.unpack_from(buf, 0)
    if not (1 <= k <= MAX_K and 1 <= n <= MAX_VIDEOS and c <= MAX_CAPTIONS and a <= 1 << 48):
        raise ValueError(f"header sizes out of range (k={k}, num_videos={n}, captions={c}, arena={a})")
    snap = 8 + 4 * n * k
    if s > (1 << 62) // snap:
        raise ValueError(f"header sizes out of range (snapshots={s})")
    expected = 8 * (c + 1) + _pad8(a) + 4 * n * (k + 1) + 4 * n * k + s * snap
    if body_bytes != expected:
        raise ValueError(f"header sizes are inconsistent: body_bytes={body_bytes} but the sizes imply {expected}")
    have = size - HEADER_BYTES
    if have < body_bytes:
        raise ValueError(f"truncated file: {size} bytes, expected {HEADER_BYTES + body_bytes}")
    if have > body_bytes:
        raise ValueError(f"{have - body_bytes} unexpected trailing bytes after the body")
    mv = memoryview(buf)
    if zlib.crc32(mv[HEADER_BYTES:]) != body_crc:
        raise ValueError("body checksum mismatch: the file is corrupted")

    pos = HEADER_BYTES
    offsets = np.frombuffer(mv, dtype="<u8", count=c + 1, offset=pos).astype(np.int64)
    pos += 8 * (c + 1)
    if offsets[0] != 0 or offsets[c] != a or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("caption offsets are inconsistent")
    arena = bytes(mv[pos:pos + a])
    if any(mv[pos + a:pos + _pad8(a)]):
        raise ValueError("non-zero padding after the caption bytes")
    pos += _pad8(a)
    strings: list[str] = []
    bounds = offsets.tolist()
    for i in range(c):
        try:
            t = arena[bounds[i]:bounds[i + 1]].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"caption {i} is not valid UTF-8") from None
        if normalize(t) != t:
            raise ValueError(f"caption {i} is not normalised")
        strings.append(t)
    first: dict[str, int] = {}
    for i, t in enumerate(strings):
        j = first.setdefault(t, i)
        if j != i:
            raise ValueError(f"caption {i} repeats caption {j}")

    rows = np.frombuffer(mv, dtype="<i4", count=n * (k + 1), offset=pos).reshape(n, k + 1).astype(np.int32)
    pos += 4 * n * (k + 1)
    _check_ids(rows, k, c, "slots")
    scores = np.frombuffer(mv, dtype="<f4", count=n * k, offset=pos).reshape(n, k).astype(np.float32)
    pos += 4 * n * k
    filled = rows[:, :k] >= 0
    bad = np.where(filled, np.isnan(scores), ~(np.isinf(scores) & (scores < 0)))
    if bad.any():
        v, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"score of video {v} slot {j} is invalid")
    snapshots: dict[int, np.ndarray] = {}
    last = -1
    for _ in range(s):
        (r,) = struct.unpack_from("<q", mv, pos)
        pos += 8
        if r < 0 or r <= last:
            raise ValueError("snapshot rounds are not increasing non-negative integers")
        last = r
        ids = np.frombuffer(mv, dtype="<i4", count=n * k, offset=pos).reshape(n, k).astype(np.int32)
        pos += 4 * n * k
        _check_ids(ids, k, c, "snapshot")
        snapshots[r] = ids
    del mv
    return State(n, k, strings, rows, scores, snapshots)
