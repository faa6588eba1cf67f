"""rest_fast.data: video index, clip reading, batched loaders (PyAV and DALI), augmentations.

Quick reference for callers (the trainer):

    from rest_fast.data import VideoIndex, PyAVClipLoader, DALIClipLoader, read_clip

    index = VideoIndex.from_list("splits/k400_splits_val.txt", root="/data/k400")  # or .from_folder / .from_paths
    loader = PyAVClipLoader(index, batch_size=32, num_frames=8, size=224, train=True,
                            mean=model.mean, std=model.std,   # per channel, in [0, 1] units
                            seed=cfg.seed, device="cuda", num_workers=8)
    for epoch in range(E):
        loader.set_epoch(epoch)                               # new offsets/augmentations per epoch
        for batch in loader:                                  # ClipBatch
            batch.clips          # float [B, T, 3, S, S], normalised, on `device`
            batch.labels         # int64 [B] (-1 when unlabelled)
            batch.index          # int64 [B]: the index entries actually read (use for caption lookup)
            batch.frame_indices  # int64 [B, T]: decoded-frame indices used
    loader.bad_files.write(run_dir)                           # bad_files.tsv / .json: path, reason, count

* Determinism: entry ``i`` in epoch ``e`` is read with seed ``sample_seed(seed, e, i)``; the same seed gives
  the same frames and augmentations whatever the worker count. ``read_clip(..., seed=s)`` is the same
  function on one file.
* Bad files: unreadable entries are replaced by a deterministic resample and recorded in
  ``loader.bad_files``; iteration raises :class:`TooManyBadFiles` once more than ``max_bad_fraction``
  (default 5%) of the files are bad. ``VideoIndex(..., skip_missing=True)`` drops missing files and the
  loaders report them.
* Sampling and decoding rules (decoded frame count, uniform segments, verified fast path) are in
  :mod:`rest_fast.data.decode`; augmentations (paper Table 10) in :mod:`rest_fast.data.augment`.
* Rotation: the display-matrix rotation is honoured (90-degree steps) by the PyAV path.
* Prepared shards (:mod:`rest_fast.data.shards`, ``rest-fast prepare``): decode once into WebDataset
  JPEG shards; ``load_index(data)`` gives a ``PreparedIndex`` for a prepared dir and
  ``make_clip_loader(index, ...)`` the matching loader (``ShardClipLoader`` or ``PyAVClipLoader``).
* ``DALIClipLoader`` (``pip install -e .[dali]``) has the same constructor and batches; it needs
  ``nvidia.dali`` (imported lazily) — see :mod:`rest_fast.data.dali`. Which decoder a run uses:
  :func:`rest_fast.data.select.choose_decoder` (``--decoder auto|dali|pyav``, with the reason), then
  ``make_clip_loader(index, decoder=choice.name, device_id=choice.device_id, ...)``.
* Workers: ``num_workers=-1`` = from the CPUs per rank (:mod:`rest_fast.data.workers`), persistent across
  epochs; ``decode_timeout_s`` turns a hung decode into a bad file; GPU runs apply colour jitter batched
  (:func:`rest_fast.data.augment.apply_colour_batch`).
"""

from __future__ import annotations

from rest_fast.data.augment import ClipParams, draw_train_params, eval_params
from rest_fast.data.bad_files import BadFilesReport, TooManyBadFiles
from rest_fast.data.clip import read_clip
from rest_fast.data.decode import VideoDecodeError, count_frames, read_frames, sample_indices
from rest_fast.data.index import VideoIndex, VideoItem
from rest_fast.data.loader import ClipBatch, ClipDataset, PyAVClipLoader, normalize_clips, sample_seed
from rest_fast.data.shards import (
    PreparedIndex,
    ShardClipLoader,
    is_prepared_dir,
    load_index,
    make_clip_loader,
    prepare,
)

__all__ = [
    "VideoIndex",
    "VideoItem",
    "read_clip",
    "read_frames",
    "count_frames",
    "sample_indices",
    "VideoDecodeError",
    "ClipParams",
    "draw_train_params",
    "eval_params",
    "BadFilesReport",
    "TooManyBadFiles",
    "ClipBatch",
    "ClipDataset",
    "PyAVClipLoader",
    "DALIClipLoader",
    "normalize_clips",
    "sample_seed",
    "prepare",
    "PreparedIndex",
    "ShardClipLoader",
    "is_prepared_dir",
    "load_index",
    "make_clip_loader",
]


def __getattr__(name: str):
    if name == "DALIClipLoader":  # nvidia.dali is imported only when this is used
        from rest_fast.data.dali import DALIClipLoader

        return DALIClipLoader
    raise AttributeError(f"module 'rest_fast.data' has no attribute {name!r}")
