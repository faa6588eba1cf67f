"""How fast the training loop eats clips, and how much of its time it waits for the loader: host clocks only.

:class:`LoaderMeter` wraps the batch iterable of an epoch. It times each ``next()`` on the loader (the time the
loop is blocked waiting for data) and counts the clips it hands out; :meth:`LoaderMeter.window` returns, for the
steps since its previous call, ``clips_per_second`` (this rank's clips over the wall time of the window: clips/s
per GPU under torchrun) and ``data_wait_fraction`` (time blocked in ``next()`` over that wall time).

Nothing here touches device data, so no host sync is added to a step. On CUDA the host runs ahead of the GPU
between two log points; the window is closed at a log point, right after the loop reads the window's loss from
the device (a sync that was there already), so the window's wall time is the GPU's too. A wait in ``next()``
while the GPU still has queued work is counted as waiting although the GPU was busy: the fraction is an upper
bound of the GPU's idle share, and 0 means the loaders keep up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator


def _count(batch) -> int:
    """Clips in a batch ``(video_indices [B], clips [B, ...])`` (or any sized first element)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    try:
        return len(first)
    except TypeError:
        return 1


class LoaderMeter:
    """Iterates ``batches`` while timing the waits in ``next()`` and counting clips (see the module docstring).

    ``clock`` is ``time.perf_counter`` (injectable for tests of the arithmetic).
    """

    def __init__(self, batches: Iterable, clock=time.perf_counter) -> None:
        self._batches = batches
        self._clock = clock
        self._start = self._epoch_start = None
        self._wait = self._epoch_wait = 0.0
        self._clips = self._epoch_clips = 0

    def __len__(self) -> int:
        return len(self._batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        it = iter(self._batches)
        now = self._clock()
        if self._start is None:
            self._start = self._epoch_start = now
        while True:
            t0 = self._clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            waited = self._clock() - t0
            n = _count(batch)
            self._wait += waited
            self._epoch_wait += waited
            self._clips += n
            self._epoch_clips += n
            yield batch

    @staticmethod
    def _figures(clips: int, wait: float, seconds: float) -> dict:
        seconds = max(seconds, 1e-9)
        return {"clips_per_second": round(clips / seconds, 3), "data_wait_fraction": round(min(wait / seconds, 1.0), 4)}

    def window(self) -> dict:
        """``{"clips_per_second", "data_wait_fraction"}`` since the previous call (or the start); starts a new window."""
        now = self._clock()
        start = self._start if self._start is not None else now
        out = self._figures(self._clips, self._wait, now - start)
        self._start, self._wait, self._clips = now, 0.0, 0
        return out

    def total(self) -> dict:
        """The same figures over everything iterated so far (the epoch)."""
        now = self._clock()
        start = self._epoch_start if self._epoch_start is not None else now
        return self._figures(self._epoch_clips, self._epoch_wait, now - start)


def device_memory_gb(device) -> dict:
    """``{"gpu_memory_gb": peak allocated since the last call, "gpu_memory_reserved_gb"}`` on CUDA, else ``{}``.

    Reads the caching allocator's counters on the host (no device sync) and resets the peak, so each logged
    window reports its own peak."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    return {"gpu_memory_gb": round(peak / 2**30, 3), "gpu_memory_reserved_gb": round(reserved / 2**30, 3)}
