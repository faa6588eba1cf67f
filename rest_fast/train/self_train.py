"""Algorithm 1, self-training: language-model loss on one pseudo-caption sampled per video per step.

Each step takes a batch of clips (with the Table 10 augmentations), samples for every video one of
its K slot captions (``CaptionCache.sample``, uniform, seeded by (seed, epoch, step) so a resumed
epoch draws the same captions), and minimises the captioning loss (Eq. 2, label smoothing 0.2) with
AdamW under a cosine schedule. Under torchrun the loss module is wrapped in DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from rest_fast.run.optim import build_optimizer, build_scheduler, cosine_lambda, derive_seed  # noqa: F401 - re-exported
from rest_fast.train.distributed import DistEnv, all_reduce_mean, autocast


class CaptionLoss(nn.Module):
    """``forward(videos, captions) -> mean loss``: the GARModel loss as a Module, so DDP can wrap it."""

    def __init__(self, model: nn.Module, prompt: str, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.prompt = prompt
        self.label_smoothing = label_smoothing

    def forward(self, videos: torch.Tensor, captions: list[str]) -> torch.Tensor:
        out = self.model.loss(videos, captions, prompt=self.prompt, label_smoothing=self.label_smoothing)
        return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)


def self_train_epoch(loss_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Iterable,
                     cache, *, epoch: int, seed: int, env: DistEnv, amp: bool = True, grad_clip: float = 0.0,
                     log_every: int = 10, on_log: Callable[[dict], None] | None = None,
                     progress: Callable | None = None) -> dict:
    """One epoch over ``batches`` = ``(video_indices int64 [B], clips float [B,T,3,S,S])``; returns epoch stats.

    ``on_log(record)`` receives ``{"step", "loss", "lr"}`` every ``log_every`` steps (loss averaged over
    ranks; every rank takes part in that reduction, only rank 0's callback should write).
    """
    loss_module.train()
    params = [p for p in loss_module.parameters() if p.requires_grad]
    total, count, window, n_window = 0.0, 0, 0.0, 0
    for step, (idx, clips) in enumerate(progress(batches) if progress else batches):
        ids = cache.sample(idx.numpy().astype(np.int64), derive_seed(seed, epoch, step))
        captions = list(cache.texts(np.asarray(ids, dtype=np.int32)))
        with autocast(env.device, amp):
            loss = loss_module(clips.to(env.device, non_blocking=True), captions)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {epoch} step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        total += value
        count += 1
        window += value
        n_window += 1
        if (step + 1) % log_every == 0:
            avg = all_reduce_mean(env, window / n_window)
            if on_log is not None:
                on_log({"step_in_epoch": step + 1, "loss": avg, "lr": optimizer.param_groups[0]["lr"]})
            window, n_window = 0.0, 0
    mean = all_reduce_mean(env, total / max(count, 1))
    return {"loss": mean, "steps": count}
