"""DataLoader worker settings shared by every loader: how many workers, and the per-sample decode deadline.

* :func:`default_num_workers` — the CPUs this process may use (``os.sched_getaffinity``, so a cgroup/taskset
  limit is honoured) divided by the processes started on this machine (``LOCAL_WORLD_SIZE`` under torchrun),
  minus one for the process that drives the GPU; :func:`resolve_num_workers` turns a config value (``-1`` =
  that default) into a count and caps explicit values at the CPUs available (more workers than CPUs only
  adds context switches).
* :func:`decode_deadline` — a per-sample watchdog: a decoder that hangs (a stuck network file system, a
  pathological stream) raises :class:`DecodeTimeout` after ``seconds``, which the datasets treat like any
  unreadable file (recorded in ``bad_files`` and replaced by the deterministic resample), so one bad file
  costs ``seconds`` once instead of stalling the rank. It uses ``SIGALRM`` in the calling thread, which
  is the main thread of each DataLoader worker process (and of the main process with ``num_workers=0``);
  elsewhere it is a no-op. Python's handler runs when control comes back to the interpreter: PyAV's
  demux/decode loop returns to Python between packets, so a stream that never ends or a read that keeps
  retrying is interrupted; a single C call that blocks forever (no return to Python) is not (known limit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

import numpy as np
from torch.utils.data import Dataset

__all__ = ["DecodeTimeout", "cpus_available", "default_num_workers", "resolve_num_workers", "decode_deadline",
           "resample_index", "read_with_replacements", "ResamplingDataset"]

_RESAMPLE_TAG = 0x5E5A  # separates the resample stream from the per-sample stream


class DecodeTimeout(Exception):
    """A sample took longer than the loader's ``decode_timeout_s``."""


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where that is not supported)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_num_workers(local_world_size: int | None = None) -> int:
    """Decoding workers per rank: ``cpus_available() // local_world_size - 1`` (one CPU left for the rank's
    own process), at least 0. ``local_world_size`` defaults to ``$LOCAL_WORLD_SIZE`` (torchrun), else 1."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(0, cpus_available() // max(1, local_world_size) - 1)


def resolve_num_workers(value: int | None, local_world_size: int | None = None) -> int:
    """A config/CLI ``num_workers`` as a worker count: ``None`` or ``-1`` = :func:`default_num_workers`;
    explicit counts are capped at :func:`cpus_available`."""
    if value is None or value < 0:
        return default_num_workers(local_world_size)
    return min(int(value), cpus_available())


def _raise_timeout(signum, frame):  # noqa: ARG001 - signal handler signature
    raise DecodeTimeout


@contextlib.contextmanager
def decode_deadline(seconds: float | None):
    """Raise :class:`DecodeTimeout` in this block after ``seconds`` (``None``/``0`` = no deadline).

    Only the main thread of a process can take signals; elsewhere (and on platforms without
    ``SIGALRM``) this does nothing. The previous handler and timer are restored on exit.
    """
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, old)


def resample_index(seed: int, epoch: int, index: int, attempt: int, n: int) -> int:
    """Deterministic replacement for a bad entry (``attempt`` = 1, 2, ...)."""
    ss = np.random.SeedSequence([seed, epoch, index, _RESAMPLE_TAG, attempt])
    return int(np.random.default_rng(ss).integers(n))


def read_with_replacements(read: Callable[[int], dict], describe: Callable[[int, BaseException], tuple[str, str]],
                           errors: tuple[type[BaseException], ...], *, entry: int, epoch: int, seed: int, n: int,
                           max_retries: int, timeout_s: float, skip_bad: bool = False) -> dict:
    """The item ``read(entry)``, or of its deterministic replacements when it is unreadable.

    Every dataset of every loader (PyAV, CPU shards, both DALI sources) reads a sample this one way, so a
    bad file is handled identically everywhere: ``read(j)`` runs under :func:`decode_deadline`; a
    :class:`DecodeTimeout` or one of ``errors`` is recorded as ``describe(j, error) -> (path, reason)`` and
    entry :func:`resample_index` ``(seed, epoch, entry, attempt)`` is tried next, up to ``max_retries``
    times. The item comes back with ``"bad"``: the failures met on the way (the caller's report counts
    them). ``skip_bad=True`` tries no replacement: ``{"entry", "bad", "failed": True}`` comes back instead.
    Raises :class:`~rest_fast.data.bad_files.TooManyBadFiles` when every try failed.
    """
    from rest_fast.data.bad_files import TooManyBadFiles

    bad: list[tuple[str, str]] = []
    j = entry
    for attempt in range(max_retries + 1):
        try:
            with decode_deadline(timeout_s):
                item = read(j)
            item["bad"] = bad
            return item
        except (DecodeTimeout, *errors) as e:
            bad.append(describe(j, e))
        if skip_bad:
            return {"entry": entry, "bad": bad, "failed": True}
        j = resample_index(seed, epoch, entry, attempt + 1, n)
    raise TooManyBadFiles(f"entry {entry} and {max_retries} deterministic replacements are all unreadable; "
                          f"last: {bad[-1][0]}: {bad[-1][1]}")


class ResamplingDataset(Dataset):
    """Base of the map-style sample datasets (PyAV clips, CPU shards, both DALI sample sources): items keyed by
    ``(epoch, entry)`` (or a bare ``entry``, epoch 0), each read through :func:`read_with_replacements`.

    A subclass sets ``index``, ``seed``, ``max_retries`` and ``decode_timeout_s``, names what makes an entry
    unreadable in ``read_errors``, and implements :meth:`read_entry` and :meth:`describe_bad`. ``skip_bad``
    (default False) returns failures instead of resampling.
    """

    read_errors: tuple[type[BaseException], ...] = ()
    skip_bad: bool = False

    def __len__(self) -> int:
        return len(self.index)

    def read_entry(self, j: int, epoch: int) -> dict:
        """The item of entry ``j`` in ``epoch``; raises one of ``read_errors`` when it cannot be read."""
        raise NotImplementedError

    def describe_bad(self, j: int, e: BaseException) -> tuple[str, str]:
        """``(path, reason)`` recorded for entry ``j`` that raised ``e`` (a ``read_errors`` or a DecodeTimeout)."""
        raise NotImplementedError

    def __getitem__(self, key) -> dict:
        epoch, entry = key if isinstance(key, tuple) else (0, key)
        return read_with_replacements(lambda j: self.read_entry(j, epoch), self.describe_bad, self.read_errors,
                                      entry=entry, epoch=epoch, seed=self.seed, n=len(self.index),
                                      max_retries=self.max_retries, timeout_s=self.decode_timeout_s,
                                      skip_bad=self.skip_bad)
