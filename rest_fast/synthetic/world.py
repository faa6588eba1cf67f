"""The demo's synthetic action world: one coloured shape doing one action over a noisy background.

A clip is ``T`` frames (uint8 ``[T, S, S, 3]``, S = 32 by default) of one **object** (a shape × a colour: 3 × 4 = 12
objects) doing one of eight **actions**. Every action is recognisable from the *set* of its frames, but not from any
single frame: each frame of any action could be a frame of another one (positions, sizes, angles and shades are drawn
at random per clip), which is what makes a frame captioner guess and what CLIP's order-blind video feature (the mean of
frame embeddings) can still see. The action names are the phrases the captions use verbatim.

=====================  ===============================================================================
action                 what the frames do (phase and amplitude drawn per clip)
=====================  ===============================================================================
standing still         nothing changes
blinking               the shape alternates between full colour and nearly faded into the background
changing colour        the shape alternates between its colour and another colour of the palette
changing shape         the shape alternates between its shape and another shape
sliding sideways       the shape moves back and forth horizontally
sliding up and down    the shape moves back and forth vertically
sliding diagonally     the shape moves back and forth along a diagonal
pulsing                the shape alternates between small and large
=====================  ===============================================================================

``spinning`` and ``shaking`` (:data:`EXTRA_ACTIONS`) are drawn too but left out of the demo. Two extra
**order-dependent** actions (``moving left``/``moving right``, ``growing``/``shrinking``) exist for the test
that the temporal adapters learn time: their frame *sets* are the same in both directions, only the order differs.

:func:`web_corpus` is the disjoint "web" data the demo models are pretrained on: clips with captions drawn from
varied templates ("a red square spinning", "the red square keeps spinning", ...). Everything is deterministic for a
seed (``numpy.random.default_rng``; PIL draws the shapes at 4x and downsamples, so edges are anti-aliased).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACTIONS: tuple[str, ...] = ("standing still", "blinking", "changing colour", "changing shape", "sliding sideways",
                            "sliding up and down", "sliding diagonally", "pulsing")
# Subtler actions the renderer also draws (not in the demo: the tiny demo CLIP confuses them with standing still).
EXTRA_ACTIONS: tuple[str, ...] = ("spinning", "shaking")
ORDERED_ACTIONS: tuple[str, ...] = ("moving left", "moving right", "growing", "shrinking")
SHAPES: tuple[str, ...] = ("square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (230, 210, 40),
}

# Caption templates of the web corpus: ``{o}`` = "red square", ``{a}`` = the action phrase (kept verbatim).
TEMPLATES: tuple[str, ...] = (
    "a {o} {a}", "a {o} is {a}", "the {o} keeps {a}", "a {o} {a} on a dark background", "a small {o} {a}",
    "one {o} {a}", "a {o} that is {a}", "there is a {o} {a}",
)
# Extra texts the demo CLIP also learns (not the captioner): the bare action phrase, as CLIP-TAM embeds class names.
ACTION_ONLY_TEMPLATES: tuple[str, ...] = ("{a}", "something {a}", "a shape {a}")


def folder_name(action: str) -> str:
    """Class folder of an action (``"changing colour"`` → ``"changing_colour"``; CLIP-TAM turns it back)."""
    return action.replace(" ", "_")


def vocabulary() -> list[str]:
    """Every word the world's captions use (the demo models' vocabularies are built from it)."""
    words: list[str] = []
    texts = [t.format(o=f"{c} {s}", a=a) for t in TEMPLATES + ACTION_ONLY_TEMPLATES
             for c in COLOURS for s in SHAPES for a in ACTIONS + EXTRA_ACTIONS + ORDERED_ACTIONS]
    texts.append("a video of")
    for t in texts:
        for w in t.split():
            if w not in words:
                words.append(w)
    return words


@dataclass(frozen=True)
class ClipSpec:
    """What a clip shows: the object and its action."""

    shape: str
    colour: str
    action: str

    @property
    def object(self) -> str:
        return f"{self.colour} {self.shape}"


# Rotations that map a shape onto itself: spinning turns it through one such period over the clip.
_PERIOD = {"square": math.pi / 2, "triangle": 2 * math.pi / 3, "cross": math.pi / 2}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(math.pi / 4 + k * math.pi / 2), math.sin(math.pi / 4 + k * math.pi / 2)) for k in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(-math.pi / 2 + k * 2 * math.pi / 3), math.sin(-math.pi / 2 + k * 2 * math.pi / 3))
               for k in range(3)]
    elif shape == "cross":  # a plus sign: 12 corners, arm half-width 0.33
        w = 0.33
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
               (-w, -1)]
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _states(spec: ClipSpec, rng: np.random.Generator, T: int, size: int) -> list[dict]:
    """Per-frame (x, y, radius, angle, colour, opacity) of the clip, in pixels of the final frame."""
    r0 = size * float(rng.uniform(0.19, 0.24))
    margin = r0 * 1.3
    cx0 = float(rng.uniform(margin, size - margin))
    cy0 = float(rng.uniform(margin, size - margin))
    angle0 = float(rng.uniform(0, 2 * math.pi))
    base = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    others = [c for c in COLOURS if c != spec.colour]
    other = np.asarray(COLOURS[others[int(rng.integers(len(others)))]], dtype=np.float64)
    other_shape = [x for x in SHAPES if x != spec.shape][int(rng.integers(len(SHAPES) - 1))]
    phase = int(rng.integers(2))  # which of the two alternating states comes first
    sign = 1.0 if rng.random() < 0.5 else -1.0
    amp = size * float(rng.uniform(0.17, 0.22))  # half the sliding distance
    out = []
    for t in range(T):
        u = t / max(T - 1, 1)  # 0 → 1 over the clip
        alt = (t + phase) % 2  # 0, 1, 0, 1 ... (or 1, 0, ...)
        s = {"x": cx0, "y": cy0, "r": r0, "angle": angle0, "colour": base, "opacity": 1.0, "shape": spec.shape}
        a = spec.action
        if a == "standing still":
            pass
        elif a == "spinning":  # evenly over one symmetry period: T distinct orientations, none repeated
            s["angle"] = angle0 + sign * _PERIOD[spec.shape] * t / T
        elif a == "blinking":
            s["opacity"] = 1.0 if alt == 0 else 0.25
        elif a == "changing colour":
            s["colour"] = base if alt == 0 else other
        elif a == "sliding sideways":
            s["x"] = size / 2 + amp * (1.0 if alt == 0 else -1.0) * sign
        elif a == "sliding up and down":
            s["y"] = size / 2 + amp * (1.0 if alt == 0 else -1.0) * sign
        elif a == "sliding diagonally":  # down-right/up-left or down-left/up-right
            d = 0.75 * amp * (1.0 if alt == 0 else -1.0)
            s["x"], s["y"] = size / 2 + d, size / 2 + d * sign
        elif a == "changing shape":
            s["shape"] = spec.shape if alt == 0 else other_shape
        elif a == "pulsing":
            s["r"] = r0 * (1.4 if alt == 0 else 0.65)
        elif a == "shaking":
            s["x"] = cx0 + float(rng.choice([-1, 1])) * float(rng.uniform(2.5, 4.0))
            s["y"] = cy0 + float(rng.choice([-1, 1])) * float(rng.uniform(2.5, 4.0))
        elif a in ("moving left", "moving right"):
            d = -1.0 if a == "moving left" else 1.0
            s["x"] = size / 2 + d * (u - 0.5) * (size - 2 * margin)
        elif a in ("growing", "shrinking"):
            g = u if a == "growing" else 1.0 - u
            s["r"] = r0 * (0.6 + 0.9 * g)
        else:
            raise ValueError(f"unknown action {a!r}; expected one of {ACTIONS + EXTRA_ACTIONS + ORDERED_ACTIONS}")
        out.append(s)
    return out


def render_clip(spec: ClipSpec, rng: np.random.Generator, *, frames: int = 4, size: int = 32,
                noise: float = 6.0) -> np.ndarray:
    """One clip as uint8 ``[frames, size, size, 3]`` (RGB), deterministic for ``rng``'s state.

    The background is a dark random colour plus Gaussian pixel noise of std ``noise`` (fresh per frame).
    """
    from PIL import Image, ImageDraw

    if spec.shape not in SHAPES or spec.colour not in COLOURS:
        raise ValueError(f"unknown object {spec.object!r}")
    scale = 4
    bg = np.asarray(rng.integers(0, 60, size=3), dtype=np.float64)
    states = _states(spec, rng, frames, size)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t, s in enumerate(states):
        col = bg + s["opacity"] * (s["colour"] - bg)
        img = Image.new("RGB", (size * scale, size * scale), tuple(int(v) for v in bg))
        poly = _polygon(s["shape"], s["x"] * scale, s["y"] * scale, s["r"] * scale, s["angle"])
        ImageDraw.Draw(img).polygon(poly, fill=tuple(int(round(v)) for v in col))
        frame = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float64)
        frame = frame + rng.normal(0.0, noise, size=frame.shape)
        out[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out


def random_spec(rng: np.random.Generator, actions: tuple[str, ...] = ACTIONS) -> ClipSpec:
    return ClipSpec(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                    colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                    action=actions[int(rng.integers(len(actions)))])


def caption(spec: ClipSpec, rng: np.random.Generator, templates: tuple[str, ...] = TEMPLATES) -> str:
    """A caption of the clip from a random template; it always holds the action phrase verbatim."""
    return templates[int(rng.integers(len(templates)))].format(o=spec.object, a=spec.action)


def web_corpus(n: int, *, seed: int, frames: int = 4, size: int = 32,
               actions: tuple[str, ...] = ACTIONS) -> tuple[np.ndarray, list[ClipSpec]]:
    """The "web" corpus: ``(clips uint8 [n, frames, size, size, 3], specs)``; objects and actions balanced.

    Seeded under a namespace of its own (``[seed, 0x5eb]``), so it never repeats a demo training clip (which use
    ``[seed, action, j]``).
    """
    rng = np.random.default_rng([seed, 0x5EB])
    objects = [(s, c) for s in SHAPES for c in COLOURS]
    clips = np.empty((n, frames, size, size, 3), dtype=np.uint8)
    specs = []
    for i in range(n):
        s, c = objects[i % len(objects)]
        spec = ClipSpec(s, c, actions[(i // len(objects)) % len(actions)])
        specs.append(spec)
        clips[i] = render_clip(spec, rng, frames=frames, size=size)
    return clips, specs
