"""How many bytes of temporary buffers a blocked op may take on its device (top-k chunks, gathered keys).

``torch.cuda.mem_get_info`` reports what the *driver* has free. PyTorch's caching allocator keeps freed blocks
reserved for reuse, so mid-run most of the memory a process can still use is "reserved but not allocated" and
invisible there: a budget read from it alone shrinks to tiny chunks (many small launches, many collectives).
:func:`memory_budget` counts both, takes a fraction (the rest is for the caller's own tensors and fragmentation:
cached blocks are not one contiguous range) and keeps a floor so a budget never degenerates to a handful of rows.
"""

from __future__ import annotations

import torch

__all__ = ["memory_budget", "device_memory_budget", "DEFAULT_FLOOR"]

DEFAULT_FLOOR = 256 << 20


def memory_budget(free: int, reserved: int, allocated: int, *, fraction: float = 0.25,
                  floor: int = DEFAULT_FLOOR, cap: int | None = None) -> int:
    """``max(floor, min(cap, fraction · (free + reserved − allocated)))`` bytes.

    Args:
        free: bytes the driver reports free on the device (``torch.cuda.mem_get_info()[0]``).
        reserved: bytes the caching allocator holds (``torch.cuda.memory_reserved``).
        allocated: bytes held by live tensors (``torch.cuda.memory_allocated``); ``reserved − allocated`` is
            cached memory the next allocation reuses without asking the driver (never counted below zero).
        fraction: share of that memory the op may take.
        floor: the smallest budget returned, whatever the device reports.
        cap: the largest budget returned (``None``: no cap).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    available = max(0, int(free)) + max(0, int(reserved) - int(allocated))
    budget = int(available * fraction)
    if cap is not None:
        budget = min(budget, int(cap))
    return max(int(floor), budget)


def device_memory_budget(device: torch.device, *, cpu: int, fraction: float = 0.25, floor: int = DEFAULT_FLOOR,
                         cap: int | None = None) -> int:
    """:func:`memory_budget` read from ``device`` now (CUDA); ``cpu`` bytes on any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return int(cpu)
    free, _ = torch.cuda.mem_get_info(device)
    return memory_budget(free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device),
                         fraction=fraction, floor=floor, cap=cap)
