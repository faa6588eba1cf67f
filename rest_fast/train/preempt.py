"""Checkpoints that survive clusters: stop signals, mid-epoch checkpoints on a timer, a deterministic test hook.

* SIGTERM, SIGINT, SIGUSR1 (what SLURM sends before a time limit or a preemption, e.g. ``--signal=USR1@120``): the
  first one is noted; the trainer finishes the optimiser step (or round-0 chunk) under way, writes a checkpoint and
  raises :class:`Preempted`, which ``rest-fast train`` turns into exit code :data:`PREEMPTED_EXIT_CODE` (75,
  ``EX_TEMPFAIL``: "try again" — ``rest-fast train --out RUN --resume auto`` continues exactly where it stopped).
  A second signal exits at once with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), through Python's
  unwinding: every write of the run folder is atomic (temp file + rename), so nothing is torn, and the run
  resumes from its last checkpoint.
* ``save_every_minutes``: a mid-epoch checkpoint ``checkpoints/epoch_EEEE_step_SSSSSS`` (``EEEE`` epochs complete,
  ``SSSSSS`` optimiser steps into the next) once that much time passed since the last checkpoint; the newest one
  is kept until the epoch's own checkpoint replaces it.
* Under torchrun every rank takes part in each decision (one small all-reduce on a CPU gloo group per optimiser
  step, no device sync), so all ranks stop or save at the same step.
* ``REST_FAST_TEST_SIGNAL=KIND:N[:SIG[:COUNT]]`` (tests only): the process sends itself ``SIG`` (default SIGTERM;
  ``COUNT`` times, default once) when it reaches point ``N`` of ``KIND`` (``step``: after the N-th optimiser step of
  the run; ``features``/``round0``: after this rank's N-th eval batch of round 0's CLIP video features / initial
  captions), so kill-and-resume tests are deterministic instead of racing a timer.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from rest_fast.train.distributed import DistEnv

PREEMPTED_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: the run stopped cleanly and wants to be resumed
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)
TEST_HOOK_ENV = "REST_FAST_TEST_SIGNAL"
MID_EPOCH_TAG = "_step_"


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint; resume it with ``--resume auto``."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, signame: str, where: str, run_dir: Path) -> None:
        self.signame, self.where, self.run_dir = signame, where, Path(run_dir)
        super().__init__(f"stopped by {signame} {where}; continue with: rest-fast train --out {self.run_dir} "
                         "--resume auto")


class ImmediateExit(SystemExit):
    """A second stop signal: leave now (exit code 128 + signal number)."""


class StopSignals:
    """Handlers for :data:`STOP_SIGNALS` while training: the first signal sets :attr:`received`, a second raises
    :class:`ImmediateExit`. Installed in the main thread of the process that created it only; processes forked
    from it (DataLoader workers) ignore the signals — the trainer shuts them down itself."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. a test calling train())
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked worker: the main process decides
        if self.received is not None:
            raise ImmediateExit(128 + signum)
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing the current step, then writing a checkpoint "
              "(send it again to stop at once)", flush=True)

    @property
    def signame(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


class Control:
    """Per optimiser step (or round-0 chunk): should every rank save now, stop now? Agreed across ranks."""

    def __init__(self, env: DistEnv, signals: StopSignals, save_every_minutes: float) -> None:
        self.env, self.signals = env, signals
        self.interval = float(save_every_minutes) * 60.0
        self.last_save = time.monotonic()
        self._group = None
        if env.distributed:
            import torch.distributed as dist

            # the decision travels on the CPU (gloo): no device sync, whatever the training backend
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def decide(self, *, timed: bool = True) -> tuple[bool, bool]:
        """``(save, stop)``: stop when any rank got a stop signal; save when stopping, or (``timed``) once
        ``save_every_minutes`` passed on any rank."""
        stop = self.signals.received is not None
        due = timed and self.interval > 0 and time.monotonic() - self.last_save >= self.interval
        if self.env.distributed:
            import torch.distributed as dist

            flags = torch.tensor([int(stop), int(due)], dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            stop, due = bool(flags[0]), bool(flags[1])
            if stop and self.signals.received is None:
                self.signals.received = int(STOP_SIGNALS[0])  # another rank's signal: stop with it
        return stop or due, stop


def maybe_signal_self(kind: str, count: int) -> None:
    """The test hook (:data:`TEST_HOOK_ENV`): send this process the signal when ``kind`` reaches ``count``."""
    spec = os.environ.get(TEST_HOOK_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != kind or not parts[1].isdigit() or int(parts[1]) != count:
        return
    sig = getattr(signal, parts[2]) if len(parts) > 2 else signal.SIGTERM
    for _ in range(int(parts[3]) if len(parts) > 3 else 1):  # 2: the second signal, which exits at once
        os.kill(os.getpid(), sig)


def mid_epoch_name(epochs_done: int, step_in_epoch: int) -> str:
    """Folder name of a mid-epoch checkpoint: sorts after ``epoch_EEEE`` and before ``epoch_EEEE+1``."""
    return f"epoch_{epochs_done:04d}{MID_EPOCH_TAG}{step_in_epoch:06d}"


def is_mid_epoch(ckpt: Path | str | None) -> bool:
    return ckpt is not None and MID_EPOCH_TAG in Path(ckpt).name


def drop_mid_epoch_checkpoints(checkpoints: list[Path], keep: Path | None = None) -> None:
    """Delete the mid-epoch checkpoints in ``checkpoints`` (all of the run's folders) except ``keep``: they are
    superseded by a newer mid-epoch or epoch checkpoint."""
    import shutil

    for p in checkpoints:
        if is_mid_epoch(p) and (keep is None or Path(p).resolve() != Path(keep).resolve()):
            shutil.rmtree(p, ignore_errors=True)
