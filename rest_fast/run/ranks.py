"""Ranks for ``eval`` and ``finetune`` under torchrun or srun: which process this is, its share of the videos,
and the gathers that put the shares back in order.

The trainer has its own :mod:`rest_fast.train.distributed` (``train`` and ``eval`` do not import each other);
this is the small part both commands need, on the same launch convention (:mod:`rest_fast.run.launch`):
videos are cut in contiguous blocks by rank (:func:`shard_block`), so gathering the blocks in rank order gives
back the one-process order, and only rank 0 writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def shard_block(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s block of ``range(n)`` when cut into ``world_size`` near-equal contiguous blocks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return range((n * rank) // world_size, (n * (rank + 1)) // world_size)


@dataclass(frozen=True)
class Ranks:
    """``rank`` of ``world_size`` (``local_rank`` on its node); the default is one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> range:
        return shard_block(n, self.rank, self.world_size)

    def gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_ranks(device: torch.device, timeout_s: float = 3600.0) -> tuple[Ranks, torch.device, bool]:
    """``(ranks, device, owned)``: join the launcher's process group (NCCL on CUDA, gloo on CPU; each rank on
    ``cuda:LOCAL_RANK``) when started by torchrun or srun with more than one process, else one process on
    ``device``. ``owned``: this call created the group (pass it to :func:`close_ranks`)."""
    from rest_fast.run.launch import adopt_slurm_env

    info = adopt_slurm_env()
    if info.world_size <= 1:
        return Ranks(), device, False
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return Ranks(info.rank, info.world_size, info.local_rank), device, owned


def close_ranks(owned: bool) -> None:
    """Destroy the process group :func:`init_ranks` created (nothing when it joined an existing one)."""
    if owned and dist.is_initialized():
        dist.destroy_process_group()
