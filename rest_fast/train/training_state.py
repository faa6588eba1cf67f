"""The trainer's step-level state beyond weights and optimiser: precision (fp16 scaler), gradient accumulation's
micro-batch check, stop signals and mid-epoch checkpoints (:mod:`rest_fast.train.preempt`).

A mixin of :class:`rest_fast.train.loop.Trainer` (it uses the trainer's ``cfg``, ``env``, ``run_dir``, ``model``,
``optimizer``, ``scheduler``, ``inputs``), kept here so the loop holds only the hooks.

A mid-epoch checkpoint holds what an uninterrupted epoch would carry on with: the optimiser step reached in
the epoch (the loader restarts at the next micro-batch: ``step × per-rank batch`` samples into the epoch's
order), every rank's RNG state (restored once the loader is running, where the uninterrupted epoch stood), the
loss counters of the epoch and of the open ``log_every`` window, the scheduler and the gradient scaler — so the
resumed run's losses, weights and captions are identical to those of a run that was never stopped.
"""

from __future__ import annotations

from collections.abc import Callable

from rest_fast.train.preempt import (
    Control,
    Preempted,
    StopSignals,
    drop_mid_epoch_checkpoints,
    maybe_signal_self,
    mid_epoch_name,
)


class TrainingStateMixin:
    _signals: StopSignals | None = None
    _control: Control | None = None
    _mid_resume: dict | None = None
    _last_mid_epoch: str | None = None

    @property
    def signals(self) -> StopSignals:
        if self._signals is None:
            self._signals = StopSignals()
        return self._signals

    def _setup_precision_and_preemption(self) -> None:
        """After the optimiser exists (all ranks): check precision and accumulation, make the scaler and the
        stop/save control."""
        from rest_fast.errors import UserError
        from rest_fast.run.precision import PrecisionError, StepScaler, check_device_precision
        from rest_fast.train.accumulate import micro_batch_size

        cfg, env = self.cfg, self.env
        try:
            check_device_precision(env.device, cfg.precision)
        except PrecisionError as exc:
            raise UserError(str(exc)) from None
        micro_batch_size(self.inputs.per_rank_batch(), cfg.accum_steps, env.world_size)
        self.scaler = StepScaler(cfg.precision, env.device)
        self.control  # noqa: B018 - made here at the latest (every rank at the same point: a collective under torchrun)

    @property
    def control(self) -> Control:
        """The stop/save decisions (made on first use, which every rank reaches at the same point)."""
        if self._control is None:
            self._control = Control(self.env, self.signals, self.cfg.save_every_minutes)
        return self._control

    def _video_feature_source(self, key: str):
        """``(clip, batches)`` for :func:`~rest_fast.train.features.video_features`: unless its cache holds the
        features, this rank's rows are computed first, chunk by chunk (``features/video_parts/``, resumable:
        :mod:`rest_fast.train.round0_chunks`), and handed over as precomputed rows."""
        import torch

        from rest_fast.train import round0_chunks as rc

        cache_dir = self.run_dir.path("features")
        if rc.features_cached(cache_dir, key, self.env):
            return self.clip, lambda: self.inputs.eval_batches("clip")
        rows = rc.chunked_video_rows(
            self.clip, lambda start: self.inputs.eval_batches("clip", start=start), self.n, self.env,
            folder=cache_dir / "video_parts", key=key, batch_size=self.cfg.eval_batch_size, control=self.control,
            signals=self.signals, run_root=self.run_dir.root, amp=self.cfg.precision,
            progress=self._progress_bar("CLIP video features", self.inputs.eval_steps()))
        mine = torch.from_numpy(self.env.shard(self.n))
        return rc.PrecomputedRows(int(rows.shape[1])), (lambda: [(mine, rows)] if len(mine) else [])

    def _drop_video_parts(self) -> None:
        from rest_fast.train import round0_chunks as rc

        rc.drop_parts(self.run_dir.path("features", "video_parts"), self.env)

    def _load_step_state(self, train_state: dict) -> None:
        """The scaler's state, and (a mid-epoch checkpoint) where in the epoch to continue."""
        self.scaler.load_state_dict(train_state.get("scaler") or {})
        k = int(train_state.get("step_in_epoch", 0) or 0)
        if k:
            from rest_fast.errors import UserError

            rank, saved = self.env.rank, len(train_state.get("counters", {}))
            if saved != self.env.world_size:  # the epoch's order is split over ranks: it cannot be re-split mid-way
                raise UserError(f"the mid-epoch checkpoint was written by {saved} process(es), this run has "
                                f"{self.env.world_size}: resume with {saved}, or from an epoch checkpoint with "
                                "--resume RUN/checkpoints/epoch_XXXX")
            self._mid_resume = {"step_in_epoch": k, **train_state["counters"][rank],
                                "rng": train_state.get("rng", {}).get(rank)}

    def _take_mid_epoch_resume(self) -> tuple[int, dict | None]:
        """``(optimiser steps already done in this epoch, counters and RNG to continue with)``, once."""
        r, self._mid_resume = self._mid_resume, None
        if r is None:
            return 0, None
        return r["step_in_epoch"], {"window": r["window"], "total": r["total"], "rng": r["rng"]}

    def _step_end_hook(self, epoch: int, rnd: int, base_step: int) -> Callable[[int, Callable[[], dict]], bool]:
        """``on_step_end`` of :func:`self_train_epoch` for epoch ``epoch`` (0-based) after round ``rnd``."""

        def hook(step_in_epoch: int, counters: Callable[[], dict]) -> bool:
            maybe_signal_self("step", base_step + step_in_epoch)
            if step_in_epoch >= self.steps_per_epoch:
                return False  # the epoch's own checkpoint follows at once (then a signal stops the run)
            save, stop = self.control.decide()
            if save:
                self.save_mid_epoch(epoch, rnd, step_in_epoch, counters(), base_step + step_in_epoch)
            return stop

        return hook

    def save_mid_epoch(self, epochs_done: int, rnd: int, step_in_epoch: int, counters: dict, global_step: int) -> None:
        """Write ``checkpoints/epoch_EEEE_step_SSSSSS`` and point ``state.json`` at it (all ranks call this)."""
        from rest_fast.run.rundir import capture_rng
        from rest_fast.train.distributed import all_gather_objects, barrier

        env = self.env
        rngs = all_gather_objects(env, capture_rng())
        counts = all_gather_objects(env, counters)
        name = mid_epoch_name(epochs_done, step_in_epoch)
        if env.is_main:
            train_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                           "rng": dict(enumerate(rngs)), "step": global_step, "epoch": epochs_done, "round": rnd,
                           "scaler": self.scaler.state_dict(), "step_in_epoch": step_in_epoch,
                           "counters": dict(enumerate(counts))}
            ckpt = self.run_dir.save_checkpoint(
                epochs_done, self.model.state_dict(), train_state,
                {"round": rnd, "step": global_step, "world_size": env.world_size, "step_in_epoch": step_in_epoch},
                name=name)
            prev = self.run_dir.read_state() or {}
            self.run_dir.write_state({**prev, "epoch": epochs_done, "round": rnd,
                                      "checkpoint": str(ckpt.relative_to(self.run_dir.root))})
            drop_mid_epoch_checkpoints(self.run_dir.list_checkpoints(), keep=ckpt)
        self._last_mid_epoch = f"checkpoints/{name}"
        barrier(env)
        self.control.saved()

    def _stop_if_signalled(self, where: str, *, saved: bool = False) -> None:
        """At a point where everything done is on disk: raise :class:`Preempted` when a stop signal came (on any
        rank). ``saved``: a checkpoint was just written (the mid-epoch timer starts again)."""
        if saved:
            self.control.saved()
        _, stop = self.control.decide(timed=False)
        if stop:
            self._record_bad_files()
            raise Preempted(self.signals.signame, where, self.run_dir.root)
