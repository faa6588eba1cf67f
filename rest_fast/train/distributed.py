"""Multi-process training: ``torchrun --nproc-per-node N -m rest_fast train ...``.

Work is sharded by video: each rank takes one contiguous block of video indices (so gathering the
blocks in rank order restores the global order) for initial captioning, CLIP features, caption
generation, text embedding and re-ranking; self-training wraps the model in DDP. Every rank keeps an
identical replica of the caption cache: results are all-gathered and applied in the same order, so
interned caption ids agree everywhere. Rank 0 alone writes the run directory; the other ranks read
what it wrote (cached features, the caption cache on resume), so on several nodes the run directory
must sit on a shared filesystem. NCCL on CUDA, gloo on CPU (how the tests run two processes on one
machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> np.ndarray:
        """This rank's block of ``range(n)`` (blocks differ in size by at most one)."""
        return shard_range(n, self.rank, self.world_size)

    def block(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of :meth:`shard` (``lo == hi`` for an empty block, at its place in the order)."""
        return (n * self.rank) // self.world_size, (n * (self.rank + 1)) // self.world_size


def shard_range(n: int, rank: int, world_size: int) -> np.ndarray:
    """Indices ``[lo, hi)`` of block ``rank`` when ``range(n)`` is cut into ``world_size`` near-equal blocks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    lo = (n * rank) // world_size
    hi = (n * (rank + 1)) // world_size
    return np.arange(lo, hi, dtype=np.int64)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto", timeout_s: float = 3600.0) -> DistEnv:
    """Initialise ``torch.distributed`` when launched by torchrun or srun (world size > 1), else a 1-process env.

    ``timeout_s``: how long a collective waits for the slowest rank before failing (config ``nccl_timeout``).
    """
    from rest_fast.run.launch import adopt_slurm_env

    adopt_slurm_env()  # plain `srun`: rank, world and master from SLURM_* (torchrun's variables win)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(**process_group_options(dev, timeout_s))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def process_group_options(dev: torch.device, timeout_s: float) -> dict:
    """Keyword arguments of ``init_process_group`` for a rank computing on ``dev``: NCCL bound to the rank's own
    GPU (``device_id``: communicators are created on that device, never on whatever device is current), gloo on
    CPU."""
    from datetime import timedelta

    if timeout_s <= 0:
        raise ValueError(f"nccl_timeout must be > 0 seconds, got {timeout_s}")
    opts = {"backend": "nccl" if dev.type == "cuda" else "gloo", "timeout": timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        opts["device_id"] = dev
    return opts


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


_CPU_GROUPS: dict[int, object] = {}


def cpu_group(env: DistEnv):
    """A gloo group of its own over every rank, for host-side exchanges (the sharded caption cache: its texts are
    fetched for the next optimiser step on a background thread while DDP all-reduces on the default group): no
    CUDA tensor, no device sync, and never two threads on one group. ``None`` in one process. Created once per
    process group; every rank must call it at the same point the first time (``new_group`` is collective)."""
    if not env.distributed:
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def broadcast_object(env: DistEnv, obj):
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(env: DistEnv, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_list(env: DistEnv, items: list) -> list:
    """Concatenate every rank's list in rank order (the shards of :func:`shard_range` back in global order)."""
    return [x for part in all_gather_objects(env, items) for x in part]


def _pad_to_largest(env: DistEnv, t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``t`` zero-padded along dim 0 to the largest rank's row count (collectives need equal shapes), and
    every rank's row count (one small all_gather)."""
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(env.world_size)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    m = max(sizes_i)
    if t.shape[0] == m:
        return t.contiguous(), sizes_i
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    return padded, sizes_i


def gather_rows(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` [n_r, ...] along dim 0 in rank order; sizes may differ per rank."""
    if not env.distributed:
        return t
    padded, sizes_i = _pad_to_largest(env, t)
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)], dim=0)


def gather_rows_into(env: DistEnv, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out [n, ...]`` in place from every rank's block: rank r has written rows ``shard_range(n, r)``
    of ``out`` and they are broadcast from it straight into the same rows everywhere (no padded or concatenated
    copy). CPU tensors on gloo, CUDA tensors on NCCL."""
    if not env.distributed:
        return out
    n = out.shape[0]
    for r in range(env.world_size):
        rows = shard_range(n, r, env.world_size)
        if len(rows):
            view = out[int(rows[0]): int(rows[-1]) + 1]
            if view.is_contiguous():
                dist.broadcast(view, src=r)
            else:
                buf = view.contiguous()
                dist.broadcast(buf, src=r)
                view.copy_(buf)
    return out


def gather_rows_to_main(env: DistEnv, t: torch.Tensor) -> torch.Tensor | None:
    """Every rank's ``t [n_r, ...]`` concatenated in rank order on rank 0 (``None`` elsewhere): unlike
    :func:`gather_rows`, the other ranks never hold the whole result."""
    if not env.distributed:
        return t
    padded, sizes_i = _pad_to_largest(env, t)
    parts = [torch.empty_like(padded) for _ in range(env.world_size)] if env.is_main else None
    dist.gather(padded, parts, dst=0)
    if not env.is_main:
        return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)], dim=0)


def all_reduce_mean(env: DistEnv, value: float) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def all_reduce_sum(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor on ``t``'s device; ``t`` itself when not distributed)."""
    if not env.distributed:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


@dataclass(frozen=True)
class Precision:
    """What ``amp``/``precision`` means on a device: ``autocast`` — the captioner and CLIP calls run under
    autocast in ``autocast_dtype`` (bf16, or fp16 for ``precision=fp16``); ``clip_dtype`` — the frozen CLIP's
    weight dtype (``None`` = its default: bf16/fp16 on CUDA, fp32 on CPU)."""

    autocast: bool
    clip_dtype: torch.dtype | None
    autocast_dtype: torch.dtype = torch.bfloat16


def precision(device: torch.device, amp: bool | str) -> Precision:
    """The precision decisions for ``device`` under config ``amp`` (a bool) or ``precision`` (``"bf16"``,
    ``"fp16"``, ``"fp32"``); pure: testable for CUDA without a GPU.

    ``amp=False`` / ``"fp32"`` on CUDA is fp32 everywhere: no autocast in the model, CLIP weights in fp32.
    ``"fp16"``: fp16 autocast and fp16 CLIP weights (cards without bf16).
    """
    from rest_fast.run.precision import autocast_dtype

    dtype = autocast_dtype(amp)
    if device.type != "cuda":
        return Precision(autocast=False, clip_dtype=torch.float32)
    if dtype is None:
        return Precision(autocast=False, clip_dtype=torch.float32)
    return Precision(autocast=True, clip_dtype=None if dtype == torch.bfloat16 else dtype, autocast_dtype=dtype)


def autocast(device: torch.device, enabled: bool | str = True):
    """Autocast on CUDA: bf16 for ``True``/``"bf16"``, fp16 for ``"fp16"``; off for ``False``/``"fp32"``; a no-op
    context on CPU, where fp32 is kept."""
    from rest_fast.run.precision import autocast_dtype

    dtype = autocast_dtype(enabled)
    if dtype is not None and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)
