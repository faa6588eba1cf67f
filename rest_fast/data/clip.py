"""``read_clip``: one clip, sampled, decoded and transformed (the PyAV backend of every loader)."""

from __future__ import annotations

import os

import av
import numpy as np
import torch

from rest_fast.data import augment
from rest_fast.data.decode import (
    SWS_THREADS,
    VideoDecodeError,
    _rotation,
    draw_offsets,
    frame_to_rgb,
    read_frames,
)

__all__ = ["read_clip", "clip_rng", "crop_resize_frame"]


def clip_rng(seed: int | None) -> np.random.Generator:
    """The generator behind one clip's random draws (offsets, then augmentation parameters)."""
    return np.random.default_rng(seed)


def _display_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(height, width) as displayed (after the display-matrix rotation)."""
    return (frame.width, frame.height) if _rotation(frame) % 2 else (frame.height, frame.width)


def crop_resize_frame(frame: av.VideoFrame, crop: tuple[int, int, int, int], size: int) -> np.ndarray:
    """uint8 [size, size, 3] RGB: the display-coordinate ``crop`` (x, y, w, h) of ``frame`` resized to ``size``.

    YUV -> RGB at full size (swscale), rotation, an exact crop, then one swscale bilinear resize of the
    crop. Same crop as :func:`rest_fast.data.augment.apply` (the torch reference); only the resampling
    filter differs (a few grey levels on sharp textures), at a fraction of the cost (no float tensors).
    """
    x, y, w, h = crop
    a = frame_to_rgb(frame)[y:y + h, x:x + w]
    if (h, w) == (size, size):
        return np.ascontiguousarray(a)
    small = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
    return small.to_ndarray(width=size, height=size, format="rgb24", interpolation="BILINEAR", threads=SWS_THREADS)


def read_clip(path: str | os.PathLike, num_frames: int = 8, *, size: int = 224, train: bool = False,
              seed: int | None = None, backend: str = "pyav", return_indices: bool = False,
              method: str = "auto", resize: str = "swscale", colour: bool = True):
    """Read ``num_frames`` frames of ``path`` as uint8 [T, size, size, 3] (RGB, display-rotated).

    Eval (``train=False``): segment-centre frames, central square resized to ``size``; deterministic.
    Train: per-segment random offsets, then the Table-10 augmentations (:mod:`rest_fast.data.augment`),
    all drawn from ``np.random.default_rng(seed)`` (offsets first, then augmentation parameters);
    ``seed=None`` draws fresh entropy. ``method`` picks the PyAV decoding path (see
    :func:`rest_fast.data.decode.read_frames`; the frames are identical, only speed differs).
    ``resize="swscale"`` resizes crops in FFmpeg (:func:`crop_resize_frame`); ``"torch"`` uses the
    reference :func:`rest_fast.data.augment.apply` on full-size RGB frames (slower; tests).

    Returns the tensor, or ``(tensor, indices)`` with ``return_indices=True`` (``indices``: list of T
    decoded-frame indices). ``colour=False`` stops after crop + resize and returns ``(tensor, indices,
    params)``: the caller applies flip/jitter/grayscale later (``augment.apply_colour_batch`` on the GPU).
    Raises :class:`VideoDecodeError` for files that cannot give a clip.
    """
    if backend != "pyav":
        raise ValueError(f"backend must be 'pyav' for read_clip (DALI decodes batches: DALIClipLoader), got {backend!r}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if resize not in ("swscale", "torch"):
        raise ValueError(f"resize must be 'swscale' or 'torch', got {resize!r}")
    rng = clip_rng(seed) if train else None
    offsets = draw_offsets(num_frames, rng) if train else None
    frames, indices = read_frames(path, num_frames, train=train, offsets=offsets, method=method, convert=None)
    sizes = {_display_size(f) for f in frames}
    if len(sizes) != 1:  # a mid-stream resolution change: the clip has no single size
        raise VideoDecodeError(path, f"frame size changes inside the clip: {sorted(sizes)}")
    h, w = sizes.pop()
    params = augment.draw_train_params(rng, h, w) if train else augment.eval_params(h, w)
    if not colour and resize == "torch":
        raise ValueError("colour=False needs resize='swscale'")
    try:
        if not colour:
            return torch.from_numpy(np.stack([crop_resize_frame(f, params.crop, size) for f in frames])), indices, params
        if resize == "torch":
            out = augment.apply(torch.from_numpy(np.stack([frame_to_rgb(f) for f in frames])), params, size)
        else:
            out = augment.apply_colour(torch.from_numpy(np.stack([crop_resize_frame(f, params.crop, size)
                                                                  for f in frames])), params)
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"frame conversion failed: {e.strerror or e}") from None
    return (out, indices) if return_indices else out
