"""Resolve ``--checkpoint RUN_OR_DIR`` to a captioner (and, for a trainer run, the run's CLIP and settings).

Accepted, in the order they are tried:

1. a run directory written by ``rest-fast train`` (``config.yaml`` + ``checkpoints/``): the checkpoint that
   ``state.json`` names (the newest complete epoch), else the newest complete ``checkpoints/epoch_XXXX``;
2. one ``RUN/checkpoints/epoch_XXXX`` folder of such a run (an older epoch);
3. a directory holding a saved model under ``model/`` (what ``rest-fast finetune --out`` writes);
4. a folder written by ``rest-fast export`` (``rest_fast_export.json``): a saved model that carries the run's
   decoding defaults, so it captions as the run did without the run folder;
5. a directory written by :meth:`GARModel.save_pretrained` or HF ``save_pretrained`` (``config.json``);
6. anything else that is not an existing path: a Hugging Face hub id (``Salesforce/blip-image-captioning-base``).

For a trainer run the model is rebuilt exactly as the trainer built it (same BLIP source — the run's own tiny
BLIP for the demo —, ``num_frames``, adapter layers) and the checkpoint's weights are loaded strictly. The run's
settings become the defaults of evaluation: frame count and size, the prompt the model was trained with, the
beam-search settings, and the CLIP the run used (for CLIP-TAM with ``--matcher clip``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rest_fast.errors import UserError

__all__ = ["ResolvedCheckpoint", "resolve_checkpoint", "load_model", "load_clip", "DEFAULT_BLIP", "CheckpointError"]

DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
TINY = "tiny"  # the trainer's name for its random-init demo models


class CheckpointError(ValueError):
    """``--checkpoint`` cannot be resolved or loaded; the message says what was tried."""


@dataclass
class ResolvedCheckpoint:
    """Where the captioner comes from, before anything heavy is loaded.

    Attributes:
        spec: what the user passed.
        kind: ``"run"`` (a trainer run, maybe at an older epoch), ``"pretrained"`` (a save_pretrained
            directory) or ``"hub"`` (a hub id).
        blip_source: what :meth:`GARModel.from_pretrained` loads (directory or hub id).
        weights: the trainer checkpoint's ``model.safetensors`` loaded over it (runs only).
        run_dir: the trainer run (runs only); ``config``: its resolved ``config.yaml`` as a dict.
        defaults: evaluation defaults taken from the run (``num_frames``, ``image_size``, ``prompt``,
            ``num_beams``, ``max_length``, ``min_length``); empty for other kinds.
        data: the labelled set the run trained on (its ``data`` or the demo's clips), if any.
    """

    spec: str
    kind: str
    blip_source: str
    weights: Path | None = None
    run_dir: Path | None = None
    config: dict | None = None
    defaults: dict = field(default_factory=dict)
    data: str | None = None
    data_root: str | None = None
    note: str | None = None

    @property
    def epoch(self) -> int | None:
        """The trainer epoch of a run checkpoint (from its ``meta.json``), else None."""
        if self.kind != "run" or self.weights is None:
            return None
        try:
            return int(json.loads((self.weights.parent / "meta.json").read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def description(self) -> str:
        if self.kind == "run":
            return f"run {self.run_dir} ({self.weights.parent.name})"
        return f"{self.kind} {self.blip_source}"


def _run_config(root: Path) -> dict:
    import yaml

    cfg = yaml.safe_load((root / "config.yaml").read_text())
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{root / 'config.yaml'} is not a mapping of config keys")
    return cfg


def _is_run_dir(p: Path) -> bool:
    return (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def _run_checkpoint(root: Path) -> tuple[Path, str | None]:
    """(the checkpoint ``state.json`` names, else the newest complete one; a note when an unusable newer
    one was skipped). Each candidate's checksums are checked: bit-flipped weights are never evaluated."""
    from rest_fast.run.rundir import RunDir, verify_checkpoint

    run = RunDir(root, writable=False)
    try:
        state = run.read_state() or {}
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    skipped: list[str] = []
    if state.get("checkpoint"):
        try:
            ckpt = run.inside(state["checkpoint"], "state.json 'checkpoint'")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, None
        skipped.append(problem)
    best, more = run.newest_intact_checkpoint()
    skipped += [m for m in more if m not in skipped]
    if best is None:
        if skipped:
            raise CheckpointError(f"run {root} has no intact checkpoint ({'; '.join(skipped)})")
        raise CheckpointError(
            f"run {root} has no complete checkpoint yet (checkpoints/epoch_XXXX is written after each epoch)")
    note = None
    if skipped:
        note = f"skipped: {'; '.join(skipped)}"
        warnings.warn(f"run {root}: latest checkpoint unusable ({'; '.join(skipped)}); using {best.name}",
                      stacklevel=3)
    return best, note


def _from_run(spec: str, root: Path, ckpt: Path, note: str | None = None) -> ResolvedCheckpoint:
    cfg = _run_config(root)
    from rest_fast.eval.model_source import captioner_source

    # 'tiny' (written into the run), 'demo' (packaged), a local folder or a cached hub id: no network
    blip = captioner_source(str(cfg.get("blip", DEFAULT_BLIP)), run_dir=root)
    defaults = {
        "num_frames": int(cfg.get("num_frames", 8)),
        "image_size": int(cfg.get("image_size", 224)),
        "prompt": cfg.get("train_prompt", "a video of"),
        "num_beams": int(cfg.get("num_beams", 3)),
        "max_length": int(cfg.get("max_length", 20)),
        "min_length": int(cfg.get("min_length", 5)),
    }
    data, data_root = cfg.get("data"), cfg.get("data_root")
    if data is None and (root / "demo" / "clips").is_dir():
        data = str(root / "demo" / "clips")
    return ResolvedCheckpoint(spec, "run", blip, ckpt / "model.safetensors", root, cfg, defaults, data, data_root, note)


def _export_defaults(p: Path) -> dict | None:
    """The run's decoding defaults recorded in a ``rest-fast export`` folder, or None when ``p`` is not one."""
    from rest_fast.eval.export import read_export_marker

    marker = read_export_marker(p)
    if marker is None or not (p / "config.json").is_file():
        return None
    defaults = marker.get("defaults")
    return dict(defaults) if isinstance(defaults, dict) else {}


def _export_run_name(p: Path) -> str:
    from rest_fast.eval.export import read_export_marker

    marker = read_export_marker(p) or {}
    return f"{marker.get('run')} (epoch {marker.get('epoch')})"


def resolve_checkpoint(spec: str | os.PathLike) -> ResolvedCheckpoint:
    """Work out what ``spec`` names (see the module docstring); nothing is loaded yet."""
    if spec is None or not str(spec).strip():
        raise CheckpointError("--checkpoint is empty")
    spec = os.fspath(spec)
    p = Path(spec).expanduser()
    if p.is_dir():
        if _is_run_dir(p):
            ckpt, note = _run_checkpoint(p)
            return _from_run(spec, p, ckpt, note)
        if (p / "meta.json").is_file() and p.parent.name == "checkpoints" and _is_run_dir(p.parent.parent):
            from rest_fast.run.rundir import verify_checkpoint

            problem = verify_checkpoint(p)
            if problem is not None:  # the user named this epoch: never swap in another one
                raise CheckpointError(f"--checkpoint {spec}: {problem}")
            return _from_run(spec, p.parent.parent, p)
        if (p / "model" / "config.json").is_file():
            return ResolvedCheckpoint(spec, "pretrained", str(p / "model"))
        exported = _export_defaults(p)
        if exported is not None:
            return ResolvedCheckpoint(spec, "pretrained", str(p), defaults=exported,
                                      note=f"exported by rest-fast export from run {_export_run_name(p)}")
        if (p / "config.json").is_file():
            return ResolvedCheckpoint(spec, "pretrained", str(p))
        raise CheckpointError(
            f"--checkpoint {spec}: a directory, but neither a `rest-fast train` run (config.yaml + checkpoints/), "
            "a checkpoints/epoch_XXXX folder, nor a save_pretrained model (config.json)"
        )
    if p.exists():
        raise CheckpointError(f"--checkpoint {spec}: a file; pass a run directory, a model directory or a hub id")
    from rest_fast.eval.model_source import DEMO, captioner_source, looks_like_local_path

    if looks_like_local_path(spec):  # `runs/nope` beside `runs/`: a mistyped run folder, not a hub id
        raise CheckpointError(f"--checkpoint {spec}: no such directory (a local path, not a Hugging Face hub id)")
    if spec == TINY:
        captioner_source(spec)  # raises: 'tiny' lives inside a run folder
    if spec == DEMO:  # the packaged pretrained demo BLIP (fresh adapters)
        return ResolvedCheckpoint(spec, "pretrained", captioner_source(spec))
    return ResolvedCheckpoint(spec, "hub", captioner_source(spec))


def load_model(resolved: ResolvedCheckpoint, device: torch.device | str = "cpu", num_frames: int | None = None):
    """The :class:`~rest_fast.models.GARModel` of ``resolved``, in eval mode on ``device``.

    ``num_frames`` overrides the frame count the adapters are built for (the adapters work for any T).
    """
    from rest_fast.models import GARModel

    if resolved.kind == "run":
        from rest_fast.run.config import TrainConfig

        cfg = TrainConfig(**{k: v for k, v in resolved.config.items() if k in TrainConfig.__dataclass_fields__})
        try:
            model = GARModel.from_pretrained(resolved.blip_source, num_frames=cfg.num_frames,
                                             adapter_layers=cfg.adapter_layers_value())
        except OSError as exc:
            raise CheckpointError(
                f"run {resolved.run_dir} was trained from BLIP {resolved.blip_source!r}, which could not be loaded "
                f"({exc}); it is needed to rebuild the model before the run's weights are loaded"
            ) from exc
        state = _load_verified_weights(resolved.weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{resolved.weights} does not fit the model of run {resolved.run_dir}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    else:
        try:
            # A plain BLIP gets freshly initialised adapters: seed them, so the same command gives the same captions.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = GARModel.from_pretrained(resolved.blip_source)
        except OSError as exc:
            hint = (
                " (it is a hub id: the weights must be in the local Hugging Face cache or downloadable; "
                "offline, pass --checkpoint with a run directory or a saved model directory)"
                if resolved.kind == "hub" else ""
            )
            raise CheckpointError(f"could not load captioner {resolved.blip_source!r}{hint}: {exc}") from exc
    if num_frames is not None and num_frames != model.num_frames:
        model.num_frames = int(num_frames)
    model.to(torch.device(device))
    model.eval()
    return model


def _load_verified_weights(path: Path) -> dict:
    """The tensors of a trainer checkpoint's ``model.safetensors``, after checking its SHA-256 against
    ``meta.json`` (checked again here: the file may have changed since it was resolved)."""
    from safetensors.torch import load

    from rest_fast.run.rundir import CheckpointCorrupt, checksum_map, sha256_bytes

    data = Path(path).read_bytes()
    meta_path = Path(path).parent / "meta.json"
    try:
        sums = checksum_map(meta_path.parent, json.loads(meta_path.read_text()))
    except (OSError, ValueError) as exc:
        if isinstance(exc, CheckpointCorrupt):
            raise CheckpointError(str(exc)) from None
        if isinstance(exc, UserError):  # checksums of other files: planted
            raise
        raise CheckpointError(f"{meta_path} is unreadable") from None
    if sha256_bytes(data) != sums["model.safetensors"]:
        raise CheckpointError(f"{path} does not match its checksum in meta.json (corrupted or altered)")
    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def image_size_of(model) -> int:
    """Frame size the captioner's ViT was built for."""
    return int(model.blip.config.vision_config.image_size)


def pixel_normalisation(resolved: ResolvedCheckpoint) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """BLIP's pixel mean/std for this checkpoint (the same rule the trainer uses)."""
    from rest_fast.models.preprocess import blip_normalisation

    return blip_normalisation(resolved.blip_source)


def load_clip(resolved: ResolvedCheckpoint | None, name: str | None = None, device: torch.device | str = "cpu",
              pretrained: str | None = None, batch_size: int = 64):
    """The CLIP used by ``--matcher clip``.

    ``name`` (``--clip``) wins; ``"tiny"`` is the random demo CLIP. Otherwise a trainer run's own CLIP, rebuilt
    as the trainer built it (for the demo: the tiny CLIP with the run's seed and size); otherwise ``ViT-B-16``
    with OpenAI weights (the paper's CLIP-TAM).
    """
    from rest_fast.clip import FrozenCLIP, pretrained_for, tiny_clip

    cfg = resolved.config if resolved is not None and resolved.kind == "run" else None
    if name is None and cfg is not None:
        name = cfg.get("clip", "ViT-B-16")
        if name == "demo":  # the packaged pretrained demo CLIP, as the trainer loads it
            from rest_fast.synthetic.models import demo_clip

            return demo_clip(device=device, batch_size=batch_size)
        if name == TINY:
            # Same construction as the trainer's (rest_fast.train.inputs.load_models), so the text tower matches.
            size = int(cfg.get("image_size", 32))
            size = size if size % 8 == 0 else 32
            return tiny_clip(seed=int(cfg.get("seed", 0)), image_size=size, device=device, batch_size=batch_size)
        if pretrained is None:
            pretrained = cfg.get("clip_pretrained")
    if name is None:
        name = "ViT-B-16"
    if name == TINY:
        return tiny_clip(device=device, batch_size=batch_size)
    if name == "demo":
        from rest_fast.synthetic.models import demo_clip

        return demo_clip(device=device, batch_size=batch_size)
    try:
        # a run's clip_pretrained (default "openai") is for open_clip names only
        return FrozenCLIP(name, pretrained=pretrained_for(name, pretrained), device=device, batch_size=batch_size)
    except (OSError, RuntimeError, ValueError) as exc:  # hub errors subclass these; a bad name is a ValueError
        raise CheckpointError(
            f"could not load CLIP {name!r} for CLIP-TAM ({type(exc).__name__}: {exc}); offline, pass "
            "--matcher sentence-transformers (packaged MiniLM) or --clip with a local model"
        ) from exc


def describe(resolved: ResolvedCheckpoint) -> dict:
    """JSON-ready summary of where the model came from (recorded in results)."""
    out = {"checkpoint": resolved.spec, "kind": resolved.kind, "blip": resolved.blip_source}
    if resolved.kind == "run":
        out["run_dir"] = str(resolved.run_dir)
        out["weights"] = str(resolved.weights)
        meta = resolved.weights.parent / "meta.json"
        if meta.is_file():
            out["epoch"] = json.loads(meta.read_text()).get("epoch")
    return out
