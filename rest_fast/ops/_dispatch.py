"""The one dispatch rule every fused op follows (see :mod:`rest_fast.ops`)."""

from __future__ import annotations

import os

import torch


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run (interpreted) on CPU tensors.

    Read at call time so a test can switch a single call to the reference path. Triton itself reads
    the variable when a kernel module is imported, so set it before importing :mod:`rest_fast.kernels`.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path serves these tensors: CUDA always, CPU only under the interpreter."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    if devices == {"cpu"}:
        return triton_interpret()
    return False
