"""``read_clip``: one clip, sampled, decoded and transformed (the PyAV backend of every loader)."""

from __future__ import annotations

import os

import numpy as np
import torch

from rest_fast.data import augment
from rest_fast.data.decode import VideoDecodeError, draw_offsets, read_frames

__all__ = ["read_clip", "clip_rng"]


def clip_rng(seed: int | None) -> np.random.Generator:
    """The generator behind one clip's random draws (offsets, then augmentation parameters)."""
    return np.random.default_rng(seed)


def read_clip(path: str | os.PathLike, num_frames: int = 8, *, size: int = 224, train: bool = False,
              seed: int | None = None, backend: str = "pyav", return_indices: bool = False,
              method: str = "auto"):
    """Read ``num_frames`` frames of ``path`` as uint8 [T, size, size, 3] (RGB, display-rotated).

    Eval (``train=False``): segment-centre frames, central square resized to ``size``; deterministic.
    Train: per-segment random offsets, then the Table-10 augmentations (:mod:`rest_fast.data.augment`),
    all drawn from ``np.random.default_rng(seed)`` (offsets first, then augmentation parameters);
    ``seed=None`` draws fresh entropy. ``method`` picks the PyAV decoding path (see
    :func:`rest_fast.data.decode.read_frames`; results are identical, only speed differs).

    Returns the tensor, or ``(tensor, indices)`` with ``return_indices=True`` (``indices``: list of T
    decoded-frame indices). Raises :class:`VideoDecodeError` for files that cannot give a clip.
    """
    if backend != "pyav":
        raise ValueError(f"backend must be 'pyav' for read_clip (DALI decodes batches: DALIClipLoader), got {backend!r}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    rng = clip_rng(seed) if train else None
    offsets = draw_offsets(num_frames, rng) if train else None
    frames, indices = read_frames(path, num_frames, train=train, offsets=offsets, method=method)
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:  # a mid-stream resolution change: the clip has no single size
        raise VideoDecodeError(path, f"frame size changes inside the clip: {sorted(shapes)}")
    x = torch.from_numpy(np.stack(frames))
    _, h, w, _ = x.shape
    params = augment.draw_train_params(rng, h, w) if train else augment.eval_params(h, w)
    out = augment.apply(x, params, size)
    return (out, indices) if return_indices else out
