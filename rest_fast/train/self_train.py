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


def sampled_captions(cache, videos: np.ndarray, seed: int) -> list[str]:
    """One of each video's K slot captions, drawn by ``cache.sample`` (seeded by (seed, video)). A sharded cache
    (``ShardedCaptionCache``) holds every video's slot ids but only some texts: the texts come from their ranks in
    one small exchange (a collective: every rank calls it at every step; :class:`CaptionPrefetch` runs it ahead)."""
    if hasattr(cache, "sample_texts"):
        return cache.sample_texts(videos, seed)
    return list(cache.texts(np.asarray(cache.sample(videos, seed), dtype=np.int32)))


def _indices(micro: list) -> np.ndarray:
    idx = torch.cat([i for i, _ in micro]) if len(micro) > 1 else micro[0][0]
    return idx.numpy().astype(np.int64)


class CaptionPrefetch:
    """``(micro-batches, captions)`` per optimiser step, the captions of step ``s + 1`` fetched while step ``s``
    trains.

    With a sharded caption cache each step's texts come from other ranks (:func:`sampled_captions`: two small
    all-to-alls on the cache's own gloo group, milliseconds on TCP). Fetched inline they would sit on the critical
    path of every step; here one background thread runs them one step ahead, in step order, so every rank issues
    the same collectives in the same order (every rank has the same number of steps). The next step's micro-batches
    are taken from the loader before the current step is handed out (its workers prefetch anyway). On an early stop
    the fetch already started finishes on every rank before the thread is shut down.
    """

    def __init__(self, groups: Iterable, cache, seed_of_step: Callable[[int], int], start_step: int) -> None:
        self.groups, self.cache, self.seed_of_step, self.start_step = groups, cache, seed_of_step, start_step

    def _fetch(self, micro: list, step: int) -> list[str]:
        return self.cache.sample_texts(_indices(micro), self.seed_of_step(step))

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-prefetch")
        try:
            it = iter(self.groups)
            step = self.start_step
            cur = next(it, None)
            fut = pool.submit(self._fetch, cur, step) if cur is not None else None
            while cur is not None:
                nxt = next(it, None)
                nfut = pool.submit(self._fetch, nxt, step + 1) if nxt is not None else None
                yield cur, fut.result()
                cur, fut, step = nxt, nfut, step + 1
        finally:
            pool.shutdown(wait=True)


def self_train_epoch(loss_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Iterable,
                     cache, *, epoch: int, seed: int, env: DistEnv, amp: bool | str = True, grad_clip: float = 0.0,
                     log_every: int = 10, on_log: Callable[[dict], None] | None = None,
                     progress: Callable | None = None, accum_steps: int = 1, scaler=None, start_step: int = 0,
                     resume: dict | None = None, on_step_end: Callable[[int, Callable[[], dict]], bool] | None = None) -> dict:
    """One epoch over ``batches`` = ``(video_indices int64 [b], clips float [b,T,3,S,S])``; returns epoch stats.

    ``accum_steps`` consecutive items of ``batches`` make one optimiser step (gradient accumulation,
    :mod:`rest_fast.train.accumulate`); ``amp``: ``True``/``False`` or a precision name (``"bf16"``, ``"fp16"``,
    ``"fp32"``); ``scaler``: a :class:`rest_fast.run.precision.StepScaler` (fp16's gradient scaler; ``None`` = none).

    ``on_log(record)`` receives ``{"step_in_epoch", "loss", "lr", "grad_norm", "clips_per_second",
    "data_wait_fraction"}`` (+ ``gpu_memory_gb`` on CUDA) every ``log_every`` steps (loss averaged over ranks and
    the window's steps; ``grad_norm``: the total gradient norm of the window's last step, before clipping;
    throughput and data wait of this rank over the window, :mod:`rest_fast.train.throughput`; every rank takes
    part in the reduction, only rank 0's callback should write). The returned stats also hold the epoch's
    ``clips_per_second`` and ``data_wait_fraction``.

    Mid-epoch resume: ``batches`` starts at optimiser step ``start_step`` of the epoch, ``resume`` holds the
    counters saved with it (``{"window": [...], "total": [...]}``) and ``"rng"`` (restored once the first step's
    batches are fetched, where an uninterrupted epoch stood when the checkpoint was taken). ``on_step_end(steps
    done in the epoch, counters)`` runs after every optimiser step (``counters()`` gives the counters to save);
    it returning True ends the epoch there (``stats["stopped"]``: a checkpoint was written, the run stops).

    No host sync inside a step: captions are sampled and tokenised on the host, clips copied non-blocking, the loss
    summed on the device; the sum is read (and checked finite) only every ``log_every`` steps and at the end.
    """
    from rest_fast.train.accumulate import accumulate_gradients, group_micro_batches

    loss_module.train()
    params = [p for p in loss_module.parameters() if p.requires_grad]
    dev = env.device
    # [loss sum, steps, grad norm of the last log step] since the last log: read in one transfer
    window = torch.zeros(3, dtype=torch.float64, device=dev)
    total = torch.zeros(3, dtype=torch.float64, device=dev)
    if resume:  # counters saved with a mid-epoch checkpoint
        saved_window, saved_total = resume["window"], resume["total"]
        window[: len(saved_window)] = torch.tensor(saved_window, dtype=torch.float64)
        total[: len(saved_total)] = torch.tensor(saved_total, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64, device=dev)
    meter = LoaderMeter(batches)  # times the waits for data and counts clips, per micro-batch
    groups = group_micro_batches(meter, accum_steps)
    step = start_step - 1
    stopped = False
    fp16 = scaler is not None and scaler.enabled

    def counters() -> dict:
        return {"window": _to_host(window), "total": _to_host(total)}

    if hasattr(cache, "sample_texts"):  # sharded cache: texts fetched from their ranks one step ahead
        stream = iter(CaptionPrefetch(groups, cache, lambda s: derive_seed(seed, epoch, s), start_step))
    else:
        stream = ((micro, None) for micro in groups)
    try:
        for step, (micro, captions) in enumerate(progress(stream) if progress else stream, start=start_step):
            if step == start_step and resume and resume.get("rng") is not None:
                from rest_fast.run.rundir import restore_rng

                restore_rng(resume["rng"])
            idx = torch.cat([i for i, _ in micro]) if len(micro) > 1 else micro[0][0]
            if captions is None:
                captions = sampled_captions(cache, idx.numpy().astype(np.int64), derive_seed(seed, epoch, step))
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(loss_module, micro, captions, device=dev, autocast=lambda: autocast(dev, amp),
                                        scale=scaler.scale if fp16 else (lambda t: t))
            log_now = (step + 1) % log_every == 0
            if fp16:  # unscales, clips and steps, skipping a step whose gradients hold inf/NaN
                if log_now:  # the reported norm: of the unscaled gradients, before clipping (a device division, no sync)
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                    window[2] = (norm.to(torch.float64) / scaler.scaler._scale.to(torch.float64)).detach()
                scaler.step(optimizer, params, grad_clip)
            else:
                if grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # foreach on CUDA; no sync (no error_if_nonfinite)
                elif log_now:  # the norm is only reported: computed on the log steps alone
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                if log_now:
                    window[2] = norm.detach().to(torch.float64)
                optimizer.step()
            scheduler.step()
            if fp16:  # an overflowed step is skipped, not fatal; its loss not counted
                ok = torch.isfinite(loss)
                window[0] += torch.where(ok, loss, torch.zeros_like(loss)).to(torch.float64)
                window[1] += ok.to(torch.float64)
            else:
                window[0] += loss.to(torch.float64)
                window[1] += one
            if log_now:
                total += window
                avg, _, norm_value = _read_window(window, env, epoch=epoch, step=step)  # the sync that closes the window
                timing = {**meter.window(), **device_memory_gb(dev)}
                if on_log is not None:
                    rec = {"step_in_epoch": step + 1, "loss": avg, "lr": optimizer.param_groups[0]["lr"],
                           "grad_norm": norm_value, **timing}
                    if fp16:  # optimiser steps skipped for inf/NaN gradients
                        rec["skipped_steps"] = int(_to_host(scaler.skipped.reshape(1))[0])
                    on_log(rec)
                window.zero_()
            if on_step_end is not None and on_step_end(step + 1, counters):
                stopped = True
                break
    finally:
        stream.close()  # a stop mid-epoch: the fetch under way finishes (on every rank) before its thread ends
    if stopped:  # the counters went into the checkpoint; the epoch's stats are the resumed run's to report
        return {"loss": float("nan"), "steps": step + 1 - start_step, "stopped": True}
    total += window
    mean, _ = _check_window(total, env, epoch=epoch, step=step)
    return {"loss": mean, "steps": step + 1 - start_step, **meter.total()}
