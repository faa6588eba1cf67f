"""Two facts every ``torch.distributed`` exchange in rest_fast needs: the group's size and this rank in it, and the
device its tensors must live on (CUDA for NCCL, CPU for gloo). Used by the sharded caption cache, the distributed
top-k, the sharded re-rank and the trainer's feature writer, which sit in different layers."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["group_world", "comm_device"]


def group_world(group=None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def comm_device(group, fallback: torch.device | str | None = None) -> torch.device:
    """Where ``group``'s collectives take their tensors: ``fallback`` (or the current CUDA device) on NCCL, else
    the CPU (gloo, or no process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        fallback = torch.device(fallback) if fallback is not None else None
        return fallback if fallback is not None and fallback.type == "cuda" else \
            torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
