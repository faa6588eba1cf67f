"""DALI reader of prepared shards: nvJPEG decoding (``device="mixed"``) of the selected frames, crop and
resize on the GPU; same batches, seeds and augmentations as :class:`~rest_fast.data.shards.ShardClipLoader`.

Per batch the Python side (main process) takes the sampler's entries, reads each sample's byte range
from the index (random access, as the CPU reader) and picks the T stored frames and the augmentation
parameters from the same per-sample seed (``sample_seed(seed, epoch, entry)``). Only those T JPEGs go
into the pipeline (``fn.external_source``, one image per frame, so a DALI batch is B*T images), where
``fn.decoders.image_slice`` decodes the crop window (nvJPEG on the GPU; libjpeg-turbo with
``device="cpu"``, which is how CI tests it) and ``fn.resize`` (bilinear, antialiased) brings it to S.
Flip, colour jitter and grayscale then run as torch ops on the output device
(:func:`rest_fast.data.augment.apply_colour`, the code every other loader uses), so the augmentations
are the CPU reader's exactly; the remaining difference is the JPEG decoder's IDCT/upsampling and the
resize filter (a few grey levels).

Why not ``fn.readers.webdataset``: it yields every stored frame of a sample (F = 32 JPEGs, 4x the nvJPEG
work for T = 8) in DALI's own order, and the per-sample frame choice and augmentation parameters come
from a Python-side seed keyed by the entry. The shards stay plain WebDataset files that the DALI reader
(and ``webdataset``) can read directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rest_fast.data import augment
from rest_fast.data.bad_files import BadFilesReport, TooManyBadFiles
from rest_fast.data.clip import clip_rng
from rest_fast.data.decode import VideoDecodeError, draw_offsets, sample_indices
from rest_fast.data.loader import _EpochSampler, ClipBatch, normalize_clips, resample_index, sample_seed

from .reader import PreparedIndex, read_sample

__all__ = ["DALIShardLoader", "build_shard_pipeline"]


def build_shard_pipeline(*, batch_size: int, size: int, decoder_device: str = "mixed", device_id: int | None = 0,
                         num_threads: int = 4):
    """DALI pipeline over ``batch_size`` images: external inputs ``jpg`` (encoded bytes), ``anchor``
    (crop x, y) and ``shape`` (crop w, h) in stored-frame pixels; output uint8 [size, size, 3] per image."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    if decoder_device not in ("mixed", "cpu"):
        raise ValueError(f"decoder_device must be 'mixed' or 'cpu', got {decoder_device!r}")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
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


class DALIShardLoader:
    """Same constructor and :class:`~rest_fast.data.ClipBatch` as
    :class:`~rest_fast.data.shards.ShardClipLoader` (random-access order from the epoch sampler), decoded
    by DALI. Extra args: ``decoder_device`` ("mixed" = nvJPEG, default when CUDA is available, else
    "cpu"), ``device_id``, ``num_threads`` (DALI CPU threads)."""

    def __init__(self, index: PreparedIndex | str, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 num_frames: int = 8, size: int = 224, train: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", decoder_device: str | None = None, device_id: int = 0,
                 num_threads: int = 4, shuffle: bool | None = None, drop_last: bool | None = None,
                 max_bad_fraction: float = 0.05, rank: int = 0, world_size: int = 1, max_retries: int = 10,
                 dtype: torch.dtype = torch.float32):
        from rest_fast.data.dali import dali_available

        ok, why = dali_available()
        if not ok:
            raise ImportError(f"DALIShardLoader needs nvidia-dali (pip install -e .[dali]): {why}")
        if not isinstance(index, PreparedIndex):
            index = PreparedIndex.load(index)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries (std > 0), got {mean!r}, {std!r}")
        if len(index) == 0:
            raise ValueError("index is empty")
        if decoder_device is None:
            decoder_device = "mixed" if torch.cuda.is_available() else "cpu"
        self.index, self.batch_size, self.num_frames, self.size, self.train = index, batch_size, num_frames, size, train
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype
        self.seed, self.max_retries, self.max_bad_fraction = seed, max_retries, max_bad_fraction
        self.device, self.decoder_device = torch.device(device), decoder_device
        self.drop_last = train if drop_last is None else drop_last
        self.sampler = _EpochSampler(len(index), shuffle=train if shuffle is None else shuffle, seed=seed,
                                     rank=rank, world_size=world_size)
        self.bad_files = BadFilesReport()
        for p in index.missing:
            self.bad_files.add(p, index.bad_reasons.get(p, "missing file"))
        self._pipes: dict[int, object] = {}  # one per batch size (a short last batch gets its own)
        self._pipe_args = dict(size=size, decoder_device=decoder_device,
                               device_id=device_id if decoder_device == "mixed" else None, num_threads=num_threads)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _check_bad(self) -> None:
        total = len(self.index) + len(self.index.missing)
        if len(self.bad_files) > self.max_bad_fraction * total:
            raise TooManyBadFiles(
                f"{len(self.bad_files)} of {total} files are bad (> max_bad_fraction={self.max_bad_fraction}); "
                f"{self.bad_files.summary()}")

    def sample(self, epoch: int, entry: int):
        """(entry read, label, source frame indices, params, T JPEG byte arrays), with resampling."""
        j = entry
        for attempt in range(self.max_retries + 1):
            try:
                jpegs, meta = read_sample(self.index, j)
                rng = clip_rng(sample_seed(self.seed, epoch, j)) if self.train else None
                off = draw_offsets(self.num_frames, rng) if self.train else None
                sel = sample_indices(len(jpegs), self.num_frames, train=self.train, offsets=off)
                h, w = int(meta["height"]), int(meta["width"])
                params = augment.draw_train_params(rng, h, w) if self.train else augment.eval_params(h, w)
                label = self.index[j].label
                return (j, -1 if label is None else label, [int(meta["frame_indices"][k]) for k in sel], params,
                        [np.frombuffer(jpegs[k], dtype=np.uint8) for k in sel])
            except (VideoDecodeError, OSError, ValueError) as e:
                self.bad_files.add(self.index.paths[j], f"prepared sample unreadable: {e}")
                self._check_bad()
            j = resample_index(self.seed, epoch, entry, attempt + 1, len(self.index))
        raise TooManyBadFiles(f"entry {entry} and {self.max_retries} deterministic replacements are all unreadable")

    def _pipe(self, n: int):
        if n not in self._pipes:
            self._pipes[n] = build_shard_pipeline(batch_size=n, **self._pipe_args)
        return self._pipes[n]

    def _run(self, samples) -> torch.Tensor:
        """uint8 [B, T, S, S, 3] on ``self.device`` (crop + resize done by DALI)."""
        jpg, anchor, shape = [], [], []
        for _, _, _, p, frames in samples:
            x, y, w, h = p.crop
            for f in frames:
                jpg.append(f)
                anchor.append(np.array([x, y], dtype=np.float32))
                shape.append(np.array([w, h], dtype=np.float32))
        pipe = self._pipe(len(jpg))
        pipe.feed_input("jpg", jpg)
        pipe.feed_input("anchor", anchor)
        pipe.feed_input("shape", shape)
        (out,) = pipe.run()
        t = out.as_tensor()
        shp = (len(samples), self.num_frames, self.size, self.size, 3)
        if self.decoder_device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dst = torch.empty(tuple(t.shape()), dtype=torch.uint8,
                              device=torch.device("cuda", torch.cuda.current_device()))
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream())
            return dst.view(shp).to(self.device)
        return torch.from_numpy(np.array(t)).view(shp).to(self.device)

    def __iter__(self):
        self._check_bad()
        order = list(self.sampler)
        for b in range(len(self)):
            keys = order[b * self.batch_size:(b + 1) * self.batch_size]
            samples = [self.sample(e, i) for e, i in keys]
            u8 = self._run(samples)
            u8 = torch.stack([augment.apply_colour(u8[k], s[3]) for k, s in enumerate(samples)])
            clips = normalize_clips(u8, self.mean, self.std, self.device, self.dtype)
            yield ClipBatch(clips, torch.tensor([s[1] for s in samples], dtype=torch.int64, device=self.device),
                            torch.tensor([s[0] for s in samples], dtype=torch.int64),
                            torch.tensor([s[2] for s in samples], dtype=torch.int64))
