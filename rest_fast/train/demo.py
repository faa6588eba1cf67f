"""The built-in demo: REST on the synthetic action world with pretrained demo models.

``rest-fast train`` with no ``--data`` writes the world's clips as real video files with PyAV (so the real
decoding path is exercised), loads the demo BLIP (an image captioner pretrained on single "web" frames) and
the demo CLIP (pretrained contrastively on web clips), and runs Algorithm 1 on the unlabelled clips exactly as
on real data (see :mod:`rest_fast.synthetic`). The class folders give labels that only CLIP-TAM reads.

The old random-init path stays as a fixture for the exactness and resume tests: with ``blip=tiny`` the demo
writes the clips below (one shape on a plain background doing one of six actions, the folder name the action:
``moving_left`` → "moving left") and the models are random, so its captions mean nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rest_fast.synthetic.video import write_video  # noqa: F401 - re-exported (tests and fixtures write clips)

DEMO_NOTICE = (
    "DEMO: a synthetic world of 32x32 clips, one coloured shape (square, triangle or cross; red, green, blue or "
    "yellow) doing one of 8 actions (standing still, blinking, changing colour, changing shape, sliding sideways, "
    "sliding up and down, sliding diagonally, pulsing) that only the set of frames reveals. The captioner is a tiny BLIP "
    "pretrained on single web frames: it names the object but can only guess the action. The frozen CLIP is a "
    "tiny CLIP pretrained on web clips: it knows the actions. REST never sees a label. Accuracy is CLIP-TAM "
    "top-1 over the 8 action names (chance 12.5%): tam_initial_top1 = the frame captioner on the middle frame "
    "(where REST starts), tam_pseudo_top1 = the best pseudo-caption, tam_top1 = the GAR's own generated "
    "caption. Pass --data, --blip and --clip for a real run."
)
TINY_DEMO_NOTICE = (
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


def demo_notice(blip: str) -> str:
    """The banner of a demo run: the synthetic world's, or the random-init fixture's when ``blip == "tiny"``."""
    return TINY_DEMO_NOTICE if blip == "tiny" else DEMO_NOTICE


def prepare_demo_data(root: str | Path, *, blip: str, videos_per_class: int, frames: int, size: int,
                      seed: int) -> Path:
    """Write the demo's clips to ``root``: the synthetic action world, or the old clips for ``blip == "tiny"``."""
    if blip == "tiny":
        return synthesize_dataset(root, videos_per_class=videos_per_class, frames=frames, size=size, seed=seed)
    from rest_fast.synthetic.dataset import write_world_dataset

    return write_world_dataset(root, videos_per_class=videos_per_class, frames=frames, size=size, seed=seed)
