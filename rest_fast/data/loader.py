"""PyAV clip loader: a torch DataLoader with workers, deterministic per-sample seeds, bad-file recovery."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from rest_fast.data import augment
from rest_fast.data.bad_files import BadFilesReport, TooManyBadFiles
from rest_fast.data.clip import read_clip
from rest_fast.data.decode import VideoDecodeError, preverify
from rest_fast.data.index import VideoIndex
from rest_fast.data.workers import (  # noqa: F401 - resample_index re-exported
    DecodeTimeout,
    ResamplingDataset,
    resample_index,
    resolve_num_workers,
)

__all__ = ["ClipBatch", "ClipDataset", "PyAVClipLoader", "sample_seed", "normalize_clips", "finish_batch", "loader_kwargs"]

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed ``read_clip`` gets for dataset entry ``index`` in ``epoch``: independent of worker count,
    batch size and order, so the same (seed, epoch) reads the same frames and augmentations."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def normalize_clips(clips: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, T, S, S, 3] -> ``dtype`` [B, T, 3, S, S], ``(x / 255 - mean) / std`` per channel, on ``device``.

    The uint8 tensor is moved first (4x fewer bytes over PCIe), then converted there.
    """
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips must be uint8 [B, T, S, S, 3], got {clips.dtype} {tuple(clips.shape)}")
    dev = torch.device(device) if device is not None else clips.device
    x = clips.to(dev, non_blocking=True).permute(0, 1, 4, 2, 3).to(dtype)
    m, s = _norm_constants(tuple(map(float, mean)), tuple(map(float, std)), dev, dtype)
    return ((x - m) / s).contiguous()


@functools.lru_cache(maxsize=64)
def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``255·mean`` and ``255·std`` as [1, 1, 3, 1, 1] tensors on ``device``, made once per (values, device, dtype):
    building them per batch would be a host→device copy from pageable memory (a sync) every batch."""
    m = torch.as_tensor(mean, dtype=dtype, device=device).view(1, 1, 3, 1, 1) * 255.0
    s = torch.as_tensor(std, dtype=dtype, device=device).view(1, 1, 3, 1, 1) * 255.0
    return m, s


class ClipBatch(NamedTuple):
    """One batch. ``clips``: float [B, T, 3, S, S] normalised, on the loader's device; ``labels``: int64
    [B] (-1 when the index is unlabelled); ``index``: int64 [B], the dataset entries actually read (a bad
    entry's replacement, so captions/labels must be looked up with it); ``frame_indices``: int64 [B, T]."""

    clips: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    frame_indices: torch.Tensor


class _EpochSampler(Sampler):
    """Yields ``(epoch, entry)``: the order is a permutation seeded by (seed, epoch) when shuffling,
    sharded over ``world_size`` ranks (padded by wrapping so every rank gets the same count)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int):
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch = 0
        self.start = 0  # entries of this rank's order to skip (a run resumed mid-epoch); the trainer resets it

    def __len__(self) -> int:
        return max(0, self._per_rank() - self.start)

    def _per_rank(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, 7]).generate_state(1)[0]))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self._per_rank() * self.world_size
        order = (order * math.ceil(total / max(1, len(order))))[:total]
        return iter([(self.epoch, i) for i in order[self.rank::self.world_size][self.start:]])


def video_bad_reason(e: BaseException, path: str, timeout_s: float) -> tuple[str, str]:
    """``(path, reason)`` recorded for a video file that could not be read (decoder error, deadline, I/O)."""
    if isinstance(e, VideoDecodeError):
        return e.path, e.reason
    if isinstance(e, DecodeTimeout):
        return path, f"decoding took longer than decode_timeout_s={timeout_s:g}"
    return path, f"{type(e).__name__}: {e}"


class ClipDataset(ResamplingDataset):
    """Map-style dataset over a :class:`VideoIndex`; items are keyed by ``(epoch, entry)``.

    A bad entry (``VideoDecodeError``, or a read that outlives ``decode_timeout_s``) is replaced by
    :func:`resample_index` (up to ``max_retries`` tries) and every failure is returned with the item, so
    the main process can report it. ``defer_colour``: skip flip/jitter/grayscale and return the clip's
    ``params`` with it (the loader applies them on its device, batched).
    """

    def __init__(self, index: VideoIndex, *, num_frames: int = 8, size: int = 224, train: bool = False,
                 seed: int = 0, max_retries: int = 10, method: str = "auto", decode_timeout_s: float = 0.0,
                 defer_colour: bool = False):
        if len(index) == 0:
            raise ValueError("index is empty")
        self.index, self.num_frames, self.size, self.train = index, num_frames, size, train
        self.seed, self.max_retries, self.method = seed, max_retries, method
        self.decode_timeout_s, self.defer_colour = decode_timeout_s, defer_colour

    def read(self, path: str, seed: int):
        """(uint8 clip, frame indices, params or None): one entry's read; the colour part is skipped when
        deferred. Tests replace this to simulate decoders (e.g. one that hangs)."""
        if self.defer_colour:
            return read_clip(path, self.num_frames, size=self.size, train=self.train, seed=seed,
                             return_indices=True, method=self.method, colour=False)
        clip, idx = read_clip(path, self.num_frames, size=self.size, train=self.train, seed=seed,
                              return_indices=True, method=self.method)
        return clip, idx, None

    read_errors = (VideoDecodeError,)

    def read_entry(self, j: int, epoch: int) -> dict:
        path, label = self.index[j]
        clip, idx, params = self.read(path, sample_seed(self.seed, epoch, j))
        return {"clip": clip, "label": -1 if label is None else label, "index": j,
                "frame_indices": torch.tensor(idx, dtype=torch.int64), "params": params}

    def describe_bad(self, j: int, e: BaseException) -> tuple[str, str]:
        return video_bad_reason(e, str(self.index[j][0]), self.decode_timeout_s)


def _collate(items):
    return {
        "clips": torch.stack([it["clip"] for it in items]),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "frame_indices": torch.stack([it["frame_indices"] for it in items]),
        "bad": [b for it in items for b in it["bad"]],
        "params": [it.get("params") for it in items],
    }


def loader_kwargs(num_workers: int, prefetch_factor: int, persistent_workers: bool) -> dict:
    """DataLoader worker options: persistent workers (forked once, reused by every epoch and pass) and
    ``prefetch_factor`` batches queued per worker; none of it applies in-process (``num_workers=0``)."""
    if num_workers <= 0:
        return {}
    return {"prefetch_factor": max(1, int(prefetch_factor)), "persistent_workers": bool(persistent_workers)}


def finish_batch(u8: torch.Tensor, params, device: torch.device, mean, std, dtype) -> torch.Tensor:
    """uint8 [B, T, S, S, 3] (colour already applied when ``params`` is None or all None) -> normalised float
    [B, T, 3, S, S] on ``device``; deferred colour runs there batched (:func:`augment.apply_colour_batch`)."""
    if params is not None and any(p is not None for p in params):
        u8 = augment.apply_colour_batch(u8.to(device, non_blocking=True), params)
    return normalize_clips(u8, mean, std, device, dtype)


class _LoaderBase:
    """What every clip loader shares (PyAV, DALI, prepared shards): the epoch its sampler draws for, and the
    bad-files threshold. Subclasses set ``index``, ``sampler``, ``bad_files`` and ``max_bad_fraction``."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = int(epoch)

    def _check_bad(self) -> None:
        total = len(self.index) + len(self.index.missing)
        if len(self.bad_files) > self.max_bad_fraction * total:
            raise TooManyBadFiles(
                f"{len(self.bad_files)} of {total} files are bad (> max_bad_fraction={self.max_bad_fraction}); "
                f"{self.bad_files.summary()}")


class PyAVClipLoader(_LoaderBase):
    """Batches of normalised clips decoded by PyAV in DataLoader worker processes.

    Args:
        index: the clips (:class:`VideoIndex`).
        batch_size, num_frames (T), size (S): output [B, T, 3, S, S].
        mean, std: per-channel normalisation in [0, 1] units (the model's, e.g. CLIP's
            ``(0.4815, 0.4578, 0.4082)`` / ``(0.2686, 0.2613, 0.2758)``).
        train: random offsets + augmentations (and, by default, shuffling and drop_last).
        seed: base seed; call :meth:`set_epoch` each epoch. Entry ``i`` in epoch ``e`` is read with
            ``sample_seed(seed, e, i)``, so results do not depend on workers or batch composition.
        device: where batches land (uint8 is moved, then normalised there).
        num_workers: DataLoader worker processes (0 = in the main process, -1 = from the CPUs per rank:
            :func:`rest_fast.data.workers.default_num_workers`; capped at the CPUs available).
        prefetch_factor: batches queued per worker. persistent_workers: keep the workers between epochs
            (default; they are forked once per loader, not per epoch).
        decode_timeout_s: a clip whose read takes longer is a bad file (recorded, resampled); 0 = no limit.
        colour_on_device: flip/jitter/grayscale on ``device`` for the whole batch after the copy instead of
            per clip in the workers (default: when ``device`` is CUDA).
        max_bad_fraction: iteration stops with :class:`TooManyBadFiles` once more than this fraction of
            the index is known bad (missing files from ``VideoIndex(skip_missing=True)`` count too).
        rank, world_size: shard the epoch for distributed training.

    ``loader.bad_files`` is the :class:`BadFilesReport` (``loader.bad_files.write(run_dir)``).
    """

    def __init__(self, index: VideoIndex, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 num_frames: int = 8, size: int = 224, train: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", num_workers: int = 2, shuffle: bool | None = None,
                 drop_last: bool | None = None, max_bad_fraction: float = 0.05, rank: int = 0, world_size: int = 1,
                 prefetch_factor: int = 2, max_retries: int = 10, method: str = "auto",
                 dtype: torch.dtype = torch.float32, persistent_workers: bool = True, decode_timeout_s: float = 0.0,
                 colour_on_device: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries (std > 0), got {mean!r}, {std!r}")
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.index, self.mean, self.std = index, tuple(mean), tuple(std)
        self.device, self.dtype = torch.device(device), dtype
        self.max_bad_fraction = max_bad_fraction
        self._preverified = False
        self.bad_files = BadFilesReport()
        for p in index.missing:  # with why: a missing file, a FIFO, a dangling link...
            self.bad_files.add(p, getattr(index, "bad_reasons", {}).get(p, "missing file"))
        self.defer = self.device.type == "cuda" if colour_on_device is None else bool(colour_on_device)
        self.dataset = ClipDataset(index, num_frames=num_frames, size=size, train=train, seed=seed,
                                   max_retries=max_retries, method=method, decode_timeout_s=decode_timeout_s,
                                   defer_colour=self.defer and train)
        self.sampler = _EpochSampler(len(index), shuffle=train if shuffle is None else shuffle, seed=seed,
                                     rank=rank, world_size=world_size)
        num_workers = resolve_num_workers(num_workers)
        kw = loader_kwargs(num_workers, prefetch_factor, persistent_workers)
        self._loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                  collate_fn=_collate, drop_last=train if drop_last is None else drop_last,
                                  pin_memory=self.device.type == "cuda", **kw)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        self._check_bad()
        if not self._preverified and self._loader.num_workers > 0 and self.dataset.method == "auto":
            # verified file types are inherited by forked workers (see decode.preverify)
            preverify(self.index.paths, num_frames=self.dataset.num_frames)
            self._preverified = True
        for b in self._loader:
            for path, reason in b["bad"]:
                self.bad_files.add(path, reason)
            self._check_bad()
            clips = finish_batch(b["clips"], b["params"], self.device, self.mean, self.std, self.dtype)
            yield ClipBatch(clips, b["labels"].to(self.device), b["index"], b["frame_indices"])
