"""What a training run and a fine-tuning run share: seeds, the AdamW optimiser and the cosine schedule (Table 10).

Lives below both :mod:`rest_fast.train` and :mod:`rest_fast.eval` so neither imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (stable across runs, platforms and processes)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], *,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; biases, norms and the adapters' scalar gates get no weight decay (decay on them only shrinks them).

    ``fused``: one fused kernel for all parameters (``torch.optim.AdamW(fused=True)``: no per-parameter launches and
    its step counters live on the device, so ``step()`` never syncs). ``None`` (default) = fused when every trainable
    parameter is on CUDA, the foreach path otherwise.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = use_fused_adamw([*decay, *no_decay])
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), fused=bool(fused) or None)


def use_fused_adamw(params) -> bool:
    """Whether :func:`build_optimizer` picks the fused AdamW for ``params`` (all on CUDA, floating point)."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)


def cosine_lambda(total_steps: int, warmup_steps: int, lr: float, lr_min: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine from ``lr`` to ``lr_min`` at ``total_steps``."""
    total_steps = max(1, total_steps)

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t))) / lr

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float, lr_min: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(total_steps, warmup_steps, lr, lr_min))


