"""The built-in demo: a small labelled set of synthetic action clips and tiny random-init models.

``rest-fast train`` with no ``--data`` writes real video files with PyAV (so the real decoding path
is exercised), builds a tiny random BLIP and a tiny random CLIP, and runs Algorithm 1 on them. The
models are random, so the captions are nonsense: the demo shows the pipeline, not accuracy.

Each clip shows one shape (square, disc or triangle) on a plain background doing one action; the
action is the label and the class folder name (``moving_left`` → "moving left").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

DEMO_NOTICE = (
    "DEMO: tiny random-init BLIP and CLIP on synthetic clips. This run shows the REST pipeline end to end "
    "(initial captions, retrieval, self-training rounds, resumable run directory); its captions and accuracy "
    "mean nothing. Pass --data, --blip and --clip for a real run."
)

ACTIONS = ("moving_left", "moving_right", "growing", "shrinking", "spinning", "changing_colour")
_SHAPES = ("square", "disc", "triangle")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "disc":
        n, phase = 24, 0.0
    elif shape == "square":
        n, phase = 4, math.pi / 4
    else:
        n, phase = 3, -math.pi / 2
    return [(cx + r * math.cos(phase + angle + 2 * math.pi * i / n), cy + r * math.sin(phase + angle + 2 * math.pi * i / n))
            for i in range(n)]


def render_clip(action: str, rng: np.random.Generator, *, frames: int = 16, size: int = 48) -> np.ndarray:
    """One synthetic clip as uint8 [frames, size, size, 3] (RGB).

    Drawn with PIL at 4x and downsampled, so edges are anti-aliased and survive video compression.
    """
    from PIL import Image, ImageDraw

    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    scale = 4
    big = size * scale
    shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
    bg = tuple(int(v) for v in rng.integers(0, 90, size=3))
    colour = np.array(rng.integers(140, 256, size=3), dtype=np.float64)
    colour2 = 255.0 - colour * 0.6
    r0 = big * float(rng.uniform(0.14, 0.2))
    cx0, cy0 = big * float(rng.uniform(0.4, 0.6)), big * float(rng.uniform(0.35, 0.65))
    angle0 = float(rng.uniform(0, math.pi))
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        u = t / max(frames - 1, 1)  # 0 → 1 over the clip
        cx, cy, r, angle, col = cx0, cy0, r0, angle0, colour
        if action == "moving_left":
            cx = big * (0.8 - 0.6 * u)
        elif action == "moving_right":
            cx = big * (0.2 + 0.6 * u)
        elif action == "growing":
            r = r0 * (0.5 + 1.3 * u)
        elif action == "shrinking":
            r = r0 * (1.8 - 1.3 * u)
        elif action == "spinning":
            angle = angle0 + 2 * math.pi * u
        elif action == "changing_colour":
            col = colour * (1 - u) + colour2 * u
        img = Image.new("RGB", (big, big), bg)
        ImageDraw.Draw(img).polygon(_polygon(shape, cx, cy, r, angle), fill=tuple(int(v) for v in col))
        out[t] = np.asarray(img.resize((size, size), Image.BILINEAR))
    return out


def write_video(path: str | Path, frames: np.ndarray, *, fps: int = 8, codec: str = "mpeg4") -> None:
    """Encode uint8 [T,H,W,3] frames to ``path`` with PyAV (H and W even for yuv420p)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "3"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)  # a half-written file never carries the final name


def synthesize_dataset(root: str | Path, *, videos_per_class: int = 4, frames: int = 16, size: int = 48,
                       seed: int = 0, actions: tuple[str, ...] = ACTIONS) -> Path:
    """Write ``root/<action>/<action>_NN.mp4`` (class sub-folders = labels) and return ``root``.

    Deterministic for a seed; files already present are kept, so a resumed demo reuses them.
    """
    if size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    root = Path(root)
    for a_idx, action in enumerate(actions):
        for j in range(videos_per_class):
            path = root / action / f"{action}_{j:02d}.mp4"
            if path.exists():
                continue
            rng = np.random.default_rng([seed, a_idx, j])
            write_video(path, render_clip(action, rng, frames=frames, size=size))
    return root
