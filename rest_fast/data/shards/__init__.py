"""Prepared clip shards: decode each dataset once into WebDataset tar shards of JPEG frames, then read
them on CPU (:class:`ShardClipLoader`) or with DALI (:class:`DALIShardLoader`, nvJPEG on the GPU).
Both read by random access (index -> byte range) in the epoch sampler's order, or stream the shards
sequentially with a shuffle buffer (``stream=True``; DALI's ``fn.readers.webdataset`` for the latter).
Layout and guarantees of ``prepare``: :mod:`rest_fast.data.shards.prepare`; reading rules:
:mod:`rest_fast.data.shards.reader`.

    rest-fast prepare --data splits/k400_train.txt --out /data/k400_prep --frames 32 --short-side 256

    from rest_fast.data.shards import load_index, make_clip_loader
    index = load_index("/data/k400_prep")          # PreparedIndex (a VideoIndex) or, for videos, a VideoIndex
    loader = make_clip_loader(index, batch_size=32, mean=..., std=..., num_frames=8, size=224, train=True)

:func:`load_index` and :func:`make_clip_loader` let callers that take ``--data LIST_OR_DIR`` accept a
prepared directory too: a prepared dir gives the shard reader, anything else the PyAV loader.
"""

from __future__ import annotations

import os
from pathlib import Path

from rest_fast.data.shards.prepare import PrepareResult, encode_video, parse_size, prepare
from rest_fast.data.shards.reader import (
    PreparedIndex,
    ShardClipDataset,
    ShardClipLoader,
    ShardStreamDataset,
    clip_from_sample,
    is_prepared_dir,
    read_prepared_clip,
    read_sample,
)
from rest_fast.errors import UserError

__all__ = [
    "prepare",
    "PrepareResult",
    "encode_video",
    "parse_size",
    "PreparedIndex",
    "is_prepared_dir",
    "read_sample",
    "clip_from_sample",
    "read_prepared_clip",
    "ShardClipDataset",
    "ShardStreamDataset",
    "ShardClipLoader",
    "DALIShardLoader",
    "load_index",
    "make_clip_loader",
    "register_prepared",
    "is_registered_prepared",
    "prepared_index_of",
    "read_clip_any",
]


def load_index(data: str | os.PathLike, data_root: str | os.PathLike | None = None, *, skip_missing: bool = True):
    """The index behind ``--data``: a :class:`PreparedIndex` for a prepared directory, else a
    :class:`rest_fast.data.VideoIndex` (class-folder root, or a list file of ``path [label]`` lines
    relative to ``data_root``, default the list's folder)."""
    from rest_fast.data.index import VideoIndex

    p = Path(data)
    if is_prepared_dir(p):
        return PreparedIndex.load(p)
    if p.is_dir():
        if (p / "manifest.json").is_file() and (p / "settings.json").is_file():
            raise UserError(f"{p}: `rest-fast prepare` did not finish here; run it again to resume")
        return VideoIndex.from_folder(p)
    if p.is_file():
        return VideoIndex.from_list(p, data_root if data_root is not None else str(p.parent),
                                    skip_missing=skip_missing)
    raise FileNotFoundError(f"data={str(data)!r} is neither a prepared directory, a folder of videos nor a list file")


# options only some loaders take: dropped for the others (anything else must be accepted by all four)
_LOADER_SPECIFIC = ("stream", "shuffle_buffer", "colour_on_device", "persistent_workers", "decoder_device",
                    "device_id", "num_threads", "prefetch", "skip_bad")


def make_clip_loader(index, decoder: str = "pyav", **kwargs):
    """The loader for ``index`` and ``decoder`` (``"pyav"``, ``"dali"`` or ``"nvjpeg"``, as resolved by
    :func:`rest_fast.data.select.choose_decoder`): :class:`ShardClipLoader` / :class:`DALIShardLoader` (nvJPEG) /
    :class:`~rest_fast.data.shards.nvjpeg.NvJpegShardLoader` (torchvision nvJPEG) for a :class:`PreparedIndex`,
    :class:`rest_fast.data.PyAVClipLoader` (``pyav``, ``nvjpeg``) / :class:`rest_fast.data.DALIClipLoader` (NVDEC)
    otherwise. All take the same keyword arguments; the
    options in ``_LOADER_SPECIFIC`` are dropped for the loaders that do not have them."""
    import inspect

    if decoder not in ("pyav", "dali", "nvjpeg"):
        raise ValueError("decoder must be 'pyav', 'dali' or 'nvjpeg' here (resolve 'auto' with choose_decoder), "
                         f"got {decoder!r}")
    if isinstance(index, PreparedIndex):
        if decoder == "nvjpeg":
            from rest_fast.data.shards.nvjpeg import NvJpegShardLoader as cls
        else:
            cls = ShardClipLoader if decoder == "pyav" else __getattr__("DALIShardLoader")
    elif decoder == "dali":
        from rest_fast.data.dali import DALIClipLoader as cls
    else:
        from rest_fast.data.loader import PyAVClipLoader as cls
    accepted = inspect.signature(cls.__init__).parameters
    for k in _LOADER_SPECIFIC:
        if k not in accepted:
            kwargs.pop(k, None)
    return cls(index, **kwargs)


_REGISTRY: dict[str, tuple[PreparedIndex, int]] = {}  # source path -> (prepared index, position)


def register_prepared(index: PreparedIndex) -> None:
    """Make :func:`read_clip_any` serve ``index``'s source paths from its shards (in this process and in
    DataLoader workers forked after the call). Used by callers that pass videos around as paths."""
    for k, p in enumerate(index.paths):
        _REGISTRY[p] = (index, k)


def is_registered_prepared(path) -> bool:
    """True when ``path`` is a source path of a prepared index given to :func:`register_prepared`."""
    return str(path) in _REGISTRY


def prepared_index_of(paths, labels=None, class_names=None) -> PreparedIndex | None:
    """A :class:`PreparedIndex` over ``paths`` (in that order, with ``labels``) when every path is a video of
    one registered prepared set (:func:`register_prepared`), else None. Lets code that passes videos around
    as ``(path, label)`` pairs read them from the shards again."""
    hits = [_REGISTRY.get(str(p)) for p in paths]
    if not hits or any(h is None for h in hits) or len({id(h[0]) for h in hits}) != 1:
        return None
    base = hits[0][0]
    return PreparedIndex([str(p) for p in paths], None if labels is None else [int(y) for y in labels],
                         list(class_names) if class_names is not None else base.class_names,
                         entries=[base.entries[k] for _, k in hits], root=base.root, info=base.info)


def read_clip_any(path: str, num_frames: int = 8, *, size: int = 224, train: bool = False, seed: int | None = None,
                  return_indices: bool = False):
    """:func:`rest_fast.data.read_clip` for a video file, or the shard reader for a source path of a
    registered prepared index (:func:`register_prepared`); same output contract."""
    hit = _REGISTRY.get(str(path))
    if hit is None:
        from rest_fast.data.clip import read_clip

        return read_clip(path, num_frames, size=size, train=train, seed=seed, return_indices=return_indices)
    return read_prepared_clip(hit[0], hit[1], num_frames, size=size, train=train, seed=seed,
                              return_indices=return_indices)


def __getattr__(name: str):
    if name == "DALIShardLoader":  # nvidia.dali is imported only when this is used
        from rest_fast.data.shards.dali import DALIShardLoader

        return DALIShardLoader
    raise AttributeError(f"module 'rest_fast.data.shards' has no attribute {name!r}")
