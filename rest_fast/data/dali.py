"""DALI clip loader: decoding (NVDEC with ``decoder_device="mixed"``), crop, resize, flip, colour and
normalisation inside one DALI pipeline; same batches and seeds as :class:`PyAVClipLoader`.

``nvidia.dali`` is imported lazily (``pip install -e .[dali]``). Without a GPU DALI decodes only VP8,
VP9 and MJPEG (``decoder_device="cpu"``); the same pipeline code runs on both, which is how the tests
check it on CPU.

Per sample, the Python side (main process) probes the file with PyAV without decoding
(:func:`~rest_fast.data.decode.probe_video`: packet count and size), picks the frame indices
(:func:`~rest_fast.data.decode.sample_indices`) and draws the augmentation parameters
(:mod:`~rest_fast.data.augment`) from the same per-sample seed as the PyAV loader; unreadable files are
replaced by the same deterministic resample and recorded in ``loader.bad_files``. DALI then decodes the
given indices (``fn.decoders.video(frames=...)``) and applies the parameters.

Differences from the PyAV path (documented, tested within a tolerance in eval mode):
* YUV -> RGB conversion and resampling filters differ (mean |difference| of a few grey levels);
* display rotation is ignored (crops use the coded frame size);
* colour jitter uses DALI's ``color_twist`` in its fixed order (the PyAV path uses a random order and
  torchvision's formulas); grayscale is ``saturation = 0``.
* Feeding is synchronous (``feed_input`` then ``run`` per batch); DALI's worker threads decode the
  samples of a batch in parallel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rest_fast.data import augment
from rest_fast.data.bad_files import BadFilesReport, TooManyBadFiles
from rest_fast.data.clip import clip_rng
from rest_fast.data.decode import VideoDecodeError, draw_offsets, probe_video, sample_indices
from rest_fast.data.index import VideoIndex
from rest_fast.data.loader import ClipBatch, _EpochSampler, _LoaderBase, resample_index, sample_seed

__all__ = ["DALIClipLoader", "dali_available"]

_INPUTS = ("enc", "frames", "anchor", "shape", "flip", "bri", "con", "sat", "hue")


def dali_available() -> tuple[bool, str]:
    """(True, version) when ``nvidia.dali`` imports, else (False, why)."""
    try:
        import nvidia.dali as dali
    except Exception as e:  # noqa: BLE001 - any import failure means "absent"
        return False, f"{type(e).__name__}: {e}"
    return True, dali.__version__


def build_pipeline(*, batch_size: int, size: int, mean: Sequence[float], std: Sequence[float],
                   decoder_device: str = "mixed", device_id: int | None = 0, num_threads: int = 4):
    """The DALI pipeline: external per-sample inputs ``enc`` (file bytes), ``frames`` (int32 [T]),
    ``anchor``/``shape`` (crop x, y / w, h in pixels), ``flip`` (int32), ``bri``/``con``/``sat``/``hue``
    (float; hue in degrees). Output: float [T, 3, size, size] per sample, normalised."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    if decoder_device not in ("mixed", "cpu"):
        raise ValueError(f"decoder_device must be 'mixed' or 'cpu', got {decoder_device!r}")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        bri, con, sat, hue = (fn.external_source(name=n, dtype=types.FLOAT, ndim=0) for n in ("bri", "con", "sat", "hue"))
        video = fn.decoders.video(enc, device=decoder_device, frames=frames)  # [T, H, W, 3] uint8
        video = fn.slice(video, anchor, shape, axis_names="WH", normalized_anchor=False, normalized_shape=False)
        video = fn.resize(video, resize_x=size, resize_y=size, antialias=True, interp_type=types.INTERP_LINEAR)
        video = fn.color_twist(video, brightness=bri, contrast=con, saturation=sat, hue=hue)
        return fn.crop_mirror_normalize(video, mirror=flip, dtype=types.FLOAT, output_layout="FCHW",
                                        mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std])

    p = pipe()
    p.build()
    return p


class DALIClipLoader(_LoaderBase):
    """Same contract as :class:`~rest_fast.data.PyAVClipLoader` (float [B, T, 3, S, S] on ``device``,
    ``ClipBatch``, ``set_epoch``, ``bad_files``, ``max_bad_fraction``), decoded by DALI.

    Extra args: ``decoder_device`` ("mixed" = NVDEC, default when CUDA is available; "cpu" decodes only
    VP8/VP9/MJPEG), ``device_id`` (GPU for the pipeline), ``num_threads`` (DALI CPU threads).
    """

    def __init__(self, index: VideoIndex, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 num_frames: int = 8, size: int = 224, train: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", decoder_device: str | None = None, device_id: int = 0,
                 num_threads: int = 4, shuffle: bool | None = None, drop_last: bool | None = None,
                 max_bad_fraction: float = 0.05, rank: int = 0, world_size: int = 1, max_retries: int = 10):
        ok, why = dali_available()
        if not ok:
            raise ImportError(f"DALIClipLoader needs nvidia-dali (pip install -e .[dali]): {why}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries (std > 0), got {mean!r}, {std!r}")
        if len(index) == 0:
            raise ValueError("index is empty")
        if decoder_device is None:
            decoder_device = "mixed" if torch.cuda.is_available() else "cpu"
        self.index, self.batch_size, self.num_frames, self.size, self.train = index, batch_size, num_frames, size, train
        self.seed, self.max_retries, self.max_bad_fraction = seed, max_retries, max_bad_fraction
        self.device = torch.device(device)
        self.decoder_device = decoder_device
        self.drop_last = train if drop_last is None else drop_last
        self.sampler = _EpochSampler(len(index), shuffle=train if shuffle is None else shuffle, seed=seed,
                                     rank=rank, world_size=world_size)
        self.bad_files = BadFilesReport()
        for p in index.missing:
            self.bad_files.add(p, "missing file")
        self.pipe = build_pipeline(batch_size=batch_size, size=size, mean=mean, std=std, decoder_device=decoder_device,
                                   device_id=device_id if decoder_device == "mixed" else None,
                                   num_threads=num_threads)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def prepare(self, epoch: int, entry: int):
        """(entry read, label, frame indices, params, file bytes) for one sample, with bad-file resampling."""
        j = entry
        for attempt in range(self.max_retries + 1):
            path, label = self.index[j]
            try:
                probe = probe_video(path)
                rng = clip_rng(sample_seed(self.seed, epoch, j)) if self.train else None
                off = draw_offsets(self.num_frames, rng) if self.train else None
                idx = sample_indices(probe.num_frames, self.num_frames, train=self.train, offsets=off)
                h, w = probe.height, probe.width
                params = augment.draw_train_params(rng, h, w) if self.train else augment.eval_params(h, w)
                return j, (-1 if label is None else label), idx, params, np.fromfile(path, dtype=np.uint8)
            except VideoDecodeError as e:
                self.bad_files.add(e.path, e.reason)
                self._check_bad()
            j = resample_index(self.seed, epoch, entry, attempt + 1, len(self.index))
        raise TooManyBadFiles(f"entry {entry} and {self.max_retries} deterministic replacements are all unreadable")

    def _feed(self, samples) -> None:
        cols = {k: [] for k in _INPUTS}
        for _, _, idx, p, data in samples:
            x, y, w, h = p.crop
            b, c, s, hue = p.jitter if p.jitter is not None else (1.0, 1.0, 1.0, 0.0)
            cols["enc"].append(data)
            cols["frames"].append(np.asarray(idx, dtype=np.int32))
            cols["anchor"].append(np.array([x, y], dtype=np.float32))
            cols["shape"].append(np.array([w, h], dtype=np.float32))
            cols["flip"].append(np.array(int(p.flip), dtype=np.int32))
            cols["bri"].append(np.array(b, dtype=np.float32))
            cols["con"].append(np.array(c, dtype=np.float32))
            cols["sat"].append(np.array(0.0 if p.gray else s, dtype=np.float32))
            cols["hue"].append(np.array(hue * 360.0, dtype=np.float32))
        for k, v in cols.items():
            self.pipe.feed_input(k, v)

    def _to_torch(self, out) -> torch.Tensor:
        if hasattr(out, "as_cpu") and self.decoder_device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            dst = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream())
            return dst.to(self.device)
        return torch.from_numpy(np.array(out.as_tensor())).to(self.device)

    def __iter__(self):
        self._check_bad()
        order = list(self.sampler)
        nb = len(self)
        for b in range(nb):
            keys = order[b * self.batch_size:(b + 1) * self.batch_size]
            samples = [self.prepare(e, i) for e, i in keys]
            self._feed(samples)
            (out,) = self.pipe.run()
            clips = self._to_torch(out)
            yield ClipBatch(clips, torch.tensor([s[1] for s in samples], dtype=torch.int64, device=self.device),
                            torch.tensor([s[0] for s in samples], dtype=torch.int64),
                            torch.tensor([s[2] for s in samples], dtype=torch.int64))
