"""What the trainer reads: the video index, the two models, and clip batches for each pass.

Three kinds of passes read clips, through the loader ``cfg.decoder`` selects
(:func:`rest_fast.data.select.choose_decoder`: DALI on this rank's GPU, else PyAV or the CPU shard reader in
DataLoader workers; the choice and its reason are logged), all with deterministic per-sample seeds and bad
files replaced and reported. Each pass keeps its loader (and its worker processes) for the whole run:
workers are forked once, not per epoch or per caption round.

* ``eval_batches("clip")`` — un-augmented clips at CLIP's size and normalisation (video features);
* ``eval_batches("blip")`` — un-augmented clips at S with BLIP's normalisation (initial captions and
  each round's generation);
* ``train_batches(epoch)`` — augmented clips (Table 10) for self-training, a permutation seeded by
  (seed, epoch), sharded over ranks with equal counts (DDP needs the same number of steps everywhere).

Eval passes give each rank one contiguous block of videos (``DistEnv.shard``), yielded in order, so
gathering in rank order restores the global order. A video that cannot be decoded is replaced by the
loader's deterministic resample, so it takes that video's features and captions; it is listed in
``bad_files.tsv``/``bad_files.json`` and the run stops when more than ``bad_files_threshold`` of the
files are bad.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rest_fast.models.preprocess import blip_normalisation  # noqa: F401 - re-exported
from rest_fast.run.config import TrainConfig
from rest_fast.train.distributed import DistEnv, all_gather_objects

TINY = "tiny"  # model name of the tiny random-init BLIP / CLIP (demo and tests)
DEMO = "demo"  # model name of the pretrained demo BLIP / CLIP of the synthetic world (rest_fast.synthetic)
DEMO_WORDS = ("moving left right growing shrinking spinning changing colour color shape square disc circle "
              "triangle blue red green yellow").split()


def build_index(data: str, data_root: str | None):
    """A ``VideoIndex`` from a folder (class sub-folders → labels; loose videos unlabelled) or a list file
    (``path [label]`` lines).

    Missing files of a list are dropped and reported as bad files (they count toward the threshold).
    """
    from rest_fast.data.index import VideoIndex
    from rest_fast.data.shards import PreparedIndex, is_prepared_dir, register_prepared

    p = Path(data)
    if is_prepared_dir(p):  # `rest-fast prepare` output: clips come from its JPEG shards
        index = PreparedIndex.load(p)
        register_prepared(index)
        return index
    if p.is_dir():
        return VideoIndex.from_folder(p)
    if p.is_file():
        root = data_root if data_root is not None else str(p.parent)
        return VideoIndex.from_list(p, root, skip_missing=True)
    if os.path.lexists(p):  # a FIFO, a device, a dangling link: say what it is, not that it is missing
        from rest_fast.data.index import entry_problem
        from rest_fast.errors import UserError

        raise UserError(f"data={data} is {entry_problem(p)}: expected a folder of videos, a list file or a "
                        "prepared folder")
    raise FileNotFoundError(f"data={data} does not exist (expected a folder of videos or a list file)")


def ensure_tiny_blip(save_dir: Path, cfg: TrainConfig, env: DistEnv) -> Path:
    """Write the tiny random BLIP (seeded by ``cfg.seed``) to ``save_dir`` once (rank 0)."""
    from rest_fast.train.distributed import barrier

    if env.is_main and not (save_dir / "config.json").exists():
        from rest_fast.models.tiny import tiny_blip

        tmp = save_dir.with_name(save_dir.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tiny_blip(tmp, seed=cfg.seed, vocab=DEMO_WORDS, image_size=cfg.image_size)
        os.replace(tmp, save_dir)
    barrier(env)
    return save_dir


def load_models(blip_source: str, clip_source: str, cfg: TrainConfig, env: DistEnv):
    """(GARModel on ``env.device`` in fp32, FrozenCLIP on ``env.device``)."""
    from rest_fast.clip import FrozenCLIP, pretrained_for, tiny_clip
    from rest_fast.models import GARModel
    from rest_fast.train.distributed import precision

    prec = precision(env.device, cfg.precision)
    try:
        model = GARModel.from_pretrained(blip_source, num_frames=cfg.num_frames,
                                         adapter_layers=cfg.adapter_layers_value())
    except OSError as exc:  # transformers' "couldn't connect ... nor find them in the cached files", a bad folder
        raise _model_error("BLIP", blip_source, exc) from None
    model.autocast = prec.autocast  # amp=false: fp32 on CUDA too
    model.autocast_dtype = prec.autocast_dtype  # precision=fp16: cards without bf16
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(env.device)
    vis = model.blip.config.vision_config
    from rest_fast.train.preflight import check_image_size

    check_image_size(cfg.image_size, int(vis.patch_size), int(vis.image_size))
    if cfg.image_size != vis.image_size and env.is_main:
        print(f"note: image_size={cfg.image_size} differs from the captioner's {vis.image_size}; BLIP's ViT "
              "position embeddings are interpolated to the frame size", flush=True)
    if clip_source == DEMO:
        from rest_fast.synthetic.models import demo_clip

        clip = demo_clip(device=env.device, batch_size=cfg.eval_batch_size)
    elif clip_source == TINY:
        size = cfg.image_size if cfg.image_size % 8 == 0 else 32
        clip = tiny_clip(seed=cfg.seed, image_size=size, device=env.device, batch_size=cfg.eval_batch_size,
                         dtype=prec.clip_dtype)
    else:
        try:
            clip = FrozenCLIP(clip_source, pretrained=pretrained_for(clip_source, cfg.clip_pretrained),
                              device=env.device, batch_size=cfg.eval_batch_size, dtype=prec.clip_dtype)
        except OSError as exc:
            raise _model_error("CLIP", clip_source, exc) from None
    return model, clip


def _model_error(what: str, source: str, exc: OSError):
    """A model that cannot be loaded: a local folder that is not a model, or a hub id offline / unknown."""
    from rest_fast.errors import UserError, one_line

    if os.path.isdir(source):
        return UserError(f"cannot load {what} from {source}: {one_line(exc)}")
    return UserError(f"cannot download {what} {source!r} (offline, or not a Hugging Face id, and not in the local "
                     "cache): pass a local folder")


class Inputs:
    """Clip batches for every pass of the trainer, and per-video metadata (paths, labels, class names)."""

    def __init__(self, index, cfg: TrainConfig, env: DistEnv, *, blip_source: str, clip) -> None:
        from rest_fast.data.bad_files import BadFilesReport

        self.index = index
        self.cfg = cfg
        self.env = env
        self.paths = list(index.paths)
        self.labels = list(index.labels) if index.labels is not None else None
        names = index.class_names
        if self.labels is not None and not names:
            names = [str(i) for i in range(max(self.labels, default=-1) + 1)]
        self.class_names = list(names) if names else None
        common = os.path.commonpath([os.path.abspath(p) for p in self.paths]) if self.paths else ""
        self._root = common if os.path.isdir(common) else os.path.dirname(common)
        self.blip_mean, self.blip_std = blip_normalisation(blip_source)
        self.clip_mean, self.clip_std = clip.mean, clip.std
        self.clip_size = int(clip.image_size[0])
        if clip.image_size[0] != clip.image_size[1]:
            raise ValueError(f"CLIP image_size must be square, got {clip.image_size}")
        self.bad_files = BadFilesReport()
        for p in index.missing:  # a prepared dir lists the videos prepare could not decode, with why
            self.bad_files.add(p, getattr(index, "bad_reasons", {}).get(p, "missing file"))
        from rest_fast.data.select import choose_decoder
        from rest_fast.data.shards import PreparedIndex
        from rest_fast.data.workers import resolve_num_workers

        # auto probes the videos before it picks NVDEC (a prepared dir is JPEG frames: nvJPEG takes any)
        self.decoder = choose_decoder(cfg.decoder, env.device,
                                      videos=None if isinstance(index, PreparedIndex) else self.paths)
        self.num_workers = resolve_num_workers(cfg.num_workers)
        if env.is_main:
            print(f"decoder: {self.decoder.name} ({self.decoder.reason}); {self.num_workers} worker process(es) "
                  f"per rank, prefetch {cfg.prefetch_factor}, decode timeout "
                  f"{f'{cfg.decode_timeout_s:g} s' if cfg.decode_timeout_s else 'off'}", flush=True)
        self._loaders: dict[str, object] = {}  # pass kind -> its loader (persistent workers)
        self._absorbed: dict[tuple[str, str], int] = {}  # (pass kind, path) -> count already absorbed

    def __len__(self) -> int:
        return len(self.paths)

    def rel(self, i: int) -> str:
        """Path of video ``i`` relative to the common folder of all videos (for reports)."""
        return os.path.relpath(os.path.abspath(self.paths[i]), self._root) if self._root else self.paths[i]

    def _loader(self, key: str, index, *, train: bool, size: int, mean, std, batch_size: int,
                shuffle: bool = False, rank: int = 0, world_size: int = 1):
        """The loader of pass ``key``, built on first use and kept (its workers persist across passes)."""
        if key in self._loaders:
            return self._loaders[key]
        from rest_fast.data.shards import make_clip_loader  # prepared dir or videos, DALI or CPU

        cfg = self.cfg
        loader = make_clip_loader(index, decoder=self.decoder.name, batch_size=batch_size, mean=mean, std=std,
                                  num_frames=cfg.num_frames, size=size, train=train, seed=cfg.seed,
                                  device=self.env.device, num_workers=self.num_workers, shuffle=shuffle,
                                  drop_last=False, max_bad_fraction=cfg.bad_files_threshold, rank=rank,
                                  world_size=world_size, prefetch_factor=cfg.prefetch_factor,
                                  decode_timeout_s=cfg.decode_timeout_s, device_id=self.decoder.device_id,
                                  prefetch=min(cfg.prefetch_factor, 4))
        self._loaders[key] = loader
        return loader

    def _absorb(self, key: str, loader) -> None:
        """Add what ``loader`` recorded since the last call (a kept loader's report keeps growing)."""
        for path, reason, count in loader.bad_files.rows():
            if path in self.index.missing:
                continue
            seen = self._absorbed.get((key, path), 0)
            if count > seen:
                self.bad_files.add(path, reason, count - seen)
                self._absorbed[(key, path)] = count

    def eval_batches(self, kind: str, start: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's block of videos in order, un-augmented: ``(global indices int64 [B], clips [B,T,3,S,S])``.

        ``kind``: ``"clip"`` (CLIP's size and normalisation) or ``"blip"`` (S, BLIP's normalisation).
        ``start``: begin at this global video of the block (a resumed round 0; a one-off loader), not its first.
        """
        if kind not in ("clip", "blip"):
            raise ValueError(f"kind must be 'clip' or 'blip', got {kind!r}")
        mine = self.env.shard(len(self.paths))
        if len(mine) == 0:
            return
        lo, hi = int(mine[0]), int(mine[-1]) + 1
        key = kind
        if start is not None and start > lo:
            lo, key = min(int(start), hi), f"{kind}@{start}"
            if lo == hi:
                return
        sub = self.index[lo:hi]
        size, mean, std = ((self.clip_size, self.clip_mean, self.clip_std) if kind == "clip"
                           else (self.cfg.image_size, self.blip_mean, self.blip_std))
        loader = self._loader(key, sub, train=False, size=size, mean=mean, std=std,
                              batch_size=self.cfg.eval_batch_size)
        pos = lo
        try:
            for batch in loader:
                b = batch.clips.shape[0]
                # rows are in entry order; a bad entry's row holds its replacement (see the module doc)
                yield torch.arange(pos, pos + b, dtype=torch.int64), batch.clips
                pos += b
        finally:
            self._absorb(key, loader)
            if key != kind:  # the one-off loader of a resumed pass: its workers end with it
                self._loaders.pop(key, None)

    def eval_steps(self) -> int:
        """Batches this rank's :meth:`eval_batches` yields (for progress bars)."""
        return -(-len(self.env.shard(len(self.paths))) // self.cfg.eval_batch_size)

    def steps_per_epoch(self) -> int:
        per_rank = -(-len(self.paths) // self.env.world_size)
        return -(-per_rank // self.per_rank_batch())

    def per_rank_batch(self) -> int:
        """Clips per optimiser step on this rank."""
        return max(1, self.cfg.batch_size // self.env.world_size)

    def micro_batch(self) -> int:
        """Clips per loader batch: the rank's step batch over ``accum_steps`` (gradient accumulation)."""
        return max(1, self.per_rank_batch() // self.cfg.accum_steps)

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Augmented self-training micro-batches of epoch ``epoch``: ``(video indices int64 [b], clips [b,T,3,S,S])``,
        ``accum_steps`` of them per optimiser step; from optimiser step ``start_step`` on (a mid-epoch resume).

        The indices are the entries actually read (a bad entry's replacement), so the captions sampled for
        them belong to the clip shown.
        """
        from rest_fast.data.loader import _EpochSampler

        loader = self._loader("train", self.index, train=self.cfg.augment, size=self.cfg.image_size, mean=self.blip_mean,
                              std=self.blip_std, batch_size=self.micro_batch(), shuffle=True, rank=self.env.rank,
                              world_size=self.env.world_size)
        loader.set_epoch(epoch)
        skip = start_step * self.cfg.accum_steps  # micro-batches already trained on
        sampler = getattr(loader, "sampler", None)
        if skip and isinstance(sampler, _EpochSampler):  # start the epoch's order there: nothing is decoded twice
            sampler.start, skip = start_step * self.per_rank_batch(), 0
        try:
            for k, batch in enumerate(loader):
                if k >= skip:  # a loader with its own order (streamed shards): read past the trained part
                    yield batch.index, batch.clips
        finally:
            if isinstance(sampler, _EpochSampler):
                sampler.start = 0
            self._absorb("train", loader)

    def frame_strip(self, i: int, size: int = 96) -> np.ndarray:
        """uint8 [T, size, size, 3]: the un-augmented frames of video ``i`` (for the report)."""
        from rest_fast.data.shards import read_clip_any

        return read_clip_any(self.paths[i], self.cfg.num_frames, size=size).numpy()

    def write_bad_files(self, run_dir: str | Path) -> None:
        """Write ``bad_files.tsv``/``.json`` with every rank's records (all ranks call this; rank 0 writes)."""
        from rest_fast.data.bad_files import BadFilesReport

        parts = all_gather_objects(self.env, self.bad_files.rows())
        if not self.env.is_main:
            return
        merged = BadFilesReport()
        for r, rows in enumerate(parts):
            for path, reason, count in rows:
                # missing files are known to every rank: count them once
                if r == 0 or path not in self.index.missing:
                    merged.add(path, reason, count)
        merged.write(run_dir)
