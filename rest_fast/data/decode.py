"""Clip reading with PyAV: frame sampling, the sequential reference, and the verified fast path.

Definitions (the contract every backend follows)
------------------------------------------------
* A clip's frames are the frames the decoder *outputs*, in presentation order, decoding every packet
  leniently: a packet the decoder rejects is skipped (FFmpeg's CLI does the same), a demuxer error is
  treated as the end of the file. ``N`` is the number of such frames. Container headers are never used
  (they lie: 444 declared vs 68 real frames was seen).
* :func:`sample_indices`: ``T`` uniform segments over ``N``; eval takes segment centres, train a random
  offset inside each segment; ``N < T`` gives ``0, 1, ..., N-1`` and then repeats the last frame.
* Display rotation (the stream's display matrix, e.g. phone videos) is honoured: frames are rotated by
  multiples of 90 degrees as a player would show them. Flips in the display matrix are ignored.

Reference and fast path
-----------------------
:func:`read_frames_reference` decodes the whole file once to count ``N``, then decodes again
sequentially, stopping after the last needed frame. It is the oracle for tests and the fallback.

:func:`read_frames_fast` demuxes the video packets once (no decoding), keeps them in memory and:

1. counts ``N`` as the number of video packets. This equals the decoded count for ordinary files, but
   not for every file type (e.g. VP8 alt-ref packets produce no frame), so it is trusted only for a
   file type (container format, codec) whose first clips were verified equal to the reference (see
   below), and never for a file whose demuxing failed, or that holds corrupt or discard-flagged
   packets, packets without a timestamp, or duplicate timestamps.
2. maps presentation index ``i`` to the ``i``-th smallest packet pts, so every output frame is
   identified by its pts rather than by counting outputs;
3. decodes only what the needed frames depend on: it jumps (decoder drained, then flushed) to the last
   keyframe before a needed frame when that keyframe lies ahead of the current position, and sends the
   packets that are not needed with ``skip_frame="NONREF"``, so non-reference frames (most B-frames)
   are not reconstructed. Nothing references a non-reference frame, so the needed frames are unchanged;
   a jump is exact for closed GOPs, and an open-GOP file shows up as a missing frame (below).

Any surprise on a file (a decode error, a needed pts that never comes out, an unknown pts) makes that
file fall back to the reference. :func:`read_frames` (``method="auto"``) verifies the fast path on the
first ``VERIFY_CLIPS`` clips of each file type against the reference (indices *and* pixels, exactly);
a type that ever differs uses the reference from then on (a warning says so). Verification state is per
process (each DataLoader worker verifies its own first clips).

Outside DataLoader workers the fast path decodes with frame threading (:func:`decode_threads`, 2 threads
by default): FFmpeg's frame threads are bit-exact, and the verification above covers them too.

Remaining limit: a packet that the reference would reject but that the fast path never sends to the
decoder (skipped or jumped over) makes the two counts differ by one; such files are corrupt anyway.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field

import av
import numpy as np

VERIFY_CLIPS = 2  # clips of each file type checked against the reference before the fast path is trusted

__all__ = [
    "VideoDecodeError",
    "sample_indices",
    "draw_offsets",
    "count_frames",
    "read_frames",
    "read_frames_reference",
    "read_frames_fast",
    "read_frames_plain",
    "reset_verification",
    "verification_state",
]


class VideoDecodeError(RuntimeError):
    """A video that cannot be read: unreadable, empty, audio-only, truncated beyond use, or not a video.

    ``str(err)`` is ``"<path>: <reason>"``; ``err.path`` and ``err.reason`` hold the parts.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------------------------- sampling
def sample_indices(num_decoded: int, num_frames: int, *, train: bool = False,
                   offsets: np.ndarray | None = None) -> list[int]:
    """``num_frames`` frame indices in ``[0, num_decoded)``: one per uniform segment.

    Segment ``j`` spans ``[j*N/T, (j+1)*N/T)``; eval takes ``floor((j + 0.5) * N / T)``, train
    ``floor((j + u_j) * N / T)`` with ``offsets[j] = u_j`` in ``[0, 1)`` (so always inside segment ``j``);
    the caller draws the offsets (:func:`draw_offsets`) before ``N`` is known, so later random draws never
    depend on ``N`` or on the decoding path. With ``N < T`` the result is ``0..N-1`` then ``N-1`` repeated.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_decoded < 1:
        raise ValueError(f"num_decoded must be >= 1, got {num_decoded}")
    n, t = num_decoded, num_frames
    if train:
        if offsets is None:
            raise ValueError("train sampling needs offsets (draw them with draw_offsets)")
        u = np.asarray(offsets, dtype=np.float64)
        if u.shape != (t,) or not ((u >= 0) & (u < 1)).all():
            raise ValueError(f"offsets must be {t} values in [0, 1), got shape {u.shape}")
    else:
        u = np.full(t, 0.5)
    if n < t:
        return [min(j, n - 1) for j in range(t)]
    # float64 is exact enough here: (j + u) * n / t < n for u < 1, and the floor stays in segment j.
    idx = np.floor((np.arange(t) + u) * n / t).astype(np.int64)
    return [int(min(max(i, 0), n - 1)) for i in idx]


def draw_offsets(num_frames: int, rng: np.random.Generator | None) -> np.ndarray:
    """The ``num_frames`` train offsets in ``[0, 1)`` that :func:`sample_indices` uses."""
    return (rng if rng is not None else np.random.default_rng()).random(num_frames)


# ------------------------------------------------------------------------------------------- container
def _open(path: str) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        container = av.open(path, "r")
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"cannot open: {e.strerror or e}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"cannot open: {e}") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise VideoDecodeError(path, f"no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    # One decoding thread here (the reference and the plain baseline); the fast path adds frame threads
    # outside DataLoader workers (decode_threads), where the workers already use the cores.
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1
    return container, stream


def _rotation(frame: av.VideoFrame) -> int:
    try:
        rot = frame.rotation
    except Exception:  # noqa: BLE001 - no display matrix side data
        return 0
    return int(round((rot or 0) / 90.0)) % 4


def _as_is(frame):
    return frame


def _single_threaded_swscale() -> dict:
    """Keyword arguments that keep swscale on the calling thread (``{}`` on PyAV without the option).

    PyAV >= 14 scales with ``threads=0`` (auto) by default: swscale then keeps a pool of slice threads in a
    cached context. A DataLoader worker forked after the parent converted a frame inherits that context
    without its threads, and its first conversion blocks forever freeing it (``pthread_cond_destroy`` in
    ``avpriv_slicethread_free``; seen as a hung loader test). Frames here are clip-sized and conversions
    already run one per worker (or beside frame-threaded decoding), so slice threads buy nothing.
    """
    try:
        frame = av.VideoFrame(16, 16, "yuv420p")
        frame.to_ndarray(format="rgb24", threads=1)
    except TypeError:  # older PyAV: no threads option, and no slice-thread pool either
        return {}
    return {"threads": 1}


SWSCALE_KW = _single_threaded_swscale()


def frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a decoded frame, rotated as its display matrix says (CCW, 90-degree steps)."""
    a = frame.to_ndarray(format="rgb24", **SWSCALE_KW)
    k = _rotation(frame)
    if k:
        a = np.ascontiguousarray(np.rot90(a, k))
    return a


@dataclass
class _Lenient:
    """Decoded output of a lenient pass, plus what went wrong on the way."""

    errors: list[str] = field(default_factory=list)


def _iter_decoded(container, stream, log: _Lenient, stop_after: int | None = None):
    """Yield decoded frames in presentation order, skipping packets the decoder rejects."""
    cc = stream.codec_context
    n = 0
    demux = container.demux(stream)
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            break
        except av.FFmpegError as e:
            log.errors.append(f"demux: {e.strerror or e}")
            break
        if packet.size == 0:
            continue  # PyAV's end-of-stream marker; drained below
        try:
            frames = cc.decode(packet)
        except av.FFmpegError as e:
            log.errors.append(f"decode: {e.strerror or e}")
            continue
        for f in frames:
            yield f
            n += 1
            if stop_after is not None and n > stop_after:
                return
    try:
        frames = cc.decode(None)
    except av.FFmpegError as e:
        log.errors.append(f"drain: {e.strerror or e}")
        frames = []
    yield from frames


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames a full lenient decode of ``path`` outputs (the reference ``N``)."""
    path = str(path)
    container, stream = _open(path)
    try:
        stream.codec_context.skip_frame = "DEFAULT"
        return sum(1 for _ in _iter_decoded(container, stream, _Lenient()))
    finally:
        container.close()


def _check_count(path: str, n: int, log: _Lenient) -> None:
    if n == 0:
        why = f"; first error: {log.errors[0]}" if log.errors else ""
        raise VideoDecodeError(path, f"no decodable video frames{why}")


def read_frames_reference(path: str | os.PathLike, num_frames: int = 8, *, train: bool = False,
                          offsets: np.ndarray | None = None, convert=frame_to_rgb) -> tuple[list, list[int]]:
    """Reference reader: full decode to count ``N``, then a sequential decode up to the last needed frame.

    Returns (``num_frames`` uint8 RGB arrays [H, W, 3], their indices). ``convert`` maps each decoded
    ``av.VideoFrame`` to what is returned (``None``: the frames themselves).
    """
    convert = convert or _as_is
    path = str(path)
    log = _Lenient()
    container, stream = _open(path)
    try:
        n = sum(1 for _ in _iter_decoded(container, stream, log))
    finally:
        container.close()
    _check_count(path, n, log)
    indices = sample_indices(n, num_frames, train=train, offsets=offsets)
    wanted = set(indices)
    last = max(indices)
    got: dict[int, np.ndarray] = {}
    container, stream = _open(path)
    try:
        for i, f in enumerate(_iter_decoded(container, stream, _Lenient(), stop_after=last)):
            if i in wanted:
                got[i] = convert(f)
            if i >= last:
                break
    finally:
        container.close()
    if len(got) != len(wanted):
        raise VideoDecodeError(path, f"second decoding pass gave fewer frames than the first ({n})")
    return [got[i] for i in indices], indices


def read_frames_plain(path: str | os.PathLike, num_frames: int = 8, *, train: bool = False,
                      offsets: np.ndarray | None = None, convert=frame_to_rgb) -> tuple[list, list[int]]:
    """What a plain loader does (the benchmark baseline, not a reference): take ``N`` from the header
    (``stream.frames``, falling back to duration x rate), then decode sequentially up to the last needed
    frame. Wrong when the header lies; kept only to measure the fast path against.
    """
    convert = convert or _as_is
    path = str(path)
    container, stream = _open(path)
    try:
        n = stream.frames
        if not n and stream.average_rate:  # e.g. WebM stores no frame count: duration x rate
            if stream.duration:
                n = round(stream.duration * stream.time_base * stream.average_rate)
            elif container.duration:
                n = round(container.duration / av.time_base * stream.average_rate)
        n = max(int(n or 1), 1)
        indices = sample_indices(n, num_frames, train=train, offsets=offsets)
        wanted, last, got = set(indices), max(indices), {}
        frame = None
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = convert(frame)
            if i >= last:
                break
        if frame is None:
            raise VideoDecodeError(path, "no decodable video frames")
        fallback = convert(frame)
        return [got.get(i, fallback) for i in indices], indices
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"decode failed: {e.strerror or e}") from None
    finally:
        container.close()


# ------------------------------------------------------------------------------------------- fast path
class _Untrusted(Exception):
    """This file cannot use the fast path; the message says why."""


def _type_key(container, stream) -> tuple[str, str]:
    return (container.format.name, stream.codec_context.name)


def _demux_all(container, stream):
    packets = []
    try:
        for p in container.demux(stream):
            if p.size == 0:
                continue
            if p.is_corrupt or p.is_discard:
                raise _Untrusted("corrupt or discard-flagged packet")
            if p.pts is None:
                raise _Untrusted("packet without pts")
            packets.append(p)
    except av.FFmpegError as e:
        raise _Untrusted(f"demux error: {e.strerror or e}") from None
    return packets


def _fast_decode(container, stream, packets, indices, convert=frame_to_rgb) -> list:
    """Decode the frames at presentation ``indices`` from ``packets`` (decode order), see module doc."""
    pts_sorted = sorted(p.pts for p in packets)
    if len(set(pts_sorted)) != len(pts_sorted):
        raise _Untrusted("duplicate packet pts")
    rank = {pts: i for i, pts in enumerate(pts_sorted)}
    wanted_pts = {pts_sorted[i] for i in indices}
    # decode position of each needed packet, and keyframe positions, in decode order
    need_pos = sorted(k for k, p in enumerate(packets) if p.pts in wanted_pts)
    key_pos = [k for k, p in enumerate(packets) if p.is_keyframe]
    if not key_pos or key_pos[0] != 0:
        raise _Untrusted("first packet is not a keyframe")
    cc = stream.codec_context
    got: dict[int, np.ndarray] = {}

    def take(frames) -> None:
        for f in frames:
            if f.pts not in rank:
                raise _Untrusted("decoded frame with unknown pts")
            i = rank[f.pts]
            if i in wanted_idx and i not in got:
                got[i] = convert(f)

    def send(p, skip: str) -> None:
        if cc.skip_frame != skip:
            cc.skip_frame = skip
        try:
            take(cc.decode(p))
        except av.FFmpegError as e:
            raise _Untrusted(f"decode error: {e.strerror or e}") from None

    wanted_idx = set(indices)
    pos = 0  # next packet to send
    for target in need_pos:
        if target < pos:
            continue  # already sent (a frame can be needed twice)
        # last keyframe at or before the target; jump there if it lies ahead of us
        kf = max(k for k in key_pos if k <= target)
        if kf > pos:
            if pos > 0:
                send(None, "DEFAULT")  # drain what is in flight (it may hold needed frames)
            cc.flush_buffers()
            pos = kf
        while pos <= target:
            p = packets[pos]
            send(p, "DEFAULT" if p.pts in wanted_pts else "NONREF")
            pos += 1
    send(None, "DEFAULT")
    cc.skip_frame = "DEFAULT"
    missing = wanted_idx - set(got)
    if missing:
        raise _Untrusted(f"{len(missing)} needed frame(s) not produced (open GOP?)")
    return [got[i] for i in indices]


def decode_threads() -> int:
    """Decoder threads per stream for the fast path: ``REST_FAST_DECODE_THREADS`` if set; else 1 inside a
    DataLoader worker (the workers already use the cores) and ``min(2, cores)`` elsewhere (eval, demo,
    ``num_workers=0``, single reads)."""
    env = os.environ.get("REST_FAST_DECODE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            return 1
    except ImportError:
        pass
    return max(1, min(2, os.cpu_count() or 1))


def _frame_threads(stream, n: int) -> None:
    """Frame threading (n frames decoded concurrently). FFmpeg's frame threading is bit-exact; it delays
    each output by n - 1 frames, which the drain at every jump absorbs. Set before the first decode."""
    if n > 1:
        stream.thread_type = "FRAME"
        stream.codec_context.thread_count = n


def read_frames_fast(path: str | os.PathLike, num_frames: int = 8, *, train: bool = False,
                     offsets: np.ndarray | None = None,
                     skip_type=None, convert=frame_to_rgb) -> tuple[list, list[int], tuple[str, str]]:
    """Fast path (see module doc). Returns (frames, indices, file type); raises :class:`_Untrusted`
    when this file needs the reference (also when ``skip_type(file type)`` is true), and
    :class:`VideoDecodeError` when it is unreadable."""
    path = str(path)
    container, stream = _open(path)
    _frame_threads(stream, decode_threads())
    try:
        key = _type_key(container, stream)
        if skip_type is not None and skip_type(key):
            raise _Untrusted(f"file type {key} failed verification")
        packets = _demux_all(container, stream)
        if not packets:
            raise VideoDecodeError(path, "video stream has no packets")
        indices = sample_indices(len(packets), num_frames, train=train, offsets=offsets)
        frames = _fast_decode(container, stream, packets, indices, convert or _as_is)
        return frames, indices, key
    finally:
        container.close()


# ---------------------------------------------------------------------------------------- verification
@dataclass
class _TypeState:
    verified: int = 0
    failed: str | None = None


_STATE: dict[tuple[str, str], _TypeState] = {}
_LOCK = threading.Lock()


def reset_verification() -> None:
    """Forget which file types were verified (tests; or after changing FFmpeg)."""
    with _LOCK:
        _STATE.clear()


def verification_state() -> dict[tuple[str, str], dict]:
    """``(container format, codec) -> {"verified": n, "failed": reason or None}`` in this process."""
    with _LOCK:
        return {k: {"verified": v.verified, "failed": v.failed} for k, v in _STATE.items()}


def _type_failed(key: tuple[str, str]) -> bool:
    with _LOCK:
        st = _STATE.get(key)
        return st is not None and st.failed is not None


def read_frames(path: str | os.PathLike, num_frames: int = 8, *, train: bool = False,
                offsets: np.ndarray | None = None, method: str = "auto",
                convert=frame_to_rgb) -> tuple[list, list[int]]:
    """Frames at the sampled indices: ``method`` is ``"auto"`` (fast path, verified per file type, with
    fallback), ``"reference"``, ``"fast"`` (fast path with per-file fallback, no verification) or
    ``"plain"`` (header count; benchmark baseline only). Returns (uint8 [H, W, 3] arrays, indices);
    ``convert=None`` returns the decoded ``av.VideoFrame`` objects instead of RGB arrays."""
    path = str(path)
    if method not in ("auto", "reference", "fast", "plain"):
        raise ValueError(f"method must be 'auto', 'reference', 'fast' or 'plain', got {method!r}")
    if method == "reference":
        return read_frames_reference(path, num_frames, train=train, offsets=offsets, convert=convert)
    if method == "plain":
        return read_frames_plain(path, num_frames, train=train, offsets=offsets, convert=convert)
    if method == "fast":
        try:
            frames, idx, _ = read_frames_fast(path, num_frames, train=train, offsets=offsets, convert=convert)
            return frames, idx
        except _Untrusted:
            return read_frames_reference(path, num_frames, train=train, offsets=offsets, convert=convert)
    try:
        frames, idx, key = read_frames_fast(path, num_frames, train=train, offsets=offsets, skip_type=_type_failed,
                                              convert=convert)
    except _Untrusted:
        return read_frames_reference(path, num_frames, train=train, offsets=offsets, convert=convert)
    with _LOCK:
        st = _STATE.setdefault(key, _TypeState())
        verified = st.verified
    if verified >= VERIFY_CLIPS:
        return frames, idx
    ref_frames, ref_idx = read_frames_reference(path, num_frames, train=train, offsets=offsets, convert=convert)
    rgb = frame_to_rgb if convert in (None, _as_is) else _as_is  # compare pixels, not frame objects
    same = ref_idx == idx and all(np.array_equal(rgb(a), rgb(b)) for a, b in zip(frames, ref_frames))
    with _LOCK:
        if same:
            st.verified += 1
        elif st.failed is None:
            st.failed = f"fast path differs from sequential decoding on {path}"
            warnings.warn(f"rest_fast.data: {key[0]}/{key[1]} files use sequential decoding from now on: "
                          f"{st.failed}", RuntimeWarning, stacklevel=2)
    return ref_frames, ref_idx


@dataclass(frozen=True)
class VideoProbe:
    """What a batch decoder needs before decoding: ``num_frames`` (decoded count, see ``exact``), the
    coded ``width`` x ``height`` (display rotation not applied) and the file type; ``profile`` and ``pix_fmt``
    (FFmpeg's names, ``None`` when unknown) say whether a GPU decoder can take it (:meth:`gpu_rejects`)."""

    num_frames: int
    width: int
    height: int
    type_key: tuple[str, str]
    exact: bool
    profile: str | None = None
    pix_fmt: str | None = None

    def gpu_rejects(self) -> str | None:
        """Why NVDEC (DALI's GPU video decoder) cannot decode this file, or ``None`` (:mod:`rest_fast.data.nvdec`)."""
        from rest_fast.data.nvdec import nvdec_rejects

        return nvdec_rejects(self.type_key[1], self.width, self.height, profile=self.profile, pix_fmt=self.pix_fmt)


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Frame count and size without decoding, for decoders that take frame indices (DALI).

    The count is the number of video packets, as in the fast path; when the file is untrusted (demux
    error, corrupt/discard packets) or its type failed verification in this process, it is the reference
    count from a full decode instead (``exact=True`` either way means it equals the reference count
    on every verified file type). Raises :class:`VideoDecodeError` for unreadable files.
    """
    path = str(path)
    container, stream = _open(path)
    try:
        key = _type_key(container, stream)
        cc = stream.codec_context
        w, h = cc.width, cc.height
        fmt = {"profile": _opt_str(getattr(cc, "profile", None)), "pix_fmt": _opt_str(getattr(cc, "pix_fmt", None))}
        with _LOCK:
            failed = key in _STATE and _STATE[key].failed is not None
        if not failed:
            try:
                packets = _demux_all(container, stream)
                if packets:
                    return VideoProbe(len(packets), w, h, key, True, **fmt)
            except _Untrusted:
                pass
    finally:
        container.close()
    n = count_frames(path)
    if n == 0:
        raise VideoDecodeError(path, "no decodable video frames")
    return VideoProbe(n, w, h, key, True, **fmt)


def probe_format(path: str | os.PathLike) -> VideoProbe:
    """:func:`probe_video` without the frame count (``num_frames=0``, ``exact=False``): the stream header only, no
    packet read. Raises :class:`VideoDecodeError` for unreadable files."""
    path = str(path)
    container, stream = _open(path)
    try:
        cc = stream.codec_context
        return VideoProbe(0, cc.width, cc.height, _type_key(container, stream), False,
                          _opt_str(getattr(cc, "profile", None)), _opt_str(getattr(cc, "pix_fmt", None)))
    finally:
        container.close()


def _opt_str(v) -> str | None:
    return None if v is None or v == "" else str(v)


def preverify(paths, max_files: int = 8, num_frames: int = 8) -> dict[tuple[str, str], dict]:
    """Verify the fast path on the first readable ``paths`` (at most ``max_files``) until every file type
    seen is verified or failed. Loaders call it in the main process before forking DataLoader workers,
    which then inherit the verdicts instead of each re-verifying its own first clips."""
    for path in list(paths)[:max_files]:
        try:
            read_frames(path, num_frames, method="auto", convert=_as_is)
        except VideoDecodeError:
            continue
        with _LOCK:
            if all(st.failed is not None or st.verified >= VERIFY_CLIPS for st in _STATE.values()):
                break
    return verification_state()
