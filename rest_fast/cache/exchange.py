"""Variable-size all-to-all exchanges between ``torch.distributed`` ranks, for the sharded caption cache.

:class:`Exchange` sends rank ``r``'s ``parts[d]`` to rank ``d`` and returns what every rank sent to ``r``, in source
rank order: numeric arrays (:meth:`Exchange.arrays`) and lists of UTF-8 byte strings (:meth:`Exchange.strings`, as
lengths + one concatenated byte buffer). Every call is collective: all ranks of the group call it together, each
with one part per rank (empty parts are fine). It is ``all_to_all_single`` twice (the counts, then the payload), so
it runs on gloo (CPU tensors) and NCCL (CUDA tensors) alike. ``bytes_sent`` counts the payload this rank sent to
other ranks (its own part stays local), for the round's log.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from rest_fast.comm import comm_device, group_world

__all__ = ["Exchange"]


class Exchange:
    """All-to-all of per-destination parts over ``group`` (see the module doc)."""

    def __init__(self, group=None, device: torch.device | str | None = None) -> None:
        self.group = group
        self.world, self.rank = group_world(group)
        self.device = comm_device(group, device)
        self.bytes_sent = 0

    def arrays(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """``parts[d]`` (1-D, one dtype for all) goes to rank ``d``; returns the arrays received, by source rank."""
        if len(parts) != self.world:
            raise ValueError(f"need one part per rank ({self.world}), got {len(parts)}")
        parts = [np.ascontiguousarray(p).reshape(-1) for p in parts]
        dtype = parts[0].dtype
        if any(p.dtype != dtype for p in parts):
            raise ValueError("every part must have the same dtype")
        if self.world == 1:
            return [parts[0]]
        sizes = [int(p.size) for p in parts]
        counts = torch.tensor(sizes, dtype=torch.int64, device=self.device)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=self.group)
        recv = got.tolist()
        send = torch.from_numpy(np.concatenate(parts)).to(self.device)
        out = torch.empty(sum(recv), dtype=send.dtype, device=self.device)
        dist.all_to_all_single(out, send, recv, sizes, group=self.group)
        self.bytes_sent += (sum(sizes) - sizes[self.rank]) * dtype.itemsize + 8 * (self.world - 1)
        flat = out.cpu().numpy()
        return np.split(flat, np.cumsum(recv)[:-1])

    def strings(self, parts: list[list[bytes]]) -> list[list[bytes]]:
        """``parts[d]`` (byte strings) goes to rank ``d``; returns the lists received, by source rank. One exchange:
        each part travels as ``[count][count lengths][the bytes]`` (int64 header, then UTF-8)."""
        packed = []
        for p in parts:
            lens = np.fromiter((len(b) for b in p), dtype=np.int64, count=len(p))
            head = np.concatenate([np.array([len(p)], dtype=np.int64), lens]).view(np.uint8)
            packed.append(np.concatenate([head, np.frombuffer(b"".join(p), dtype=np.uint8)]))
        out = []
        for buf in self.arrays(packed):
            if buf.size == 0:
                out.append([])
                continue
            count = int(buf[:8].view(np.int64)[0])
            lens = buf[8: 8 * (count + 1)].view(np.int64)
            raw = buf[8 * (count + 1):].tobytes()
            ends = np.cumsum(lens)
            out.append([raw[a:b] for a, b in zip((ends - lens).tolist(), ends.tolist())])
        return out

    def sum_bytes(self, buf: np.ndarray) -> np.ndarray:
        """Element-wise sum of a uint8 array over the ranks (callers set disjoint bits, so the sum is their OR). On a
        CPU group the sum is made in ``buf``'s own memory (a bitmap of every position: no second copy); counted in
        :attr:`bytes_sent`."""
        out = self._sum(np.ascontiguousarray(buf))
        if self.world > 1:
            self.bytes_sent += int(buf.nbytes)
        return out

    def sum_ints(self, values: list[int] | np.ndarray) -> np.ndarray:
        """Element-wise sum of int64 values over the ranks (``values`` is not modified)."""
        return self._sum(np.array(values, dtype=np.int64))

    def sum_floats(self, values: list[float] | np.ndarray) -> np.ndarray:
        """Element-wise sum of float64 values over the ranks (``values`` is not modified)."""
        return self._sum(np.array(values, dtype=np.float64))

    def _sum(self, a: np.ndarray) -> np.ndarray:
        """All-reduce (sum) of the contiguous array ``a``, in place when the group's device is the CPU."""
        if self.world == 1:
            return a
        t = torch.from_numpy(a).to(self.device)
        dist.all_reduce(t, group=self.group)
        return t.cpu().numpy()

    def gather_blocks(self, table: np.ndarray, bounds: list[tuple[int, int]]) -> None:
        """Fill ``table`` in place: rank ``r`` has written rows ``bounds[r]`` and they are broadcast into the same rows
        on every rank (a replicated table assembled from per-rank blocks)."""
        if self.world == 1:
            return
        for r, (lo, hi) in enumerate(bounds):
            if hi <= lo:
                continue
            t = torch.from_numpy(np.ascontiguousarray(table[lo:hi])).to(self.device)
            dist.broadcast(t, src=dist.get_global_rank(self.group, r) if self.group is not None else r,
                           group=self.group)
            if r == self.rank:
                self.bytes_sent += int(t.numel() * t.element_size())
            else:
                table[lo:hi] = t.cpu().numpy()
