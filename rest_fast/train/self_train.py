"""Algorithm 1, self-training: language-model loss on one pseudo-caption sampled per video per step.

Each step takes a batch of clips (with the Table 10 augmentations), samples for every video one of
its K slot captions (``CaptionCache.sample``, uniform, seeded by (seed, epoch, step) so a resumed
epoch draws the same captions), and minimises the captioning loss (Eq. 2, label smoothing 0.2) with
AdamW under a cosine schedule. Under torchrun the loss module is wrapped in DDP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from rest_fast.run.optim import build_optimizer, build_scheduler, cosine_lambda, derive_seed  # noqa: F401 - re-exported
from rest_fast.train.distributed import DistEnv, all_reduce_sum, autocast
from rest_fast.train.throughput import LoaderMeter, device_memory_gb


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


def _to_host(t: torch.Tensor) -> list[float]:
    """The one place the training loop reads device values on the host (a sync on CUDA): every ``log_every`` steps
    and at the end of the epoch. Kept as a function so tests can count the calls."""
    return t.detach().to("cpu").tolist()


def _check_window(window: torch.Tensor, env: DistEnv, *, epoch: int, step: int) -> tuple[float, float]:
    """All-reduce ``[loss sum, steps, ...]`` of a window (every rank takes part) and read it: ``(mean loss, steps)``.

    Raises ``FloatingPointError`` when the window's loss is not finite (on every rank alike, since it is the
    reduced value): the check runs here, every ``log_every`` steps, instead of a sync before every ``backward``.
    """
    mean, count, _ = _read_window(window, env, epoch=epoch, step=step)
    return mean, count


def _read_window(window: torch.Tensor, env: DistEnv, *, epoch: int, step: int) -> tuple[float, float, float | None]:
    """:func:`_check_window`, also returning the rank-mean of ``window[2]`` (the grad norm of the window's last
    step: DDP's gradients are the same on every rank, so the mean is that norm; None when not finite). One
    host read."""
    reduced = all_reduce_sum(env, window)
    total, count, *rest = _to_host(reduced)
    if not math.isfinite(total):
        raise FloatingPointError(f"non-finite loss ({total}) in the steps up to epoch {epoch} step {step}")
    norm = rest[0] / max(env.world_size, 1) if rest else float("nan")
    return total / max(count, 1.0), count, (norm if math.isfinite(norm) else None)


def self_train_epoch(loss_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Iterable,
                     cache, *, epoch: int, seed: int, env: DistEnv, amp: bool = True, grad_clip: float = 0.0,
                     log_every: int = 10, on_log: Callable[[dict], None] | None = None,
                     progress: Callable | None = None) -> dict:
    """One epoch over ``batches`` = ``(video_indices int64 [B], clips float [B,T,3,S,S])``; returns epoch stats.

    ``on_log(record)`` receives ``{"step_in_epoch", "loss", "lr", "grad_norm", "clips_per_second",
    "data_wait_fraction"}`` (+ ``gpu_memory_gb`` on CUDA) every ``log_every`` steps (loss averaged over ranks and
    the window's steps; ``grad_norm``: the total gradient norm of the window's last step, before clipping;
    throughput and data wait of this rank over the window, :mod:`rest_fast.train.throughput`; every rank takes
    part in the reduction, only rank 0's callback should write). The returned stats also hold the epoch's
    ``clips_per_second`` and ``data_wait_fraction``.

    No host sync inside a step: captions are sampled and tokenised on the host, clips copied non-blocking, the loss
    summed on the device; the sum is read (and checked finite) only every ``log_every`` steps and at the end.
    """
    loss_module.train()
    params = [p for p in loss_module.parameters() if p.requires_grad]
    dev = env.device
    # [loss sum, steps, grad norm of the last log step] since the last log: read in one transfer
    window = torch.zeros(3, dtype=torch.float64, device=dev)
    total = torch.zeros(3, dtype=torch.float64, device=dev)
    one = torch.ones((), dtype=torch.float64, device=dev)
    step = -1
    meter = LoaderMeter(batches)
    for step, (idx, clips) in enumerate(progress(meter) if progress else meter):
        ids = cache.sample(idx.numpy().astype(np.int64), derive_seed(seed, epoch, step))
        captions = list(cache.texts(np.asarray(ids, dtype=np.int32)))
        with autocast(dev, amp):
            loss = loss_module(clips.to(dev, non_blocking=True), captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        log_now = (step + 1) % log_every == 0
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # foreach on CUDA; no sync (no error_if_nonfinite)
        elif log_now:  # the norm is only reported: computed on the log steps alone
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if log_now:
            window[2] = norm.detach().to(torch.float64)
        optimizer.step()
        scheduler.step()
        window[0] += loss.detach().to(torch.float64)
        window[1] += one
        if log_now:
            total += window
            avg, _, norm_value = _read_window(window, env, epoch=epoch, step=step)  # the sync that closes the window
            timing = {**meter.window(), **device_memory_gb(dev)}
            if on_log is not None:
                on_log({"step_in_epoch": step + 1, "loss": avg, "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": norm_value, **timing})
            window.zero_()
    total += window
    mean, _ = _check_window(total, env, epoch=epoch, step=step)
    return {"loss": mean, "steps": step + 1, **meter.total()}
