"""The one dispatch rule every fused op follows (see :mod:`rest_fast.ops`)."""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

# Why a kernel module could not be imported (Triton missing or unusable), by module name.
KERNEL_IMPORT_ERRORS: dict[str, str] = {}


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


@functools.cache
def load_kernels(name: str) -> ModuleType | None:
    """Import ``rest_fast.kernels.<name>`` once; ``None`` when Triton is unusable (the reason is kept in
    :data:`KERNEL_IMPORT_ERRORS`), so the op falls back to its reference instead of failing at import."""
    try:
        return importlib.import_module(f"rest_fast.kernels.{name}")
    except Exception as e:  # noqa: BLE001 - any import failure means "no Triton path"
        KERNEL_IMPORT_ERRORS[name] = repr(e)
        return None


def kernels_unavailable(name: str) -> RuntimeError:
    return RuntimeError(f"Triton kernels rest_fast.kernels.{name} unavailable: {KERNEL_IMPORT_ERRORS.get(name)}")


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, (n - 1).bit_length())
