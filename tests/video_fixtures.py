"""Tiny video files generated with PyAV encoders, for the ``rest_fast.data`` tests and bench/decode.py.

Frame ``i`` of an *index clip* encodes ``i`` in its pixels: the central square of the frame is cut into a
3 x 2 grid of flat grey blocks, block ``d`` holding base-4 digit ``d`` of ``i`` as one of four grey levels
(``LEVELS``). The levels are 64 apart, so they survive lossy codecs, chroma subsampling, resizing and a
centre crop: :func:`decode_index` reads the index back from any decoded frame (full size or a resized
centre crop), which proves exactly which frames a sampler returned.

No ffmpeg binary is needed: everything is written through PyAV (libx264, libx265, libvpx-vp9, mjpeg,
mpeg4, aac).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVELS = (32, 96, 160, 224)  # grey level of digit 0..3
GRID = (2, 3)  # rows, cols of digit blocks inside the central square
MAX_INDEX = 4 ** (GRID[0] * GRID[1])

# codec -> (container format, file extension, pixel format)
CODECS = {
    "h264": ("libx264", "mp4", "mp4", "yuv420p"),
    "hevc": ("libx265", "mp4", "mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", "webm", "webm", "yuv420p"),
    "mjpeg": ("mjpeg", "avi", "avi", "yuvj420p"),
    "mpeg4": ("mpeg4", "avi", "avi", "yuv420p"),
}


def index_frame(i: int, width: int, height: int) -> np.ndarray:
    """uint8 RGB frame [height, width, 3] whose central square encodes ``i`` (see module doc)."""
    if not 0 <= i < MAX_INDEX:
        raise ValueError(f"i must be in [0, {MAX_INDEX}), got {i}")
    img = np.full((height, width, 3), 128, np.uint8)
    sq = min(width, height)
    x0, y0 = (width - sq) // 2, (height - sq) // 2
    rows, cols = GRID
    for d in range(rows * cols):
        r, c = divmod(d, cols)
        level = LEVELS[(i // 4**d) % 4]
        ya, yb = y0 + r * sq // rows, y0 + (r + 1) * sq // rows
        xa, xb = x0 + c * sq // cols, x0 + (c + 1) * sq // cols
        img[ya:yb, xa:xb] = level
    return img


def decode_index(img: np.ndarray) -> int:
    """Index encoded by :func:`index_frame` in ``img`` ([H, W, 3] or [H, W], any size, uint8-like).

    Works on the full frame or on a (resized) centre crop whose side is the frame's shorter side.
    Each block is read as the median of its inner half, so edges blurred by codecs do not matter.
    """
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(axis=2)
    h, w = a.shape
    sq = min(w, h)
    x0, y0 = (w - sq) // 2, (h - sq) // 2
    rows, cols = GRID
    value = 0
    for d in range(rows * cols):
        r, c = divmod(d, cols)
        ya, yb = y0 + r * sq / rows, y0 + (r + 1) * sq / rows
        xa, xb = x0 + c * sq / cols, x0 + (c + 1) * sq / cols
        qy, qx = (yb - ya) / 4, (xb - xa) / 4
        block = a[int(ya + qy): max(int(yb - qy), int(ya + qy) + 1), int(xa + qx): max(int(xb - qx), int(xa + qx) + 1)]
        level = float(np.median(block))
        digit = int(np.argmin([abs(level - v) for v in LEVELS]))
        value += digit * 4**d
    return value


def textured_frame(i: int, width: int, height: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A frame with motion and texture (moving gradients + a moving box + fixed noise), for benchmarks:
    flat frames would make codecs unrealistically cheap to decode."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin((x + 3 * i) / 23.0) * np.cos((y - 2 * i) / 31.0)
    g = 128 + 100 * np.sin((x - y + 5 * i) / 41.0)
    b = 128 + 100 * np.cos((x * 0.7 + y * 0.3 - 4 * i) / 17.0)
    img = np.stack([r, g, b], axis=-1)
    bx, by = (7 * i) % max(1, width - 40), (3 * i) % max(1, height - 40)
    img[by:by + 40, bx:bx + 40] = (240, 30, 30)
    if rng is not None:
        img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_video(path: str | os.PathLike, frames, codec: str = "h264", *, rate: int = 30,
                pts: list[int] | None = None, time_base: Fraction | None = None, options: dict | None = None,
                rotation: int | None = None, container: str | None = None) -> Path:
    """Encode RGB uint8 frames ([H, W, 3] each) into ``path`` with ``codec`` (a key of ``CODECS``).

    ``pts`` with ``time_base`` gives variable frame rate (presentation times in ``time_base`` units).
    ``rotation`` (degrees) sets the stream's display-matrix rotation; ``container`` overrides the format.
    """
    enc, fmt, _, pix = CODECS[codec]
    fmt = container or fmt
    frames = list(frames)
    h, w = frames[0].shape[:2]
    path = Path(path)
    opts = dict(options or {})
    if codec == "hevc":
        opts.setdefault("x265-params", "log-level=none")
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(enc, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, pix
        if time_base is not None:
            s.time_base = time_base
            s.codec_context.time_base = time_base
        if opts:
            s.options = opts
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
            if pts is not None:
                f.pts = pts[i]
                f.time_base = time_base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_index_clip(path, n: int, codec: str = "h264", *, width: int = 66, height: int = 50, **kw) -> Path:
    """A clip of ``n`` frames where frame ``i`` encodes ``i`` (see :func:`index_frame`)."""
    return write_video(path, (index_frame(i, width, height) for i in range(n)), codec, **kw)


def write_audio_only(path) -> Path:
    """An .mp4 with one AAC stream and no video."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        t = np.arange(16000, dtype=np.float32) / 16000
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for k in range(0, 16000, 1024):
            fr = av.AudioFrame.from_ndarray(samples[:, k:k + 1024], format="fltp", layout="mono")
            fr.sample_rate = 16000
            fr.pts = k
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)


def truncate(src, dst, fraction: float) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def bit_flip(src, dst, *, start: float = 0.3, stop: float = 0.5, count: int = 64, seed: int = 0) -> Path:
    """Copy ``src`` with ``count`` random bytes in ``[start, stop)`` (fractions of the size) XOR-ed
    (for an mp4 without faststart that is inside the coded frames, before the index at the end)."""
    data = bytearray(Path(src).read_bytes())
    rng = np.random.default_rng(seed)
    lo = int(len(data) * start)
    for pos in rng.integers(lo, max(lo + 1, int(len(data) * stop)), size=count):
        data[int(pos)] ^= int(rng.integers(1, 256))
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def make_fixture_set(root: str | os.PathLike) -> dict[str, Path]:
    """Write the standard fixture set under ``root`` and return ``name -> path``.

    Index clips (frame i encodes i): ``<codec>`` (40 frames, 66x50, or odd 65x49 where the codec allows),
    ``h264_gop`` (60 frames, keyframe every 10, B-frames), ``vfr`` (h264, irregular pts), ``one`` /
    ``three`` (1- and 3-frame h264), ``rotated`` (h264 with 90 degree display rotation, 64x48).
    Textured clips (moving patterns, for resampling checks): ``textured`` (96x72), ``rotated_tex`` (80x48,
    rotated by 90 degrees).
    Broken files: ``truncated_mp4`` (moov at the end, cut), ``truncated_mkv`` (streamable, cut),
    ``bitflip``, ``zero``, ``text``, ``audio``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for codec, (_, _, ext, _) in CODECS.items():
        odd = codec in ("vp9", "mjpeg")
        w, h = (65, 49) if odd else (66, 50)
        out[codec] = write_index_clip(root / f"{codec}.{ext}", 40, codec, width=w, height=h)
    out["h264_gop"] = write_index_clip(root / "h264_gop.mp4", 60, "h264", width=64, height=48,
                                       options={"g": "10", "bf": "3", "sc_threshold": "0"})
    tb = Fraction(1, 1000)
    gaps = [33, 33, 50, 17, 100, 33, 66, 33, 40, 10]
    vpts = [0]
    for k in range(29):
        vpts.append(vpts[-1] + gaps[k % len(gaps)])
    out["vfr"] = write_index_clip(root / "vfr.mp4", 30, "h264", pts=vpts, time_base=tb)
    out["one"] = write_index_clip(root / "one.mp4", 1, "h264")
    out["three"] = write_index_clip(root / "three.mp4", 3, "h264")
    out["rotated"] = write_index_clip(root / "rotated.mp4", 12, "h264", width=64, height=48, rotation=90)
    out["textured"] = write_video(root / "textured.mp4", (textured_frame(i, 96, 72) for i in range(16)), "h264")
    out["rotated_tex"] = write_video(root / "rotated_tex.mp4", (textured_frame(i, 80, 48) for i in range(8)), "h264",
                                     rotation=90)
    out["truncated_mp4"] = truncate(out["h264"], root / "truncated.mp4", 0.5)
    mkv = write_index_clip(root / "full.mkv", 40, "h264", width=66, height=50, container="matroska")
    out["mkv"] = mkv
    out["truncated_mkv"] = truncate(mkv, root / "truncated.mkv", 0.6)
    out["bitflip"] = bit_flip(out["h264_gop"], root / "bitflip.mp4", start=0.2, stop=0.5, count=6)
    (root / "zero.mp4").write_bytes(b"")
    out["zero"] = root / "zero.mp4"
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    out["text"] = root / "text.mp4"
    out["audio"] = write_audio_only(root / "audio.mp4")
    return out
