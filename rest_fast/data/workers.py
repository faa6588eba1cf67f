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

__all__ = ["DecodeTimeout", "cpus_available", "default_num_workers", "resolve_num_workers", "decode_deadline"]


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
