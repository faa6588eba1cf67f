"""Checks ``rest-fast train`` makes before any work, so a wrong setting is one line and leaves no run folder
(issue 23, item 9)."""

from __future__ import annotations

from rest_fast.errors import UserError
from rest_fast.models.preprocess import check_image_size  # noqa: F401 - the trainer's check, shared with eval

__all__ = ["check_device", "check_image_size", "check_model_paths"]


def check_device(name: str) -> None:
    """Refuse a ``device`` this machine does not have (``cuda:7`` on a machine with 1 GPU, ``cuda`` without CUDA,
    a string that names no device)."""
    import torch

    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UserError(f"device={name!r} but CUDA is not available on this machine (use device=cpu or auto)")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise UserError(f"device={name!r} but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")


def check_model_paths(cfg) -> None:
    """Refuse a ``blip``/``clip`` that is meant as a local folder (``./x``, ``/x``, ``runs/x`` beside ``runs/``)
    but does not exist, before it becomes a hub request (minutes of retries offline)."""
    import os

    from rest_fast.models.source import looks_like_local_path

    for key in ("blip", "clip"):
        name = str(getattr(cfg, key))
        if name in ("tiny", "demo") or os.path.exists(os.path.expanduser(name)):
            continue
        if looks_like_local_path(name):
            raise UserError(f"{key}={name}: no such folder (a local path, not a Hugging Face hub id)")
