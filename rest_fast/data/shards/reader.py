"""CPU reader of prepared shards: random access by video id and shuffled sequential streaming.

Same contract as :class:`rest_fast.data.PyAVClipLoader` (``ClipBatch``: float [B, T, 3, S, S] normalised
on the target device, labels, entries, frame indices), with the *stored* frames standing in for the
decoded ones:

* eval: the centres of T uniform segments over the M stored frames; train: a random offset inside each
  segment, then the Table-10 augmentations, drawn from ``np.random.default_rng(sample_seed(seed, epoch,
  i))`` in the same order as :func:`rest_fast.data.read_clip` (offsets, then parameters) — so results
  do not depend on workers, batch size or order;
* ``frame_indices`` are *source* frame indices (decoded-frame numbers of the original video), taken
  from the sample's json; for a video with N <= F frames every frame is stored and the indices equal
  the direct path's exactly;
* crops are drawn in stored-frame pixels (the shorter side was resized to ``short_side``), then the
  crop is resized to S with PIL's bilinear filter (antialiased when reducing, like the torch reference
  :func:`rest_fast.data.augment.apply`); flip, jitter and grayscale are
  :func:`rest_fast.data.augment.apply_colour`, the same code as the PyAV path.

Random access (:class:`ShardClipDataset`) reads one sample's byte range from the index with
``os.pread`` and parses its tar headers in memory; only the T selected JPEGs are decoded.
Streaming (:class:`ShardStreamDataset`, ``ShardClipLoader(stream=True)``) reads shards front to back in
a (seed, epoch)-shuffled shard order through a seeded shuffle buffer.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rest_fast.data import augment
from rest_fast.data.bad_files import BadFilesReport
from rest_fast.data.clip import clip_rng
from rest_fast.data.decode import VideoDecodeError, draw_offsets, sample_indices
from rest_fast.data.index import VideoIndex
from rest_fast.data.loader import (
    ClipBatch,
    _collate,
    _EpochSampler,
    _LoaderBase,
    finish_batch,
    loader_kwargs,
    sample_seed,
)
from rest_fast.data.workers import DecodeTimeout, ResamplingDataset, resolve_num_workers
from rest_fast.errors import UserError

from .prepare import FORMAT

__all__ = ["PreparedIndex", "is_prepared_dir", "read_sample", "clip_from_sample", "read_prepared_clip",
           "ShardClipDataset", "ShardStreamDataset", "ShardClipLoader"]


def is_prepared_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory that a *finished* ``rest-fast prepare`` wrote."""
    p = Path(path)
    marker = p / "prepared.json"
    if not (p.is_dir() and marker.is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _is_shard_name(name) -> bool:
    """A plain ``*.tar`` file name (no folder part, no ``..``): what prepare writes."""
    return (isinstance(name, str) and name.endswith(".tar") and os.path.basename(name) == name
            and "\\" not in name and not name.startswith("."))


@dataclass
class PreparedIndex(VideoIndex):
    """A :class:`VideoIndex` over a prepared directory: ``paths``/``labels``/``class_names`` of the stored
    videos (source paths), ``missing`` = the videos prepare could not decode (``bad_reasons`` says why),
    plus ``entries`` (one dict per video: shard, byte ``offset``/``size``, ``key``, ``id`` = position in
    the prepared list, ``frames`` M, ``num_decoded`` N, ``height``/``width``) and ``root``."""

    entries: list[dict] = field(default_factory=list)
    root: str = ""
    info: dict = field(default_factory=dict)
    bad_reasons: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if len(self.entries) != len(self.paths):
            raise ValueError(f"entries has {len(self.entries)} items but paths has {len(self.paths)}")

    @classmethod
    def load(cls, root: str | os.PathLike) -> PreparedIndex:
        root = Path(root)
        if not is_prepared_dir(root):
            if (root / "manifest.json").is_file():
                raise UserError(f"{root}: `rest-fast prepare` did not finish here; run it again to resume")
            raise FileNotFoundError(f"{root} is not a prepared directory (no prepared.json)")
        info = json.loads((root / "prepared.json").read_text())
        with open(root / "index.jsonl", encoding="utf-8") as f:
            entries = [json.loads(line) for line in f if line.strip()]
        # shard names are joined to the folder: a hand-edited or planted index must not point outside it
        for name in [e.get("shard") for e in entries] + list(info.get("shards") or []):
            if not _is_shard_name(name):
                raise UserError(f"{root}/index.jsonl: shard {name!r} is not a file name inside {root}")
        bad: dict[str, str] = {}
        bf = root / "bad_files.json"
        if bf.is_file():
            bad = {r["path"]: r["reason"] for r in json.loads(bf.read_text())}
        labels = [e["label"] for e in entries] if info.get("labelled") else None
        return cls([e["path"] for e in entries], labels, info.get("class_names"), list(bad), entries=entries,
                   root=str(root), info=info, bad_reasons=bad)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PreparedIndex(self.paths[i], None if self.labels is None else self.labels[i], self.class_names,
                                 entries=self.entries[i], root=self.root, info=self.info)
        return super().__getitem__(i)

    def position(self, video: int | str) -> int:
        """Position in this index of a video given by its prepared ``id`` (int), ``key`` or source path."""
        if not hasattr(self, "_lookup"):
            lk: dict = {}
            for k, e in enumerate(self.entries):
                lk[("id", e["id"])] = k
                lk[("key", e["key"])] = k
                lk[("path", e["path"])] = k
            self._lookup = lk
        kind = "id" if isinstance(video, (int, np.integer)) else ("key" if ("key", video) in self._lookup else "path")
        try:
            return self._lookup[(kind, int(video) if kind == "id" else video)]
        except KeyError:
            raise KeyError(f"video {video!r} is not in this prepared index") from None

    def __repr__(self) -> str:
        return f"PreparedIndex({len(self)} clips from {self.root}, {len(self.missing)} bad)"


# -------------------------------------------------------------------------------------------- samples
class _Files:
    """Open shard file descriptors, one set per process (DataLoader workers open their own)."""

    def __init__(self):
        self.pid, self.fds = os.getpid(), {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():  # forked: do not share offsets or descriptors with the parent
            self.pid, self.fds = os.getpid(), {}
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise VideoDecodeError(path, f"shard is shorter than the index says ({offset}+{size})")
        return data


_FILES = _Files()


def parse_sample(buf: bytes, where: str = "sample") -> tuple[list[bytes], dict]:
    """Split one sample's tar bytes into (JPEGs in stored order, json dict)."""
    jpegs: dict[int, bytes] = {}
    meta = None
    mv = memoryview(buf)
    p = 0
    while p + 512 <= len(buf):
        if not any(buf[p:p + 512]):
            break
        try:
            info = tarfile.TarInfo.frombuf(buf[p:p + 512], "utf-8", "surrogateescape")
        except tarfile.TarError as e:
            raise VideoDecodeError(where, f"bad tar header in shard: {e}") from None
        data = mv[p + 512:p + 512 + info.size]
        name = info.name
        if name.endswith(".json"):
            meta = json.loads(bytes(data))
        elif name.endswith(".jpg"):
            jpegs[int(name.rsplit(".", 2)[1])] = data
        p += 512 + 512 * math.ceil(info.size / 512)
    if meta is None or not jpegs or sorted(jpegs) != list(range(len(jpegs))):
        raise VideoDecodeError(where, "incomplete sample in shard (json or frames missing)")
    return [jpegs[k] for k in range(len(jpegs))], meta


def read_sample(index: PreparedIndex, i: int) -> tuple[list[bytes], dict]:
    """(JPEG bytes of the stored frames, the sample json) of entry ``i`` of ``index`` (random access)."""
    e = index.entries[i]
    path = os.path.join(index.root, e["shard"])
    return parse_sample(_FILES.read(path, int(e["offset"]), int(e["size"])), f"{path}:{e['key']}")


def clip_from_sample(jpegs: Sequence[bytes], meta: dict, num_frames: int = 8, *, size: int = 224,
                     train: bool = False, seed: int | None = None, colour: bool = True):
    """uint8 [T, size, size, 3] and the T source frame indices from one stored sample (module doc).

    ``colour=False`` stops after crop + resize and returns ``(clip, indices, params)``: the caller applies
    ``augment.apply_colour(clip, params)`` later (the loaders do it on the GPU, where it is cheap)."""
    from PIL import Image

    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    rng = clip_rng(seed) if train else None
    offsets = draw_offsets(num_frames, rng) if train else None
    sel = sample_indices(len(jpegs), num_frames, train=train, offsets=offsets)
    h, w = int(meta["height"]), int(meta["width"])
    params = augment.draw_train_params(rng, h, w) if train else augment.eval_params(h, w)
    x, y, cw, ch = params.crop
    done: dict[int, np.ndarray] = {}
    for k in sel:
        if k in done:
            continue
        im = Image.open(io.BytesIO(jpegs[k]))
        if im.size != (w, h):
            raise VideoDecodeError(meta.get("path", "?"), f"stored frame {k} is {im.size}, json says {(w, h)}")
        if im.mode != "RGB":
            im = im.convert("RGB")
        if (cw, ch) == (size, size):
            im = im.crop((x, y, x + cw, y + ch))
        else:
            im = im.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
        done[k] = np.asarray(im)
    clip = torch.from_numpy(np.stack([done[k] for k in sel]))
    src = [int(meta["frame_indices"][k]) for k in sel]
    if not colour:
        return clip, src, params
    return augment.apply_colour(clip, params), src


def read_prepared_clip(index: PreparedIndex | str | os.PathLike, video: int | str, num_frames: int = 8, *,
                       size: int = 224, train: bool = False, seed: int | None = None,
                       return_indices: bool = False):
    """The prepared twin of :func:`rest_fast.data.read_clip`: uint8 [T, size, size, 3] of one video
    given by position (int) in ``index``, prepared ``key`` or source path."""
    if not isinstance(index, PreparedIndex):
        index = PreparedIndex.load(index)
    i = video if isinstance(video, (int, np.integer)) else index.position(video)
    jpegs, meta = read_sample(index, int(i))
    clip, idx = clip_from_sample(jpegs, meta, num_frames, size=size, train=train, seed=seed)
    return (clip, idx) if return_indices else clip


def _item(jpegs, meta, j: int, label, num_frames: int, size: int, train: bool, seed: int, epoch: int,
          defer_colour: bool = False) -> dict:
    clip, idx, params = clip_from_sample(jpegs, meta, num_frames, size=size, train=train,
                                         seed=sample_seed(seed, epoch, j), colour=False)
    if not defer_colour:
        clip, params = augment.apply_colour(clip, params), None
    return {"clip": clip, "label": -1 if label is None else label, "index": j,
            "frame_indices": torch.tensor(idx, dtype=torch.int64), "bad": [], "params": params}


_collate_params = _collate  # the shared collate keeps each item's params (None when colour was applied)


# what reading a prepared sample can raise: a damaged shard (OSError), a torn tar member or json (ValueError)
PREPARED_READ_ERRORS = (VideoDecodeError, OSError, ValueError)


def prepared_bad_reason(index: PreparedIndex, j: int, e: BaseException, timeout_s: float) -> tuple[str, str]:
    """``(source path, reason)`` recorded for entry ``j`` of a prepared set that could not be read."""
    if isinstance(e, DecodeTimeout):
        return index.paths[j], f"reading took longer than decode_timeout_s={timeout_s:g}"
    return index.paths[j], f"prepared sample unreadable: {e}"


class ShardClipDataset(ResamplingDataset):
    """Map-style dataset over a :class:`PreparedIndex`; items keyed by ``(epoch, entry)`` like
    :class:`rest_fast.data.ClipDataset`. A sample that cannot be read (damaged shard) is replaced by the
    same deterministic resample as the PyAV loader and reported with the item."""

    def __init__(self, index: PreparedIndex, *, num_frames: int = 8, size: int = 224, train: bool = False,
                 seed: int = 0, max_retries: int = 10, defer_colour: bool = False, decode_timeout_s: float = 0.0):
        if len(index) == 0:
            raise ValueError("index is empty")
        self.index, self.num_frames, self.size, self.train = index, num_frames, size, train
        self.seed, self.max_retries, self.defer_colour = seed, max_retries, defer_colour
        self.decode_timeout_s = decode_timeout_s

    read_errors = PREPARED_READ_ERRORS

    def read_entry(self, j: int, epoch: int) -> dict:
        jpegs, meta = read_sample(self.index, j)
        return _item(jpegs, meta, j, self.index[j].label, self.num_frames, self.size, self.train, self.seed, epoch,
                     self.defer_colour)

    def describe_bad(self, j: int, e: BaseException) -> tuple[str, str]:
        return prepared_bad_reason(self.index, j, e, self.decode_timeout_s)


class ShardStreamDataset(IterableDataset):
    """Sequential, shuffled reading for training: shards in a (seed, epoch)-seeded order, this rank's
    contiguous block of that sample order (equal counts on every rank, padded by wrapping), split by
    shard runs over DataLoader workers, read front to back, through a seeded shuffle buffer of
    ``buffer`` samples. Each sample's frames and augmentations depend only on (seed, epoch, entry)."""

    def __init__(self, index: PreparedIndex, *, num_frames: int = 8, size: int = 224, train: bool = True,
                 seed: int = 0, buffer: int = 256, rank: int = 0, world_size: int = 1, defer_colour: bool = False):
        if len(index) == 0:
            raise ValueError("index is empty")
        self.index, self.num_frames, self.size, self.train = index, num_frames, size, train
        self.defer_colour = defer_colour
        self.seed, self.buffer, self.rank, self.world_size = seed, max(1, buffer), rank, world_size
        # shared with persistent DataLoader workers (forked once): set_epoch in the main process reaches them
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = int(value)

    def __len__(self) -> int:
        return math.ceil(len(self.index) / self.world_size)

    def runs(self) -> list[list[int]]:
        """This rank's entries as runs of consecutive samples of one shard, in reading order."""
        by_shard: dict[str, list[int]] = {}
        for k, e in enumerate(self.index.entries):
            by_shard.setdefault(e["shard"], []).append(k)
        names = sorted(by_shard)
        g = np.random.default_rng([self.seed, self.epoch, 11])
        order = [names[k] for k in g.permutation(len(names))]
        flat = [k for n in order for k in sorted(by_shard[n], key=lambda k: self.index.entries[k]["offset"])]
        per = len(self)
        flat = (flat * math.ceil(per * self.world_size / len(flat)))[:per * self.world_size]
        mine = flat[self.rank * per:(self.rank + 1) * per]
        runs: list[list[int]] = []
        for k in mine:
            if runs and self.index.entries[runs[-1][-1]]["shard"] == self.index.entries[k]["shard"] \
                    and self.index.entries[k]["offset"] > self.index.entries[runs[-1][-1]]["offset"]:
                runs[-1].append(k)
            else:
                runs.append([k])
        return runs

    def __iter__(self):
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        runs = self.runs()[wid::nw]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid, 13])
        buf: list[dict] = []
        for run in runs:
            e0, e1 = self.index.entries[run[0]], self.index.entries[run[-1]]
            path = os.path.join(self.index.root, e0["shard"])
            with open(path, "rb") as f:  # one sequential read per run
                f.seek(int(e0["offset"]))
                block = f.read(int(e1["offset"]) + int(e1["size"]) - int(e0["offset"]))
            for k in run:
                e = self.index.entries[k]
                a = int(e["offset"]) - int(e0["offset"])
                try:
                    jpegs, meta = parse_sample(block[a:a + int(e["size"])], f"{path}:{e['key']}")
                    it = _item(jpegs, meta, k, self.index[k].label, self.num_frames, self.size, self.train,
                               self.seed, self.epoch, self.defer_colour)
                except (VideoDecodeError, ValueError) as err:
                    it = None
                    bad = [(self.index.paths[k], f"prepared sample unreadable: {err}")]
                if it is None:  # report it with the next good item
                    if buf:
                        buf[-1]["bad"].extend(bad)
                    continue
                buf.append(it)
                if len(buf) >= self.buffer:
                    yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))


def prepared_loader_index(index, batch_size: int, mean: Sequence[float], std: Sequence[float]) -> PreparedIndex:
    """The arguments every prepared-shard loader (CPU, DALI, nvJPEG) checks alike: ``index`` loaded when given as a
    folder, ``batch_size >= 1``, 3-entry ``mean``/``std`` with ``std > 0``. Returns the index."""
    if not isinstance(index, PreparedIndex):
        index = PreparedIndex.load(index)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std must have 3 entries (std > 0), got {mean!r}, {std!r}")
    return index


class ShardClipLoader(_LoaderBase):
    """Batches from a prepared directory, with the constructor and batches of
    :class:`rest_fast.data.PyAVClipLoader` (``index`` may be a :class:`PreparedIndex` or its directory).

    ``stream=True`` (training) reads shards sequentially (:class:`ShardStreamDataset`, ``shuffle_buffer``
    samples); otherwise entries are read by random access in the sampler's order (eval passes, caption
    generation, feature extraction). ``method`` is accepted for drop-in use and ignored (no video
    decoding happens here). The videos prepare could not decode are in ``bad_files`` from the start and
    count toward ``max_bad_fraction``, like missing files in the PyAV loader. ``colour_on_device``
    (default: when ``device`` is CUDA) leaves flip/jitter/grayscale to the main process on ``device``
    (the same :func:`~rest_fast.data.augment.apply_colour`; on a GPU it costs almost nothing, on CPU
    workers it is most of a train clip's cost); it runs batched (:func:`~rest_fast.data.augment.apply_colour_batch`).
    Workers persist across epochs (``persistent_workers``; the stream's epoch reaches them through shared
    memory) and ``decode_timeout_s`` turns a sample read that hangs into a bad file.
    """

    def __init__(self, index: PreparedIndex | str | os.PathLike, *, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], num_frames: int = 8, size: int = 224, train: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", num_workers: int = 2, shuffle: bool | None = None,
                 drop_last: bool | None = None, max_bad_fraction: float = 0.05, rank: int = 0, world_size: int = 1,
                 prefetch_factor: int = 2, max_retries: int = 10, method: str = "auto",
                 dtype: torch.dtype = torch.float32, stream: bool = False, shuffle_buffer: int = 256,
                 colour_on_device: bool | None = None, persistent_workers: bool = True,
                 decode_timeout_s: float = 0.0):
        index = prepared_loader_index(index, batch_size, mean, std)
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.index, self.mean, self.std = index, tuple(mean), tuple(std)
        self.device, self.dtype = torch.device(device), dtype
        self.max_bad_fraction = max_bad_fraction
        self.bad_files = BadFilesReport()
        for p in index.missing:
            self.bad_files.add(p, index.bad_reasons.get(p, "missing file"))
        self.stream = stream
        self.defer = self.device.type == "cuda" if colour_on_device is None else bool(colour_on_device)
        num_workers = resolve_num_workers(num_workers)
        kw = loader_kwargs(num_workers, prefetch_factor, persistent_workers)
        pin = self.device.type == "cuda"
        if stream:
            self.dataset = ShardStreamDataset(index, num_frames=num_frames, size=size, train=train, seed=seed,
                                              buffer=shuffle_buffer, rank=rank, world_size=world_size,
                                              defer_colour=self.defer)
            self.sampler = self.dataset  # has .epoch, like the sampler
            self._loader = DataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers,
                                      collate_fn=_collate_params, drop_last=train if drop_last is None else drop_last,
                                      pin_memory=pin, **kw)
        else:
            self.dataset = ShardClipDataset(index, num_frames=num_frames, size=size, train=train, seed=seed,
                                            max_retries=max_retries, defer_colour=self.defer,
                                            decode_timeout_s=decode_timeout_s)
            self.sampler = _EpochSampler(len(index), shuffle=train if shuffle is None else shuffle, seed=seed,
                                         rank=rank, world_size=world_size)
            self._loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler,
                                      num_workers=num_workers, collate_fn=_collate_params,
                                      drop_last=train if drop_last is None else drop_last, pin_memory=pin, **kw)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        self._check_bad()
        for b in self._loader:
            for path, reason in b["bad"]:
                self.bad_files.add(path, reason)
            self._check_bad()
            clips = finish_batch(b["clips"], b["params"], self.device, self.mean, self.std, self.dtype)
            yield ClipBatch(clips, b["labels"].to(self.device), b["index"], b["frame_indices"])
