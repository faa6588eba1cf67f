"""Gradient accumulation: one optimiser step over ``accum_steps`` micro-batches, equal to the step on the whole batch.

``batch_size`` stays the global recipe batch: each rank's loader yields micro-batches of
``batch_size / world_size / accum_steps`` clips, and ``accum_steps`` consecutive ones make one optimiser step —
the same clips, in the same order, as the rank's batch with ``accum_steps=1`` (the epoch's permutation is cut into
the same contiguous runs; the last step of an epoch may be short, with fewer or smaller micro-batches). Every clip
keeps its augmentation draws (seeded per sample, not per batch), and the captions are sampled once per step for
all its clips with the step's seed, so they are the same too.

The loss is a mean over the step's clips (each clip's label-smoothed cross-entropy is a mean over its caption
tokens, :meth:`GARModel.loss`): micro-batch ``j`` of ``b_j`` clips contributes ``mean_j · b_j / n`` where ``n``
is the step's clip count, so the summed gradients are those of the whole step's mean, not a mean of
micro-batch means (which would weigh a short last micro-batch wrongly). Under DDP the all-reduce runs once, on the
last micro-batch (``no_sync`` on the others). With dropout > 0 the dropout masks are drawn per micro-batch and so
differ from a whole-batch step (BLIP's dropout is 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

from rest_fast.errors import UserError

_SYNCED_ONCE = "_rest_fast_synced_once"  # set on a DDP module after its first (fully synchronised) step


def micro_batch_size(per_rank_batch: int, accum_steps: int, world_size: int = 1) -> int:
    """Clips per micro-batch; a one-line :class:`UserError` when the rank's batch does not split evenly."""
    if accum_steps < 1:
        raise UserError(f"accum_steps must be >= 1, got {accum_steps}")
    if per_rank_batch % accum_steps:
        where = f" over {world_size} processes" if world_size > 1 else ""
        raise UserError(f"batch_size gives {per_rank_batch} clips per process{where}, which accum_steps={accum_steps} "
                        "does not divide: pick accum_steps dividing it (the micro-batches must be equal)")
    return per_rank_batch // accum_steps


def group_micro_batches(batches: Iterable, accum_steps: int) -> Iterator[list]:
    """``accum_steps`` consecutive items of ``batches`` per list (the last list may be shorter)."""
    group: list = []
    for item in batches:
        group.append(item)
        if len(group) == accum_steps:
            yield group
            group = []
    if group:
        yield group


def accumulate_gradients(loss_module: torch.nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor]],
                         captions: list[str], *, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                         scale: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Backward of one optimiser step's loss over its micro-batches ``[(indices [b_j], clips [b_j,T,3,S,S]), ...]``.

    ``captions``: one per clip of the whole step, in order. ``autocast()``: the precision context of a forward;
    ``scale``: the gradient scaler's loss scaling (fp16). Gradients accumulate into ``.grad`` (zero them before);
    returns the step's mean loss (detached, on ``device``) — what the whole-batch step would report.
    """
    n = sum(int(idx.shape[0]) for idx, _ in micro)
    if n != len(captions):
        raise ValueError(f"{len(captions)} captions for {n} clips")
    no_sync = getattr(loss_module, "no_sync", None)  # DDP: all-reduce on the last micro-batch only
    if no_sync is not None and getattr(loss_module, "static_graph", False) and not getattr(loss_module, _SYNCED_ONCE, False):
        # a static-graph DDP records its graph on the first iteration, which must not skip the all-reduce (PyTorch
        # asserts). All-reducing each micro-batch's running sum is still exact in value (the mean over ranks of a
        # rank-constant term is that term), only rounded differently: the trainer uses no static graph when it
        # accumulates (see loop.ddp_options).
        no_sync = None
        setattr(loss_module, _SYNCED_ONCE, True)
    total = None
    start = 0
    for j, (idx, clips) in enumerate(micro):
        b = int(idx.shape[0])
        last = j == len(micro) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast():
                loss = loss_module(clips.to(device, non_blocking=True), captions[start:start + b])
            if len(micro) > 1:  # this micro-batch's share of the step's mean (one micro-batch: the loss itself)
                loss = loss * (b / n)
            scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
        start += b
    return total
