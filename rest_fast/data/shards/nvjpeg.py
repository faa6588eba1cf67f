"""Prepared shards decoded on the GPU by torchvision's nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``).

The GPU path for a machine with CUDA and torchvision but without DALI (the GPU image this project is measured on
has no DALI). Same constructor and :class:`~rest_fast.data.ClipBatch` as
:class:`~rest_fast.data.shards.ShardClipLoader` (random access in the epoch sampler's order); who does what:

* DataLoader worker processes (persistent) read each sample's byte range and pick its frames and augmentation
  parameters, the CPU reader's draws (:func:`~rest_fast.data.shards.dali.select_frames`); no pixel is decoded there;
* the main process decodes the batch's ``B·T`` JPEGs in one batched call on ``device`` (nvJPEG on CUDA; on CPU the
  same call runs libjpeg-turbo, which is how CPU tests check this code), crops each sample's box and resizes it to
  ``S×S`` (bilinear, antialiased when reducing, as PIL does in the CPU reader), then flip / jitter / grayscale and
  normalisation run batched on ``device`` (:func:`~rest_fast.data.augment.apply_colour_batch`).

Differences from the CPU reader (tested within tolerance): JPEG decoders (nvJPEG vs libjpeg-turbo's IDCT and
chroma upsampling) and the resampling filter's rounding differ by a few grey levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rest_fast.data import augment
from rest_fast.data.bad_files import BadFilesReport
from rest_fast.data.loader import ClipBatch, _EpochSampler, _LoaderBase, normalize_clips
from rest_fast.data.workers import resolve_num_workers

from .reader import PreparedIndex, prepared_loader_index

__all__ = ["NvJpegShardLoader", "nvjpeg_available", "decode_crop_resize"]


def nvjpeg_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(True, "torchvision X nvJPEG")`` when torchvision can decode JPEG batches on ``device`` (CUDA), else
    ``(False, why)``."""
    try:
        import torchvision
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "absent"
        return False, f"torchvision is not importable ({type(e).__name__}: {e})"
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, f"torchvision {torchvision.__version__} nvJPEG"


def decode_crop_resize(jpegs: Sequence[torch.Tensor], boxes: Sequence[tuple[int, int, int, int]], num_frames: int,
                       size: int, device: torch.device) -> torch.Tensor:
    """Decode ``B·T`` JPEGs in one batched call on ``device``, crop each sample's box, resize it to ``size``.

    Args:
        jpegs: ``B·T`` uint8 1-D CPU tensors (the encoded frames, sample-major).
        boxes: ``B`` crop boxes ``(x, y, w, h)`` in stored-frame pixels, one per sample (all its frames).
        num_frames: T.
    Returns:
        uint8 ``[B, T, size, size, 3]`` on ``device``.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    frames = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)  # B·T × [3, H, W] uint8
    out = []
    for b, (x, y, w, h) in enumerate(boxes):
        clip = torch.stack(frames[b * num_frames:(b + 1) * num_frames])[:, :, y:y + h, x:x + w]  # [T, 3, h, w]
        if (w, h) != (size, size):
            clip = F.interpolate(clip.float(), size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True).round_().clamp_(0, 255).to(torch.uint8)
        out.append(clip.permute(0, 2, 3, 1))
    return torch.stack(out)


class NvJpegShardLoader(_LoaderBase):
    """:class:`~rest_fast.data.shards.ShardClipLoader`'s constructor and batches, JPEGs decoded by torchvision on
    ``device`` (nvJPEG for CUDA; module doc). ``num_workers``/``prefetch_factor``: processes reading samples (-1 =
    from the CPUs); ``decode_timeout_s`` turns a sample read that hangs into a bad file."""

    def __init__(self, index: PreparedIndex | str, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 num_frames: int = 8, size: int = 224, train: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", shuffle: bool | None = None, drop_last: bool | None = None,
                 max_bad_fraction: float = 0.05, rank: int = 0, world_size: int = 1, max_retries: int = 10,
                 dtype: torch.dtype = torch.float32, num_workers: int = 0, prefetch_factor: int = 2,
                 decode_timeout_s: float = 0.0, method: str = "auto"):
        from rest_fast.data.dali import _sample_loader
        from rest_fast.data.shards.dali import ShardSampleSource

        ok, why = nvjpeg_available(device)
        if not ok:
            raise ImportError(f"NvJpegShardLoader needs torchvision (and CUDA for nvJPEG): {why}")
        index = prepared_loader_index(index, batch_size, mean, std)
        if len(index) == 0:
            raise ValueError("index is empty")
        self.index, self.batch_size, self.num_frames, self.size = index, batch_size, num_frames, size
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype
        self.max_bad_fraction = max_bad_fraction
        self.device = torch.device(device)
        self.drop_last = train if drop_last is None else drop_last
        self.sampler = _EpochSampler(len(index), shuffle=train if shuffle is None else shuffle, seed=seed,
                                     rank=rank, world_size=world_size)
        self.bad_files = BadFilesReport()
        for p in index.missing:
            self.bad_files.add(p, index.bad_reasons.get(p, "missing file"))
        self.samples = ShardSampleSource(index, num_frames=num_frames, train=train, seed=seed, max_retries=max_retries,
                                         decode_timeout_s=decode_timeout_s)
        self._loader = _sample_loader(self.samples, self.sampler, batch_size=batch_size, drop_last=self.drop_last,
                                      num_workers=resolve_num_workers(num_workers), prefetch_factor=prefetch_factor)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        from rest_fast.data.shards.dali import _unpack

        self._check_bad()
        for items in self._loader:
            for s in items:
                for path, reason in s["bad"]:
                    self.bad_files.add(path, reason)
            self._check_bad()
            jpegs = [torch.from_numpy(f) for s in items for f in _unpack(s["jpegs"])]
            u8 = decode_crop_resize(jpegs, [s["params"].crop for s in items], self.num_frames, self.size, self.device)
            u8 = augment.apply_colour_batch(u8, [s["params"] for s in items])
            clips = normalize_clips(u8, self.mean, self.std, self.device, self.dtype)
            yield ClipBatch(clips, torch.tensor([s["label"] for s in items], dtype=torch.int64).to(self.device),
                            torch.tensor([s["entry"] for s in items], dtype=torch.int64),
                            torch.from_numpy(np.stack([s["frames"] for s in items])))
