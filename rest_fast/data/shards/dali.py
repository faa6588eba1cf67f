"""DALI reader of prepared shards: nvJPEG decoding (``device="mixed"``) of the selected frames, crop and
resize on the GPU; same batches, seeds and augmentations as :class:`~rest_fast.data.shards.ShardClipLoader`.

Per batch, DataLoader worker processes (persistent across epochs) take the sampler's entries, read each
sample's byte range from the index (random access, as the CPU reader) and pick the T stored frames and
the augmentation parameters from the same per-sample seed (``sample_seed(seed, epoch, entry)``); the
main process only feeds the pipeline, which runs asynchronously ``prefetch`` batches ahead
(:class:`~rest_fast.data.dali.Prefetcher`). Only those T JPEGs go into the pipeline (``fn.external_source``, one image per frame, so a DALI batch is B*T images), where
``fn.decoders.image_slice`` decodes the crop window (nvJPEG on the GPU; libjpeg-turbo with
``device="cpu"``, which is how CI tests it) and ``fn.resize`` (bilinear, antialiased) brings it to S.
Flip, colour jitter and grayscale then run as torch ops on the output device, batched
(:func:`rest_fast.data.augment.apply_colour_batch`, the formulas every other loader uses), so the augmentations
are the CPU reader's exactly; the remaining difference is the JPEG decoder's IDCT/upsampling and the
resize filter (a few grey levels).

Two sample sources: random access in the epoch sampler's order (default; the same batches as the CPU
reader, for eval passes, captioning and feature extraction), or ``stream=True``, where DALI's
``fn.readers.webdataset`` streams the shards (sequential reads, DALI's shuffle buffer) and hands each
sample's json and still-encoded JPEGs to the Python side, which picks the T frames and parameters by
the entry's seed before decoding. In both cases only T of the F stored JPEGs reach nvJPEG (4x less
decoding than decoding every component the reader yields for T = 8, F = 32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from rest_fast.data import augment
from rest_fast.data.bad_files import BadFilesReport
from rest_fast.data.clip import clip_rng
from rest_fast.data.dali import Prefetcher, _resolve_dali_device, _sample_loader, dali_to_torch
from rest_fast.data.decode import draw_offsets, sample_indices
from rest_fast.data.loader import (
    ClipBatch,
    _EpochSampler,
    _LoaderBase,
    normalize_clips,
    sample_seed,
)
from rest_fast.data.workers import ResamplingDataset, resolve_num_workers

from .reader import (
    PREPARED_READ_ERRORS,
    PreparedIndex,
    prepared_bad_reason,
    prepared_loader_index,
    read_sample,
)

__all__ = ["DALIShardLoader", "ShardSampleSource", "build_shard_pipeline", "build_reader_pipeline", "select_frames"]


def build_reader_pipeline(paths: Sequence[str], frames: int, *, batch_size: int, shuffle: bool, buffer: int,
                          seed: int, rank: int, world_size: int, num_threads: int = 2):
    """CPU pipeline around ``fn.readers.webdataset``: per sample the ``json`` and the ``frames`` JPEG
    components (``000.jpg`` ...; empty for a short video's absent frames), still encoded. This rank
    reads its contiguous share (``shard_id``/``num_shards``); the last batch of an epoch is padded."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=seed,
                  exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
    def pipe():
        ext = ["json"] + [f"{k:03d}.jpg" for k in range(frames)]
        return tuple(fn.readers.webdataset(paths=list(paths), ext=ext, missing_component_behavior="empty",
                                           random_shuffle=shuffle, initial_fill=max(1, buffer), shard_id=rank,
                                           num_shards=world_size, pad_last_batch=True, stick_to_shard=True,
                                           name="shards"))

    p = pipe()
    p.build()
    return p


def build_shard_pipeline(*, batch_size: int, size: int, decoder_device: str = "mixed", device_id: int | None = 0,
                         num_threads: int = 4, prefetch: int = 2):
    """DALI pipeline over up to ``batch_size`` images per run: external inputs ``jpg`` (encoded bytes),
    ``anchor`` (crop x, y) and ``shape`` (crop w, h) in stored-frame pixels; output uint8 [size, size, 3] per
    image (nvJPEG on the GPU with ``decoder_device="mixed"``), ``prefetch`` runs in flight."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    if decoder_device not in ("mixed", "cpu"):
        raise ValueError(f"decoder_device must be 'mixed' or 'cpu', got {decoder_device!r}")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  exec_pipelined=True, exec_async=True, prefetch_queue_depth=max(1, prefetch))
    def pipe():
        jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
        img = fn.decoders.image_slice(jpg, anchor, shape, device=decoder_device, output_type=types.RGB,
                                      axis_names="WH", normalized_anchor=False, normalized_shape=False)
        return fn.resize(img, resize_x=size, resize_y=size, antialias=True, interp_type=types.INTERP_LINEAR)

    p = pipe()
    p.build()
    return p


def select_frames(index: PreparedIndex, *, num_frames: int, train: bool, seed: int, epoch: int, j: int,
                  jpegs, meta) -> dict:
    """Frames and parameters of entry ``j`` from its stored sample (the CPU reader's draws): a dict with
    ``entry``, ``label``, ``frames`` (source frame indices, int64 [T]), ``params`` and ``jpegs`` (the T JPEGs
    packed: a uint8 tensor and their end offsets)."""
    rng = clip_rng(sample_seed(seed, epoch, j)) if train else None
    off = draw_offsets(num_frames, rng) if train else None
    sel = sample_indices(len(jpegs), num_frames, train=train, offsets=off)
    h, w = int(meta["height"]), int(meta["width"])
    params = augment.draw_train_params(rng, h, w) if train else augment.eval_params(h, w)
    label = index[j].label
    return {"entry": j, "label": -1 if label is None else label,
            "frames": np.asarray([int(meta["frame_indices"][k]) for k in sel], dtype=np.int64), "params": params,
            "jpegs": _pack([jpegs[k] for k in sel]), "bad": []}


def _pack(parts) -> tuple[torch.Tensor, list[int]]:
    """T JPEGs as one uint8 tensor and their end offsets: one shared-memory block per sample when it crosses
    from a worker process (not T pickled byte strings)."""
    ends = np.cumsum([len(p) for p in parts]).tolist()
    return torch.from_numpy(np.frombuffer(b"".join(bytes(p) for p in parts), dtype=np.uint8).copy()), ends


def _unpack(packed) -> list[np.ndarray]:
    blob, ends = packed
    a = blob.numpy()
    return [a[s:e] for s, e in zip([0, *ends[:-1]], ends)]


class ShardSampleSource(ResamplingDataset):
    """What the worker processes prepare per ``(epoch, entry)`` (random access): :func:`select_frames` of
    the entry, after the deterministic resample of unreadable samples (listed in ``bad``)."""

    def __init__(self, index: PreparedIndex, *, num_frames: int, train: bool, seed: int, max_retries: int = 10,
                 decode_timeout_s: float = 0.0):
        self.index, self.num_frames, self.train, self.seed = index, num_frames, train, seed
        self.max_retries, self.decode_timeout_s = max_retries, decode_timeout_s

    read_errors = PREPARED_READ_ERRORS

    def read_entry(self, j: int, epoch: int) -> dict:
        jpegs, meta = read_sample(self.index, j)
        return select_frames(self.index, num_frames=self.num_frames, train=self.train, seed=self.seed, epoch=epoch,
                             j=j, jpegs=jpegs, meta=meta)

    def describe_bad(self, j: int, e: BaseException) -> tuple[str, str]:
        return prepared_bad_reason(self.index, j, e, self.decode_timeout_s)


class DALIShardLoader(_LoaderBase):
    """Same constructor and :class:`~rest_fast.data.ClipBatch` as
    :class:`~rest_fast.data.shards.ShardClipLoader` (random-access order from the epoch sampler), decoded
    by DALI. Extra args: ``decoder_device`` ("mixed" = nvJPEG; default for a CUDA ``device``, else "cpu"),
    ``device_id`` (default: ``device``'s index, the rank's local GPU), ``num_threads`` (DALI CPU threads),
    ``prefetch`` (batches in flight), ``num_workers``/``prefetch_factor`` (processes reading samples;
    -1 = from the CPUs), ``decode_timeout_s``.

    ``stream=True`` (training): samples come from DALI's ``fn.readers.webdataset`` reading the shards
    front to back (shuffled through ``shuffle_buffer`` samples with the loader's ``seed``; DALI's
    order, so the epoch's order differs from the sampler's, while each entry's frames and augmentations
    still depend only on (seed, epoch, entry)). Each rank reads its contiguous share; shares may differ
    by one sample, so use ``drop_last`` for DDP."""

    def __init__(self, index: PreparedIndex | str, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 num_frames: int = 8, size: int = 224, train: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", decoder_device: str | None = None, device_id: int | None = None,
                 num_threads: int = 4, shuffle: bool | None = None, drop_last: bool | None = None,
                 max_bad_fraction: float = 0.05, rank: int = 0, world_size: int = 1, max_retries: int = 10,
                 dtype: torch.dtype = torch.float32, stream: bool = False, shuffle_buffer: int = 256,
                 num_workers: int = 0, prefetch_factor: int = 2, prefetch: int = 2, decode_timeout_s: float = 0.0,
                 method: str = "auto", colour_on_device: bool | None = None):
        from rest_fast.data.dali import dali_available

        ok, why = dali_available()
        if not ok:
            raise ImportError(f"DALIShardLoader needs nvidia-dali (pip install -e .[dali]): {why}")
        index = prepared_loader_index(index, batch_size, mean, std)
        if decoder_device not in (None, "mixed", "cpu"):
            raise ValueError(f"decoder_device must be 'mixed' or 'cpu', got {decoder_device!r}")
        if len(index) == 0:
            raise ValueError("index is empty")
        self.index, self.batch_size, self.num_frames, self.size, self.train = index, batch_size, num_frames, size, train
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype
        self.seed, self.max_retries, self.max_bad_fraction = seed, max_retries, max_bad_fraction
        self.device = torch.device(device)
        self.decoder_device, self.device_id = _resolve_dali_device(self.device, decoder_device, device_id)
        self.drop_last = train if drop_last is None else drop_last
        self.sampler = _EpochSampler(len(index), shuffle=train if shuffle is None else shuffle, seed=seed,
                                     rank=rank, world_size=world_size)
        self.bad_files = BadFilesReport()
        for p in index.missing:
            self.bad_files.add(p, index.bad_reasons.get(p, "missing file"))
        self.stream, self.shuffle_buffer = stream, shuffle_buffer
        self.shuffle = train if shuffle is None else shuffle
        self.rank, self.world_size = rank, world_size
        self.num_threads, self.prefetch = num_threads, max(1, prefetch)
        self._reader = None
        self._prefetcher: Prefetcher | None = None
        self._shard_paths = [os.path.join(index.root, s) for s in index.info.get("shards", [])]
        if stream and len(index) != index.info.get("num_videos"):
            raise ValueError("stream=True reads whole shards: pass the full PreparedIndex, not a slice")
        self.samples = ShardSampleSource(index, num_frames=num_frames, train=train, seed=seed, max_retries=max_retries,
                                         decode_timeout_s=decode_timeout_s)
        self._loader = None if stream else _sample_loader(
            self.samples, self.sampler, batch_size=batch_size, drop_last=self.drop_last,
            num_workers=resolve_num_workers(num_workers), prefetch_factor=prefetch_factor)

    def __len__(self) -> int:
        n = len(self.sampler)
        if self.stream:
            n = len(self.index) * (self.rank + 1) // self.world_size - len(self.index) * self.rank // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def sample(self, epoch: int, entry: int) -> dict:
        """:func:`select_frames` of ``entry`` (or its replacement), in this process; bad samples recorded."""
        it = self.samples[(epoch, entry)]
        for path, reason in it["bad"]:
            self.bad_files.add(path, reason)
        return it

    def _stream_batches(self, epoch: int):
        """Lists of samples in the order DALI's ``fn.readers.webdataset`` streams this rank's part of the
        shards (``random_shuffle`` through a buffer of ``shuffle_buffer`` samples when shuffling)."""
        if self._reader is None:
            self._reader = build_reader_pipeline(self._shard_paths, self.index.info["frames"],
                                                 batch_size=self.batch_size, shuffle=self.shuffle,
                                                 buffer=self.shuffle_buffer, seed=self.seed, rank=self.rank,
                                                 world_size=self.world_size, num_threads=self.num_threads)
        n = len(self.index)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        left = hi - lo  # DALI's contiguous share for this rank; the padded tail of the last batch is dropped
        while left > 0:
            outs = self._reader.run()
            batch = []
            for i in range(min(left, len(outs[0]))):
                meta = json.loads(bytes(np.array(outs[0][i])))
                jpegs = [np.array(o[i]).tobytes() for o in outs[1:]]
                jpegs = jpegs[:len(meta["frame_indices"])]  # absent components of short videos are empty
                batch.append(select_frames(self.index, num_frames=self.num_frames, train=self.train, seed=self.seed,
                                           epoch=epoch, j=self.index.position(meta["path"]), jpegs=jpegs, meta=meta))
            left -= len(batch)
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def _batches(self, batches=None):
        if self.stream:
            yield from self._stream_batches(self.sampler.epoch)
            return
        for items in (self._loader if batches is None else batches):
            for s in items:
                for path, reason in s["bad"]:
                    self.bad_files.add(path, reason)
            self._check_bad()
            yield items

    @staticmethod
    def _feed(pipe, samples) -> None:
        jpg, anchor, shape = [], [], []
        for s in samples:
            x, y, w, h = s["params"].crop
            for f in _unpack(s["jpegs"]):
                jpg.append(f)
                anchor.append(np.array([x, y], dtype=np.float32))
                shape.append(np.array([w, h], dtype=np.float32))
        pipe.feed_input("jpg", jpg)
        pipe.feed_input("anchor", anchor)
        pipe.feed_input("shape", shape)

    def __iter__(self):
        self._check_bad()
        # workers forked before the DALI pipeline's threads exist (see rest_fast.data.dali.DALIClipLoader.__iter__)
        batches = None if self.stream else iter(self._loader)
        if self._prefetcher is None:
            pipe = build_shard_pipeline(batch_size=self.batch_size * self.num_frames, size=self.size,
                                        decoder_device=self.decoder_device, device_id=self.device_id,
                                        num_threads=self.num_threads, prefetch=self.prefetch)
            self._prefetcher = Prefetcher(pipe, self.prefetch)

        def fetch(outs):
            n = len(outs[0]) // self.num_frames
            return dali_to_torch(outs[0], self.device_id, (n, self.num_frames, self.size, self.size, 3))

        for samples, u8 in self._prefetcher.run(self._batches(batches), self._feed, fetch):
            u8 = augment.apply_colour_batch(u8.to(self.device, non_blocking=True), [s["params"] for s in samples])
            clips = normalize_clips(u8, self.mean, self.std, self.device, self.dtype)
            yield ClipBatch(clips, torch.tensor([s["label"] for s in samples], dtype=torch.int64).to(self.device),
                            torch.tensor([s["entry"] for s in samples], dtype=torch.int64),
                            torch.from_numpy(np.stack([s["frames"] for s in samples])))
