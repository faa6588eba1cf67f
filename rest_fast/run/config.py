"""The trainer's configuration: ONE dataclass, the single source of truth.

:class:`TrainConfig` holds every setting of a REST run with the paper's defaults (Table 10). The same
fields are read from a YAML file (``--config``), from ``key=value`` overrides, from kebab-case flags
(``--num-frames 8``), and are listed with their documentation by ``rest-fast train --help``: nothing
is declared twice. Precedence, lowest first: dataclass defaults → the demo preset (only when no
``--data`` is given) → the YAML file → flags and ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rest_fast.errors import UserError
from rest_fast.run.precision import amp_of, check_config_precision, reconcile_amp


class ConfigError(UserError):
    """A config value, key or file the user gave is wrong (one line from the CLI, exit code 2)."""


def _f(default: Any, doc: str, *, group: str = "", runtime: bool = False) -> Any:
    """A dataclass field with its documentation. ``runtime`` fields may change when a run resumes."""
    meta = {"help": doc, "group": group, "runtime": runtime}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """REST self-training (Algorithm 1). Defaults are the paper's (Table 10)."""

    # --- data and models -------------------------------------------------------------------
    data: str | None = _f(
        None,
        "videos to train on: a list file (lines 'relative/path [label]') or a folder (class sub-folders "
        "give labels). None runs the built-in demo on synthetic clips.",
        group="data",
    )
    data_root: str | None = _f(None, "root that the paths of a list file are relative to (default: the list's folder)", group="data")
    blip: str = _f("Salesforce/blip-image-captioning-base", "BLIP captioner: an HF hub id or a local directory", group="models")
    clip: str = _f("ViT-B-16", "frozen CLIP for retrieval: an open_clip model name, HF CLIP id or local directory", group="models")
    clip_pretrained: str | None = _f("openai", "open_clip pretrained tag (ignored for HF ids and directories)", group="models")
    adapter_layers: str = _f("all", "ViT layers that get a temporal adapter: 'all', 'none' or a comma list like '0,5,11'", group="models")
    out: str = _f("runs/rest", "run directory: config, checkpoints, captions, metrics, plots, report", group="run", runtime=True)

    # --- video input -------------------------------------------------------------------------
    num_frames: int = _f(8, "T: frames sampled uniformly per clip", group="data")
    image_size: int = _f(224, "S: frame size fed to the captioner (CLIP frames are resized to CLIP's own size)", group="data")
    augment: bool = _f(True, "Table 10 augmentations while self-training (flip, multi-scale crop, colour jitter, grayscale)", group="data")
    num_workers: int = _f(-1, "decoding worker processes per rank (-1 = from the CPUs: CPUs available / local ranks - 1; never more than the CPUs available; 0 = in the main process)", group="data", runtime=True)
    decoder: str = _f("auto", "video decoding: 'auto' (DALI on the GPU when a CUDA device and DALI are present, else the CPU path), 'dali' or 'pyav'", group="data", runtime=True)
    prefetch_factor: int = _f(2, "batches each decoding worker prepares ahead (DataLoader prefetch_factor: num_workers x this batches wait in shared memory); DALI keeps min(this, 4) batches in flight", group="data", runtime=True)
    decode_timeout_s: float = _f(60.0, "a clip whose decoding takes longer than this is a bad file (recorded, replaced) instead of stalling the rank; 0 = no limit", group="data", runtime=True)
    bad_files_threshold: float = _f(0.05, "stop with an error when more than this fraction of the videos cannot be decoded (checked after indexing and after the features pass)", group="data", runtime=True)

    # --- Algorithm 1 -------------------------------------------------------------------------
    prompts: list[str] = _f(
        ["a video of", "a person is", "someone is"],
        "prompts for the initial per-frame BLIP captions (T x P captions per video)",
        group="rest",
    )
    train_prompt: str = _f("a video of", "prompt the captioner is trained and decoded with", group="rest")
    num_neighbours: int = _f(2000, "H: nearest videos (by CLIP video feature, self excluded) whose captions are candidates; capped at N-1", group="rest")
    neighbours_include_self: bool = _f(False, "Ω_i holds video i itself plus its H-1 nearest others (H counts it); num_neighbours=1 with this is the paper's 'self-training only' ablation (each video's own captions)", group="rest")
    k: int = _f(3, "K: pseudo-captions kept per video", group="rest")
    epochs_per_round: int = _f(10, "R: self-training epochs between two caption rounds", group="rest")
    epochs: int = _f(60, "total self-training epochs (rounds = epochs / R)", group="rest")
    final_caption_round: bool = _f(False, "also caption the videos after the final epoch (a round whose captions are never trained on; off saves one captioning pass - evaluate with `rest-fast eval`)", group="rest", runtime=True)

    # --- optimisation ------------------------------------------------------------------------
    batch_size: int = _f(64, "global batch size (split over the processes)", group="optim")
    accum_steps: int = _f(1, "micro-batches per optimiser step (gradient accumulation); batch_size stays the global batch", group="optim", runtime=True)
    lr: float = _f(2e-5, "peak learning rate (cosine schedule)", group="optim")
    lr_min: float = _f(2e-8, "final learning rate of the cosine schedule", group="optim")
    warmup_steps: int = _f(0, "linear warm-up steps before the cosine decay", group="optim")
    weight_decay: float = _f(1e-3, "AdamW weight decay", group="optim")
    betas: list[float] = _f([0.9, 0.98], "AdamW betas", group="optim")
    label_smoothing: float = _f(0.2, "label smoothing of the captioning loss", group="optim")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0 = off)", group="optim")
    grad_checkpointing: bool = _f(False, "activation checkpointing of the ViT layers (adapters inside the checkpointed call): less memory, ~1/3 more compute", group="optim", runtime=True)

    # --- caption generation ------------------------------------------------------------------
    num_beams: int = _f(3, "beam width for captioning", group="generate")
    max_length: int = _f(20, "maximum caption length in tokens (the prompt's tokens count, as in HF)", group="generate")
    min_length: int = _f(5, "minimum caption length in tokens", group="generate")
    eval_batch_size: int = _f(64, "batch size for captioning, CLIP features and text embedding", group="generate", runtime=True)

    # --- run -----------------------------------------------------------------------------------
    seed: int = _f(0, "seed: caption sampling, shuffling, augmentation draws and dropout derive from it", group="run")
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N' (torchrun uses LOCAL_RANK)", group="run", runtime=True)
    amp: bool = _f(True, "bf16 autocast on CUDA (false: fp32 model and CLIP weights on CUDA too)", group="run", runtime=True)
    precision: str = _f("bf16", "bf16 | fp16 | fp32 on CUDA (fp16 adds a gradient scaler); amp is its alias: true = bf16, false = fp32", group="run", runtime=True)
    nccl_timeout: float = _f(3600.0, "seconds a collective may wait under torchrun before the run fails (covers rank-0 round work)", group="run", runtime=True)
    threads: int = _f(0, "CPU intra-op threads per process (0 = torch's default)", group="run", runtime=True)
    log_every: int = _f(10, "steps between loss records in metrics.jsonl", group="run", runtime=True)
    log_to: list[str] = _f([], "live dashboards fed with the metrics.jsonl records (rank 0): 'tensorboard' (RUN/tensorboard/), 'wandb' (WANDB_MODE=offline works offline); optional extras rest_fast[tensorboard], rest_fast[wandb]", group="run", runtime=True)
    keep_checkpoints: int = _f(2, "epoch checkpoints kept on disk (the newest ones)", group="run", runtime=True)
    save_every_minutes: float = _f(30.0, "also checkpoint mid-epoch after this many minutes of training (the newest one is kept; resume continues from the next micro-batch); 0 = only at epoch ends", group="run", runtime=True)
    report_videos: int = _f(24, "videos shown in report.html", group="run", runtime=True)
    progress: bool = _f(True, "tqdm progress bars", group="run", runtime=True)

    # --- built-in demo (used only when data is None) -------------------------------------------
    demo_videos_per_class: int = _f(5, "demo: synthetic clips per action class", group="demo")
    demo_frames: int = _f(16, "demo: frames per synthetic clip", group="demo")
    demo_resolution: int = _f(48, "demo: width and height of the synthetic clips", group="demo")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    @property
    def is_demo(self) -> bool:
        return self.data is None

    @property
    def num_rounds(self) -> int:
        """Caption rounds after the initial one: one every R epochs, the last one may be shorter."""
        return -(-self.epochs // self.epochs_per_round)

    @property
    def caption_rounds(self) -> int:
        """Caption rounds this run generates: :attr:`num_rounds`, less the one after the final epoch unless
        ``final_caption_round`` (the last round always ends at ``epochs``; nothing trains on its captions)."""
        return self.num_rounds if self.final_caption_round else self.num_rounds - 1

    def round_end_epoch(self, r: int) -> int:
        """Epoch count after which round ``r`` (1-based) generates its captions."""
        return min(r * self.epochs_per_round, self.epochs)

    def adapter_layers_value(self) -> str | list[int]:
        """``adapter_layers`` as GARModel takes it: 'all', [] or a list of layer indices."""
        v = self.adapter_layers.strip().lower()
        if v == "all":
            return "all"
        if v in ("none", ""):
            return []
        try:
            layers = [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"adapter_layers: expected 'all', 'none' or a comma list of ints, got {self.adapter_layers!r}") from None
        if any(i < 0 for i in layers):
            raise ConfigError(f"adapter_layers: layer indices must be >= 0, got {self.adapter_layers!r}")
        return layers

    def validate(self) -> None:
        """Check ranges; raise :class:`ConfigError` (a ``ValueError``) naming the field."""
        validate_config(self)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> TrainConfig:
        return apply_overrides(self, changes)


def validate_config(cfg: TrainConfig, *, check_paths: bool = False) -> TrainConfig:
    """Check every value of ``cfg``; raise :class:`ConfigError` naming the field. Returns ``cfg``.

    Numbers must be finite (``nan``/``inf`` parse from YAML and ``key=value`` and would otherwise train on
    silently). With ``check_paths`` (at resolve time, before a run folder is made) also: ``data`` and
    ``data_root`` exist, ``out`` is not a file.
    """
    def bad(msg: str) -> ConfigError:
        return ConfigError(msg)

    for name in ("lr", "lr_min", "weight_decay", "grad_clip", "label_smoothing", "bad_files_threshold"):
        v = getattr(cfg, name)
        if not math.isfinite(v):
            raise bad(f"{name} must be a finite number, got {v}")
    if not all(math.isfinite(b) for b in cfg.betas):
        raise bad(f"betas must be finite numbers, got {cfg.betas}")
    positive = ("num_frames", "image_size", "num_neighbours", "k", "epochs_per_round", "epochs", "batch_size",
                "num_beams", "max_length", "eval_batch_size", "log_every", "keep_checkpoints",
                "demo_videos_per_class", "demo_frames", "demo_resolution")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise bad(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "report_videos", "min_length", "threads"):
        if getattr(cfg, name) < 0:
            raise bad(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.num_workers < -1:
        raise bad(f"num_workers must be >= 0, or -1 for the default from the CPUs; got {cfg.num_workers}")
    if cfg.prefetch_factor < 1:
        raise bad(f"prefetch_factor must be >= 1, got {cfg.prefetch_factor}")
    if not math.isfinite(cfg.decode_timeout_s) or cfg.decode_timeout_s < 0:
        raise bad(f"decode_timeout_s must be >= 0 (0 = no limit), got {cfg.decode_timeout_s}")
    # the names of rest_fast.data.select.DECODERS (not imported: this module stays torch-free)
    if str(cfg.decoder).strip().lower() not in ("auto", "dali", "pyav", "nvjpeg"):
        raise bad(f"decoder must be one of auto, dali, pyav, nvjpeg; got {cfg.decoder!r}")
    if not 0 < cfg.lr:
        raise bad(f"lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.lr_min <= cfg.lr:
        raise bad(f"lr_min must be in [0, lr], got {cfg.lr_min}")
    if not 0 <= cfg.label_smoothing < 1:
        raise bad(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 <= cfg.bad_files_threshold <= 1:
        raise bad(f"bad_files_threshold must be in [0, 1], got {cfg.bad_files_threshold}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise bad(f"betas must be two numbers in [0, 1), got {cfg.betas}")
    if not cfg.prompts:
        raise bad("prompts must hold at least one prompt")
    if cfg.min_length > cfg.max_length:
        raise bad(f"min_length ({cfg.min_length}) must be <= max_length ({cfg.max_length})")
    if cfg.weight_decay < 0:
        raise bad(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.grad_clip < 0:
        raise bad(f"grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    cfg.adapter_layers_value()
    from rest_fast.run.sinks import parse_log_to  # names only: nothing is imported for a sink here

    parse_log_to(cfg.log_to)
    if cfg.accum_steps < 1:
        raise bad(f"accum_steps must be >= 1, got {cfg.accum_steps}")
    if not math.isfinite(cfg.save_every_minutes) or cfg.save_every_minutes < 0:
        raise bad(f"save_every_minutes must be >= 0 (0 = only at epoch ends), got {cfg.save_every_minutes}")
    try:  # a config built directly (TrainConfig(amp=False)): amp and precision made to agree
        cfg.precision = check_config_precision(cfg.amp, cfg.precision)
    except ValueError as exc:
        raise bad(str(exc)) from None
    cfg.amp = amp_of(cfg.precision)
    if check_paths:
        if cfg.data is not None and not os.path.exists(cfg.data):
            raise bad(f"data={cfg.data} does not exist")
        if cfg.data_root is not None and not os.path.isdir(cfg.data_root):
            raise bad(f"data_root={cfg.data_root} is not a folder")
        if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise bad(f"out={cfg.out} is a file, not a folder")
    return cfg


# The demo preset: REST on the synthetic action world (rest_fast.synthetic) with the pretrained demo BLIP and
# CLIP, 96 unlabelled clips of 4 frames at 32x32, initial captions + 3 rounds of 16 epochs; ~31 s of CPU time (one thread).
# Applied under the YAML file and the overrides, so any of these can still be changed (`blip=tiny clip=tiny`
# gives the old random-init fixture run, whose captions mean nothing).
DEMO_PRESET: dict[str, Any] = {
    "blip": "demo",
    "clip": "demo",
    "clip_pretrained": None,
    "num_frames": 4,
    "image_size": 32,
    "num_workers": 0,
    # tiny models: a parallel region costs more than it saves (measured 60x slower per linear on a busy
    # 2-core machine with 2 threads), so the demo computes on one thread
    "threads": 1,
    # the demo BLIP was pretrained with this one prompt (other prompts would only add noise)
    "prompts": ["a video of"],
    # the world's captions name colours: colour jitter and grayscale would contradict them
    "augment": False,
    "num_neighbours": 16,
    # K=1: the demo CLIP's second and third choices are mostly wrong (measured: final accuracy 72.9% with K=3,
    # 79.2% with K=1; same pseudo-caption accuracy, 80.2%)
    "k": 1,
    "epochs_per_round": 16,
    "epochs": 48,
    "batch_size": 8,
    "lr": 2e-3,
    "lr_min": 1e-5,
    "label_smoothing": 0.1,
    "num_beams": 2,
    "max_length": 16,
    "min_length": 3,
    "eval_batch_size": 64,
    "log_every": 2,
    "report_videos": 16,
    # the demo has no eval step: its last round shows the final captions and their CLIP-TAM accuracy
    "final_caption_round": True,
    "out": "runs/demo",
    "demo_videos_per_class": 12,
    "demo_frames": 4,
    "demo_resolution": 32,
}


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the field's type, naming the key on error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value) if value.strip() else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            raise ValueError(f"{name}: expected a string, got None")
        return str(value)
    if origin is list:
        (item,) = args
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return [_coerce(name, v, item) for v in value]
    raise TypeError(f"{name}: unsupported field type {tp}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new config with ``overrides`` applied (keys may use '-' or '_'); unknown keys raise ``ValueError``."""
    types_ = _field_types()
    values = cfg.to_dict()
    for raw_key, value in overrides.items():
        key = raw_key.replace("-", "_")
        if key not in types_:
            close = [f for f in types_ if key in f or f in key]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {raw_key!r}{hint}; see `rest-fast train --help`")
        try:
            values[key] = _coerce(key, value, types_[key])
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
    try:  # `amp` is `precision`'s alias: the key this layer gives decides the other one
        reconcile_amp(values, {k.replace("-", "_") for k in overrides})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return TrainConfig(**values)


def repeated_keys(items: list[str]) -> list[str]:
    """Notes for the ``key=value`` overrides given more than once (the last one wins, as on most command lines:
    a job script may append to a shared line), e.g. ``epochs given twice (2, then 3): 3 is used``."""
    values: dict[str, list[str]] = {}
    for item in items:
        if "=" in item:
            k, v = item.split("=", 1)
            values.setdefault(k.strip().replace("-", "_"), []).append(v)
    return [f"{k} given {len(v)} times ({', then '.join(v)}): the last, {v[-1]}, is used"
            for k, v in values.items() if len(v) > 1]


def parse_key_values(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x y"]`` → ``{"a": "1", "b": "x y"}``; a malformed item raises ``ValueError``; a key given
    twice keeps its last value (see :func:`repeated_keys`)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ConfigError(f"empty key in {item!r}")
        out[k.strip()] = v
    return out


# A config is a few KB; refuse anything larger before reading it (`--config /dev/zero` would read forever).
MAX_CONFIG_BYTES = 4 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_config_text(p: Path, path: str | Path, what: str) -> str:
    """The text of config file ``p`` when it holds at most :data:`MAX_CONFIG_BYTES`, else a ConfigError: a large
    file is refused from its size, a stream (``<(...)``, ``/dev/zero``) after that many bytes at most."""
    too_big = ConfigError(f"{what} {path} holds more than {MAX_CONFIG_BYTES >> 20} MB: not a config file")
    if p.is_file() and p.stat().st_size > MAX_CONFIG_BYTES:
        raise too_big
    with open(p, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise too_big
    return data.decode("utf-8")


def load_yaml(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """The mapping in a YAML config file; every way it can be wrong is a one-line :class:`ConfigError`
    (also: a key given twice, a file that is not a regular file or larger than :data:`MAX_CONFIG_BYTES`)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a YAML file")
    if not p.exists():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.load(_read_config_text(p, path, what), Loader=_UniqueKeyLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{what} {path}: {exc}") if "appears twice" in str(exc) else exc from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1}: {exc.problem})" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_run_config(path: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` a run saved (``RUN/config.yaml``). A key this version does not know (a config
    written by another version) is a one-line :class:`ConfigError` naming it; keys it lacks take defaults."""
    data = load_yaml(path, what="run config")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{path} holds config keys this version does not know: {', '.join(unknown)} (written by "
                          "another version of rest_fast? remove them from the file, or use that version)")
    try:
        return apply_overrides(TrainConfig(), data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_config(*, yaml_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults → demo preset (when no data is set anywhere) → YAML → overrides."""
    layers: list[dict[str, Any]] = []
    if yaml_file is not None:
        layers.append(load_yaml(yaml_file))
    layers.append(dict(overrides or {}))
    data_given = any(layer.get("data") is not None for layer in layers)
    cfg = TrainConfig()
    if not data_given:
        cfg = apply_overrides(cfg, DEMO_PRESET)
    for layer in layers:
        cfg = apply_overrides(cfg, layer)
    return validate_config(cfg, check_paths=True)


def runtime_keys() -> list[str]:
    """Keys a resumed run may change (plus ``epochs``, which may grow to extend a finished run)."""
    return [f.name for f in config_fields() if f.metadata.get("runtime")] + ["epochs"]


def resume_config(saved: TrainConfig, *, yaml_file: str | Path | None = None,
                  overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of a resumed run: the run's saved config, then the YAML file and overrides given with
    ``--resume`` — which may only change runtime keys (and ``epochs``). No demo preset is applied: the run
    already says what it is. A given key that would change the run's identity raises ``ValueError``
    naming each such key with both values, and the keys that may change."""
    layers: list[dict[str, Any]] = []
    if yaml_file is not None:
        layers.append(load_yaml(yaml_file))
    layers.append(dict(overrides or {}))
    cfg = saved
    for layer in layers:
        cfg = apply_overrides(cfg, layer)
    if cfg.epochs < saved.epochs:  # the learning-rate schedule spans the run's epochs: they may only grow
        raise ConfigError(f"epochs={cfg.epochs} is fewer than the run's {saved.epochs}: on --resume epochs may only "
                          "grow (to train further); start a new run with another --out for a shorter one")
    changed = identity_differences(saved, cfg)
    if changed:
        raise ValueError(
            "these keys define the run and cannot change on --resume:\n  " + "\n  ".join(changed)
            + "\n(keys that may change: " + ", ".join(runtime_keys())
            + "; start a new run with another --out to change the others)")
    return cfg


def identity_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Non-runtime fields that differ: a run cannot resume under a config that changes these."""
    out = []
    for f in config_fields():
        if f.metadata.get("runtime") or f.name == "epochs":
            continue  # `epochs` may grow to extend a finished run
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append(f"{f.name}: {va!r} (run) != {vb!r} (now)")
    return out


def help_text() -> str:
    """Every key with its type, default and documentation, grouped — the body of ``--help``."""
    types_ = _field_types()
    lines = ["config keys (YAML, key=value, or --kebab-case-flag):"]
    group = None
    for f in config_fields():
        g = f.metadata.get("group", "")
        if g != group:
            group = g
            lines.append(f"\n  [{g}]")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = str(types_[f.name]).replace("typing.", "")
        tp = tp if not isinstance(types_[f.name], type) else types_[f.name].__name__
        demo = f"  (demo: {DEMO_PRESET[f.name]!r})" if f.name in DEMO_PRESET else ""
        lines.append(f"  {f.name}={default!r}  <{tp}>{demo}")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
