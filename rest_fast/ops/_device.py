"""Launch every Triton kernel on its tensors' GPU.

A Triton launch runs on the *current* CUDA device (and its current stream), not on the device its tensors live on:
with inputs on ``cuda:1`` while ``cuda:0`` is current (``--device cuda:1``, ``eval --device cuda:1``, a benchmark
picking a GPU) the launch faults or fails, and the op would silently fall back to its reference. Each launcher
therefore runs under ``torch.cuda.device(<its first tensor's device>)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(t.device)`` for a CUDA tensor (makes it current for the block), else a no-op."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_input_device(fn: F) -> F:
    """Decorate a Triton launcher so that its kernels launch on the device of its first (tensor) argument."""

    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with launch_device(first):
            return fn(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
