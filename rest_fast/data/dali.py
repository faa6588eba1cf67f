"""DALI clip loader: NVDEC decoding (``decoder_device="mixed"``), crop and resize in one DALI pipeline
running asynchronously a few batches ahead; same batches, seeds and augmentations as :class:`PyAVClipLoader`.

``nvidia.dali`` is imported lazily (``pip install -e .[dali]``). Without a GPU DALI decodes only VP8,
VP9 and MJPEG (``decoder_device="cpu"``); the same pipeline code runs on both, which is how the tests
check it on CPU.

Who does what, per batch:

* DataLoader worker processes (persistent across epochs, ``num_workers``) do the light per-sample work:
  probe the file with PyAV without decoding (:func:`~rest_fast.data.decode.probe_video`: packet count and
  size), pick the frame indices (:func:`~rest_fast.data.decode.sample_indices`), draw the augmentation
  parameters (:mod:`~rest_fast.data.augment`) from the same per-sample seed as the PyAV loader, and read
  the file's bytes. Unreadable files (and files whose probe outlives ``decode_timeout_s``) are replaced by
  the same deterministic resample and recorded in ``loader.bad_files``.
* The DALI pipeline (``exec_async``, ``prefetch`` batches deep) decodes the given indices
  (``fn.decoders.video(frames=...)``) on this rank's GPU, crops and resizes; the main process only feeds
  it (:class:`Prefetcher`: ``prefetch`` batches are in flight while the model computes).
* Flip, colour jitter and grayscale then run on the output device for the whole batch at once
  (:func:`~rest_fast.data.augment.apply_colour_batch`, the same formulas as every other loader), then
  normalisation.

Differences from the PyAV path (documented, tested within a tolerance in eval mode): YUV -> RGB
conversion and resampling filters differ (mean |difference| of a few grey levels); display rotation is
ignored (crops use the coded frame size).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rest_fast.data import augment
from rest_fast.data.bad_files import BadFilesReport
from rest_fast.data.clip import clip_rng
from rest_fast.data.decode import VideoDecodeError, draw_offsets, probe_video, sample_indices
from rest_fast.data.index import VideoIndex
from rest_fast.data.loader import (
    ClipBatch,
    _EpochSampler,
    _LoaderBase,
    normalize_clips,
    sample_seed,
    video_bad_reason,
)
from rest_fast.data.workers import ResamplingDataset, resolve_num_workers

__all__ = ["DALIClipLoader", "dali_available", "build_pipeline", "Prefetcher", "PipelineError", "dali_to_torch"]


def dali_available() -> tuple[bool, str]:
    """(True, version) when ``nvidia.dali`` imports, else (False, why)."""
    try:
        import nvidia.dali as dali
    except Exception as e:  # noqa: BLE001 - any import failure means "absent"
        return False, f"{type(e).__name__}: {e}"
    return True, dali.__version__


def build_pipeline(*, batch_size: int, size: int, decoder_device: str = "mixed", device_id: int | None = 0,
                   num_threads: int = 4, prefetch: int = 2):
    """The DALI pipeline: external per-sample inputs ``enc`` (file bytes), ``frames`` (int32 [T]),
    ``anchor``/``shape`` (crop x, y / w, h in pixels). Output: uint8 [T, size, size, 3] per sample
    (at most ``batch_size`` samples per run), on the GPU for ``decoder_device="mixed"``.
    ``prefetch``: batches the asynchronous executor keeps in flight."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    if decoder_device not in ("mixed", "cpu"):
        raise ValueError(f"decoder_device must be 'mixed' or 'cpu', got {decoder_device!r}")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  exec_pipelined=True, exec_async=True, prefetch_queue_depth=max(1, prefetch))
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
        video = fn.decoders.video(enc, device=decoder_device, frames=frames)  # [T, H, W, 3] uint8
        video = fn.slice(video, anchor, shape, axis_names="WH", normalized_anchor=False, normalized_shape=False)
        return fn.resize(video, resize_x=size, resize_y=size, antialias=True, interp_type=types.INTERP_LINEAR)

    p = pipe()
    p.build()
    return p


def dali_to_torch(out, device_id: int | None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Copy one DALI output (a uniform TensorList) into a new torch tensor: on ``cuda:device_id`` through
    torch's current stream for GPU outputs, else on the CPU. The DALI buffer may be released afterwards."""
    t = out.as_tensor()
    if device_id is not None and hasattr(out, "as_cpu"):  # TensorListGPU
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dev = torch.device("cuda", device_id)
        dst = torch.empty(tuple(t.shape()), dtype=to_torch_type[t.dtype], device=dev)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(dev))
    else:
        dst = torch.from_numpy(np.array(t))
    return dst.view(shape) if shape is not None else dst


class PipelineError(RuntimeError):
    """A DALI pipeline failed while running (e.g. NVDEC refused one file of a batch). ``batches`` are the batches fed
    but not returned, in order (the first is the one whose run failed); the pipeline must not be used again."""

    def __init__(self, batches: list, cause: BaseException):
        self.batches, self.cause = batches, cause
        super().__init__(f"{type(cause).__name__}: {_first_line(cause)}")


def _first_line(e: BaseException) -> str:
    """The line of a DALI error that says what went wrong (DALI prefixes "Critical error in pipeline" lines and a
    traceback of the pipeline definition)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if "encountered:" in lines[:-1]:  # "... encountered:" then the operator's message
        ln = lines[lines.index("encountered:") + 1]
        return (ln.split(" failed: ", 1)[1] if ln.startswith("Assert on ") and " failed: " in ln else ln)[:300]
    noise = ("Critical error", "Error in", "which was used", "File ", "C++ context", "Current pipeline object")
    useful = [ln for ln in lines if not ln.startswith(noise)]
    return (useful[0] if useful else (lines[0] if lines else type(e).__name__))[:300]


class Prefetcher:
    """Keep a DALI pipeline ``depth`` batches ahead of the consumer (DALI's scheduled API).

    :meth:`run` takes host-side batches, feeds them with ``feed(pipe, batch)`` and yields
    ``(batch, fetch(outputs))`` in order; ``fetch`` must copy what it needs (the buffers are released right
    after). The first run of a fresh pipeline must have ``depth`` batches fed (DALI then schedules them
    all); a shorter first epoch is padded by feeding its last batch again, and the padding's outputs are
    dropped. An abandoned epoch drains its scheduled runs so the next one starts aligned. A run that fails raises
    :class:`PipelineError` with the batches in flight; the prefetcher is then ``broken`` (not drained, not reused).
    """

    def __init__(self, pipe, depth: int):
        self.pipe, self.depth, self.primed, self.broken = pipe, max(1, depth), False, False

    def run(self, batches: Iterable, feed: Callable, fetch: Callable):
        pipe, src = self.pipe, iter(batches)
        inflight: deque = deque()

        def submit() -> bool:
            b = next(src, None)  # may raise (TooManyBadFiles) before anything is fed
            if b is None:
                return False
            feed(pipe, b)
            inflight.append(b)
            if self.primed:
                pipe.schedule_run()
            return True

        try:
            if not self.primed:
                while len(inflight) < self.depth and submit():
                    pass
                if not inflight:
                    return
                last = inflight[-1]
                while len(inflight) < self.depth:
                    feed(pipe, last)
                    inflight.append(None)
                pipe.schedule_run()  # the first call runs `depth` iterations
                self.primed = True
            else:
                for _ in range(self.depth):
                    if not submit():
                        break
            while inflight:
                try:
                    outs = pipe.share_outputs()
                except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError for any failure inside a run
                    self.broken = True
                    failed = [b for b in inflight if b is not None]
                    inflight.clear()
                    raise PipelineError(failed, e) from e
                b = inflight.popleft()
                got = fetch(outs) if b is not None else None
                pipe.release_outputs()
                submit()
                if b is not None:
                    yield b, got
        finally:
            while inflight and not self.broken:
                pipe.share_outputs()
                pipe.release_outputs()
                inflight.popleft()


class VideoSampleSource(ResamplingDataset):
    """What the DALI loader's worker processes prepare per ``(epoch, entry)``: the entry read, its label,
    frame indices (int32 [T]), :class:`~rest_fast.data.augment.ClipParams` and the file's bytes, after
    resampling bad entries (``bad`` lists them). ``skip_bad=True`` does not resample: the item comes back
    with ``"failed": True`` (callers that must report per video, e.g. captioning). ``gpu_decoder``: the pipeline
    decodes with NVDEC, so a file it cannot take (codec, profile, pixel format or size:
    :meth:`~rest_fast.data.decode.VideoProbe.gpu_rejects`) is a bad file with that reason, never fed to it."""

    def __init__(self, index: VideoIndex, *, num_frames: int, train: bool, seed: int, max_retries: int = 10,
                 decode_timeout_s: float = 0.0, skip_bad: bool = False, gpu_decoder: bool = False):
        self.index, self.num_frames, self.train, self.seed = index, num_frames, train, seed
        self.max_retries, self.decode_timeout_s, self.skip_bad = max_retries, decode_timeout_s, skip_bad
        self.gpu_decoder = gpu_decoder

    read_errors = (VideoDecodeError, OSError)

    def read_entry(self, j: int, epoch: int) -> dict:
        path, label = self.index[j]
        probe = probe_video(path)
        why = probe.gpu_rejects() if self.gpu_decoder else None
        if why is not None:
            raise VideoDecodeError(path, f"the GPU decoder cannot take it: {why}")
        rng = clip_rng(sample_seed(self.seed, epoch, j)) if self.train else None
        off = draw_offsets(self.num_frames, rng) if self.train else None
        idx = sample_indices(probe.num_frames, self.num_frames, train=self.train, offsets=off)
        h, w = probe.height, probe.width
        params = augment.draw_train_params(rng, h, w) if self.train else augment.eval_params(h, w)
        # a tensor crosses from the worker through shared memory, not through the pipe (pickled
        # bytes would cost the main process ~1 GB/s of copying at 500 clips/s)
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        return {"entry": j, "label": -1 if label is None else label, "frames": np.asarray(idx, np.int32),
                "params": params, "data": data, "failed": False}

    def describe_bad(self, j: int, e: BaseException) -> tuple[str, str]:
        return video_bad_reason(e, str(self.index[j][0]), self.decode_timeout_s)


def _items(items):
    return items


def _sample_loader(dataset: Dataset, sampler, *, batch_size: int, drop_last: bool, num_workers: int,
                   prefetch_factor: int) -> DataLoader:
    """Persistent worker processes preparing lists of samples (no tensors: the DALI side consumes them)."""
    kw = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=_items,
                      drop_last=drop_last, **kw)


def _resolve_dali_device(device: torch.device, decoder_device: str | None, device_id: int | None):
    """(decoder_device, device_id): by default "mixed" on ``device``'s GPU for a CUDA run (the rank's local
    GPU), else DALI's CPU variant (``device_id`` None)."""
    if decoder_device is None:
        decoder_device = "mixed" if device.type == "cuda" else "cpu"
    if decoder_device == "mixed" and device_id is None:
        device_id = device.index if device.type == "cuda" and device.index is not None else (
            torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return decoder_device, (device_id if decoder_device == "mixed" else None)


class DALIClipLoader(_LoaderBase):
    """Same contract as :class:`~rest_fast.data.PyAVClipLoader` (float [B, T, 3, S, S] on ``device``,
    ``ClipBatch``, ``set_epoch``, ``bad_files``, ``max_bad_fraction``), decoded by DALI.

    Extra args: ``decoder_device`` ("mixed" = NVDEC on the GPU; default "mixed" for a CUDA ``device``, else
    "cpu", which decodes only VP8/VP9/MJPEG), ``device_id`` (the GPU DALI decodes on; default ``device``'s
    index, i.e. the rank's local GPU), ``num_threads`` (DALI CPU threads), ``prefetch`` (batches DALI keeps
    in flight), ``num_workers``/``prefetch_factor`` (processes preparing samples; -1 = from the CPUs),
    ``decode_timeout_s`` (a sample whose probe takes longer is a bad file; 0 = no limit), ``skip_bad``
    (drop unreadable entries from their batch instead of resampling; ``batch.index`` says which are there).
    """

    def __init__(self, index: VideoIndex, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 num_frames: int = 8, size: int = 224, train: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", decoder_device: str | None = None, device_id: int | None = None,
                 num_threads: int = 4, shuffle: bool | None = None, drop_last: bool | None = None,
                 max_bad_fraction: float = 0.05, rank: int = 0, world_size: int = 1, max_retries: int = 10,
                 num_workers: int = 0, prefetch_factor: int = 2, prefetch: int = 2, decode_timeout_s: float = 0.0,
                 skip_bad: bool = False, dtype: torch.dtype = torch.float32, method: str = "auto"):
        ok, why = dali_available()
        if not ok:
            raise ImportError(f"DALIClipLoader needs nvidia-dali (pip install -e .[dali]): {why}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries (std > 0), got {mean!r}, {std!r}")
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
        for p in index.missing:  # with why: a missing file, a FIFO, a dangling link...
            self.bad_files.add(p, getattr(index, "bad_reasons", {}).get(p, "missing file"))
        self.samples = VideoSampleSource(index, num_frames=num_frames, train=train, seed=seed, max_retries=max_retries,
                                         decode_timeout_s=decode_timeout_s, skip_bad=skip_bad,
                                         gpu_decoder=self.decoder_device == "mixed")
        self._loader = _sample_loader(self.samples, self.sampler, batch_size=batch_size, drop_last=self.drop_last,
                                      num_workers=resolve_num_workers(num_workers), prefetch_factor=prefetch_factor)
        self.num_threads, self.prefetch = num_threads, max(1, prefetch)
        self._prefetcher: Prefetcher | None = None

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def pipe(self):
        if self._prefetcher is None:  # built on first use (a loader that is never iterated costs nothing)
            pipe = build_pipeline(batch_size=self.batch_size, size=self.size, decoder_device=self.decoder_device,
                                  device_id=self.device_id, num_threads=self.num_threads, prefetch=self.prefetch)
            self._prefetcher = Prefetcher(pipe, self.prefetch)
        return self._prefetcher.pipe

    @staticmethod
    def _feed(pipe, samples) -> None:
        cols: dict[str, list] = {"enc": [], "frames": [], "anchor": [], "shape": []}
        for s in samples:
            x, y, w, h = s["params"].crop
            cols["enc"].append(s["data"].numpy())
            cols["frames"].append(s["frames"])
            cols["anchor"].append(np.array([x, y], dtype=np.float32))
            cols["shape"].append(np.array([w, h], dtype=np.float32))
        for k, v in cols.items():
            pipe.feed_input(k, v)

    def _good_batches(self, batches=None):
        for items in (self._loader if batches is None else batches):
            for s in items:
                for path, reason in s["bad"]:
                    self.bad_files.add(path, reason)
            self._check_bad()
            good = [s for s in items if not s["failed"]]
            if good:
                yield good

    def _fetch(self, outs) -> torch.Tensor:
        return dali_to_torch(outs[0], self.device_id)

    def _batch(self, samples, u8: torch.Tensor) -> ClipBatch:
        u8 = augment.apply_colour_batch(u8.to(self.device, non_blocking=True), [s["params"] for s in samples])
        clips = normalize_clips(u8, self.mean, self.std, self.device, self.dtype)
        return ClipBatch(clips, torch.tensor([s["label"] for s in samples], dtype=torch.int64).to(self.device),
                         torch.tensor([s["entry"] for s in samples], dtype=torch.int64),
                         torch.from_numpy(np.stack([s["frames"] for s in samples]).astype(np.int64)))

    def _isolate(self, samples) -> list:
        """Decode the samples of a batch whose run failed one at a time, each in a fresh one-sample pipeline:
        ``[(sample, uint8 [T, S, S, 3])]`` for those that decode; each one that fails is a counted bad file with the
        decoder's reason (a decoder error on one file never ends the epoch)."""
        good = []
        for s in samples:
            pipe = build_pipeline(batch_size=1, size=self.size, decoder_device=self.decoder_device,
                                  device_id=self.device_id, num_threads=self.num_threads, prefetch=1)
            try:
                for _, u8 in Prefetcher(pipe, 1).run([[s]], self._feed, self._fetch):
                    good.append((s, u8[0]))
            except PipelineError as e:
                self.bad_files.add(str(self.index[s["entry"]][0]), f"the video decoder failed on it: {e}")
            del pipe
        self._check_bad()
        return good

    def __iter__(self):
        self._check_bad()
        # Start order: the worker processes are forked (first epoch; they persist) before the DALI pipeline and its
        # threads exist, so no fork copies a live DALI thread (a fork copies only the forking thread: a lock held
        # by another thread at that moment stays locked forever in the child).
        batches = iter(self._loader)
        self.pipe  # noqa: B018 - builds the pipeline and its prefetcher
        src = self._good_batches(batches)
        while True:
            try:
                for samples, u8 in self._prefetcher.run(src, self._feed, self._fetch):
                    yield self._batch(samples, u8)
                return
            except PipelineError as e:
                # the run of e.batches[0] failed: its samples are decoded one by one (the failing file becomes a
                # bad file); the batches behind it go again through a fresh pipeline, then the rest of the epoch
                self._prefetcher = None
                good = self._isolate(e.batches[0])
                if good:
                    yield self._batch([s for s, _ in good], torch.stack([u for _, u in good]))
                src = itertools.chain(e.batches[1:], src)
                self.pipe  # noqa: B018 - a fresh pipeline
