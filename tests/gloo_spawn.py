"""Spawning gloo worker processes in the tests: a free local port, and one retry when a worker dies of a signal.

Why the retry: CI saw rare runs where a rank died of SIGABRT at gloo teardown ("terminate called without an active
exception", from gloo's C++ threads) with no Python error; a failed assertion in a worker raises
``ProcessRaisedException`` at once and is never retried.
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(fn: Callable, nprocs: int, make_args: Callable[[int, int], tuple]) -> int:
    """``mp.spawn(fn, args=make_args(port, attempt), nprocs=nprocs)`` on a fresh port, retried once (attempt 2) when a
    worker died of a signal; ``make_args`` may give the retry fresh folders. Returns the attempt that succeeded."""
    for attempt in (1, 2):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mp.spawn(fn, args=make_args(free_port(), attempt), nprocs=nprocs, join=True)
            return attempt
        except mp.ProcessExitedException as e:
            if attempt == 2:
                raise
            warnings.warn(f"gloo worker died of a signal ({e}); retrying once", RuntimeWarning, stacklevel=1)
    raise AssertionError("unreachable")
