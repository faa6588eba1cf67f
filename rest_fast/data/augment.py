"""Clip augmentations (REST paper, Table 10): one random draw per clip, applied to all its T frames.

Train (:func:`draw_train_params`), in this order:

* multi-scale crop: ``base = min(H, W)``; crop width and height are ``base * s`` for scales
  ``(1.0, 0.875, 0.75, 0.66)``, chosen as a pair of scale positions at most one apart (so aspect
  ratios stay near 1, as in TSN's multi-scale crop); the crop is placed uniformly at random, then
  resized to ``S x S``;
* horizontal flip with p = 0.5;
* colour jitter with p = 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 (the common
  SimCLR / X-CLIP setting; factors uniform in ``[1-b, 1+b]``, hue shift uniform in ``[-h, h]``), the four
  adjustments applied in a random order, with torchvision's formulas;
* grayscale with p = 0.2 (ITU-R 601 luma, replicated to three channels).

Eval (:func:`eval_params`): the central ``min(H, W)`` square resized to ``S x S`` — the same pixels as
"resize the shorter side to S, then centre crop", in one resampling.

Every random number is drawn, in a fixed order, whether or not its branch is taken, so a seed gives
the same parameters on any backend. :func:`apply` is the PyAV path's implementation (torch, on CPU);
:func:`apply_colour_batch` applies the colour part of a whole batch's :class:`ClipParams` at once (a fixed
number of kernel launches per batch, whatever the batch size: what GPU runs use after decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCALES = (1.0, 0.875, 0.75, 0.66)
FLIP_P = 0.5
JITTER_P = 0.8
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
GRAY_P = 0.2
_LUMA = (0.299, 0.587, 0.114)

__all__ = ["ClipParams", "draw_train_params", "eval_params", "apply", "apply_colour", "apply_colour_batch", "SCALES",
           "JITTER"]


@dataclass(frozen=True)
class ClipParams:
    """What to do to one clip. ``crop`` = (x, y, w, h) in source pixels; ``jitter`` = None or
    (brightness, contrast, saturation, hue) factors with ``order`` a permutation of 0..3 (that order)."""

    crop: tuple[int, int, int, int]
    flip: bool = False
    jitter: tuple[float, float, float, float] | None = None
    order: tuple[int, int, int, int] = (0, 1, 2, 3)
    gray: bool = False


def eval_params(height: int, width: int) -> ClipParams:
    side = min(height, width)
    return ClipParams(crop=((width - side) // 2, (height - side) // 2, side, side))


def draw_train_params(rng: np.random.Generator, height: int, width: int,
                      scales: tuple[float, ...] = SCALES) -> ClipParams:
    """Random :class:`ClipParams` for a ``height x width`` clip, drawn from ``rng`` (see module doc)."""
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    base = min(height, width)
    sizes = [max(1, int(base * s)) for s in scales]
    pairs = [(i, j) for i in range(len(sizes)) for j in range(len(sizes)) if abs(i - j) <= 1]
    pi = int(rng.integers(len(pairs)))
    cw, ch = min(sizes[pairs[pi][0]], width), min(sizes[pairs[pi][1]], height)
    x = int(rng.integers(width - cw + 1))
    y = int(rng.integers(height - ch + 1))
    flip = bool(rng.random() < FLIP_P)
    do_jitter = bool(rng.random() < JITTER_P)
    b, c, s, h = JITTER
    factors = (float(rng.uniform(max(0.0, 1 - b), 1 + b)), float(rng.uniform(max(0.0, 1 - c), 1 + c)),
               float(rng.uniform(max(0.0, 1 - s), 1 + s)), float(rng.uniform(-h, h)))
    order = tuple(int(v) for v in rng.permutation(4))
    gray = bool(rng.random() < GRAY_P)
    return ClipParams(crop=(x, y, cw, ch), flip=flip, jitter=factors if do_jitter else None, order=order, gray=gray)


# ------------------------------------------------------------------------------------- colour functions
# All take float [..., 3, H, W] in [0, 1] and return the same; they follow torchvision's definitions
# (tests compare against torchvision.transforms.v2.functional).
def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def _blend(a: torch.Tensor, b: torch.Tensor, f: float) -> torch.Tensor:
    return (f * a + (1.0 - f) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: float) -> torch.Tensor:
    return (x * f).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: float) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)  # per frame, as torchvision does per image
    return _blend(x, mean, f)


def adjust_saturation(x: torch.Tensor, f: float) -> torch.Tensor:
    return _blend(x, grayscale(x), f)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (in [-0.5, 0.5]) through HSV."""
    r, g, b = x.unbind(-3)
    maxc, _ = x.max(dim=-3)
    minc, _ = x.min(dim=-3)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift) % 1.0
    # back to RGB
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    # sector i takes (r, g, b) from (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q): one gather
    # from the stacked candidates (a selection, so the values are the same as a chain of torch.where)
    cand = torch.stack([v, p, q, t], dim=-3)
    return cand.gather(-3, _hue_table(x.device)[i].movedim(-1, -3))


_HUE_TABLES: dict[torch.device, torch.Tensor] = {}


def _hue_table(device: torch.device) -> torch.Tensor:
    """int64 [6, 3]: per hue sector, the index into (v, p, q, t) of r, g and b (cached per device: no copy per call)."""
    t = _HUE_TABLES.get(device)
    if t is None:
        t = _HUE_TABLES[device] = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]],
                                               device=device)
    return t


_COLOUR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply(frames: torch.Tensor, params: ClipParams, size: int) -> torch.Tensor:
    """Apply ``params`` to uint8 frames [T, H, W, 3]; returns uint8 [T, size, size, 3].

    Crop, then bilinear resize with antialiasing (computed in float32 on [T, 3, h, w]), flip, colour.
    This is the reference for the crop + resize that ``read_clip`` does in swscale on decoded frames.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    x0, y0, w, h = params.crop
    _, fh, fw, _ = frames.shape
    if not (0 <= x0 and 0 <= y0 and w >= 1 and h >= 1 and x0 + w <= fw and y0 + h <= fh):
        raise ValueError(f"crop {params.crop} outside a {fw}x{fh} frame")
    x = frames[:, y0:y0 + h, x0:x0 + w].permute(0, 3, 1, 2).float()
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return apply_colour(x, params)


def apply_colour(clip: torch.Tensor, params: ClipParams) -> torch.Tensor:
    """Flip, colour jitter and grayscale of ``params`` on uint8 [T, S, S, 3] (already cropped/resized)."""
    x = clip.flip(2) if params.flip else clip
    if params.jitter is None and not params.gray:
        return x.contiguous()
    y = (x.permute(0, 3, 1, 2).float() / 255.0).clamp_(0.0, 1.0)
    if params.jitter is not None:
        for k in params.order:
            y = _COLOUR_OPS[k](y, params.jitter[k])
    if params.gray:
        y = grayscale(y).expand(-1, 3, -1, -1)
    return (y * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def apply_colour_batch(clips: torch.Tensor, params) -> torch.Tensor:
    """:func:`apply_colour` of ``params[b]`` on ``clips[b]`` for a whole batch: uint8 [B, T, S, S, 3] in and out.

    Equal to the per-clip loop (same formulas, same float32 factors) but with a number of kernel launches
    that does not grow with B (about 60 per position of the random jitter order, 4 positions, versus ~60
    per *clip*): at each position the clips whose op there is brightness, contrast or saturation take one
    blend ``f * x + (1 - f) * ref`` (``ref`` = 0, the frame's mean luma or the pixel's luma, chosen per
    clip; ``f = 1`` leaves a clip unchanged exactly), and the clips whose op is hue are gathered and
    rotated together. Factors are built on the host and copied once, so nothing here syncs the device.
    """
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips must be uint8 [B, T, S, S, 3], got {clips.dtype} {tuple(clips.shape)}")
    params = list(params)
    if len(params) != clips.shape[0]:
        raise ValueError(f"got {len(params)} ClipParams for a batch of {clips.shape[0]} clips")
    dev, n = clips.device, len(params)
    flips = [b for b, p in enumerate(params) if p.flip]
    x = clips
    if flips:
        mask = torch.tensor([p.flip for p in params], dtype=torch.bool).to(dev, non_blocking=True)
        x = torch.where(mask.view(n, 1, 1, 1, 1), clips.flip(3), clips)
    if all(p.jitter is None and not p.gray for p in params):
        return x.contiguous()
    y = (x.permute(0, 1, 4, 2, 3).float() / 255.0).clamp_(0.0, 1.0)  # [B, T, 3, S, S]
    jit = [p.jitter is not None for p in params]
    if any(jit):
        # per position: the op index per clip (-1 = none), f and 1 - f computed in float64 then cast, as the
        # per-clip path's Python-float arithmetic does
        ops = [[p.order[pos] if p.jitter is not None else -1 for p in params] for pos in range(4)]
        host = np.ones((4, 3, n), dtype=np.float32)  # [pos, (f, 1 - f, kind), clip]
        for pos in range(4):
            for b, p in enumerate(params):
                k = ops[pos][b]
                f = p.jitter[k] if k in (0, 1, 2) else 1.0
                host[pos, 0, b], host[pos, 1, b] = f, 1.0 - f
                host[pos, 2, b] = k
        fac = torch.from_numpy(host).to(dev, non_blocking=True)
        shifts = torch.tensor([p.jitter[3] if p.jitter is not None else 0.0 for p in params],
                              dtype=torch.float32).to(dev, non_blocking=True)
        for pos in range(4):
            if any(k in (0, 1, 2) for k in ops[pos]):
                f, g, kind = (fac[pos, i].view(n, 1, 1, 1, 1) for i in range(3))
                luma = grayscale(y)  # [B, T, 1, S, S]
                ref = torch.where(kind == 1, luma.mean(dim=(-3, -2, -1), keepdim=True),
                                  torch.where(kind == 2, luma, torch.zeros((), device=dev)))
                y = (f * y + g * ref).clamp_(0.0, 1.0)
            hue = [b for b in range(n) if ops[pos][b] == 3]
            if hue:
                sel = torch.tensor(hue, dtype=torch.int64).to(dev, non_blocking=True)
                y = y.index_copy(0, sel, adjust_hue(y.index_select(0, sel),
                                                    shifts.index_select(0, sel).view(-1, 1, 1, 1)))
    if any(p.gray for p in params):
        gmask = torch.tensor([p.gray for p in params], dtype=torch.bool).to(dev, non_blocking=True)
        y = torch.where(gmask.view(n, 1, 1, 1, 1), grayscale(y).expand_as(y), y)
    return (y * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()
