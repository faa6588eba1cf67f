"""The run directory: everything a run made, written so that ``kill -9`` never corrupts it.

Layout::

    RUN/
      config.yaml               resolved TrainConfig
      state.json                the last complete point: epoch, round, checkpoint, cache snapshot
      checkpoints/epoch_XXXX/   model.safetensors, train_state.pt (optimiser, scheduler, RNG), meta.json
      cache/round_XX.rfcc       CaptionCache snapshot after round XX (its own atomic save)
      captions/initial.jsonl    the T x P initial BLIP captions of every video
      captions/round_XX.jsonl   per video: K captions with scores (+ the caption generated that round)
      features/                 frozen-CLIP video features (memory-mapped), neighbour graph, caption features
      metrics.jsonl             one JSON record per line: step, epoch and round records
      bad_files.json            files that could not be decoded
      plots/, report.html       written by :mod:`rest_fast.train.report`

Atomicity: every file is written to a temporary name in the same folder, fsynced, then renamed over
the final name (rename is atomic on POSIX), and the folder is fsynced. A checkpoint is a folder
written under a temporary name and renamed whole, so a checkpoint folder exists only complete.
``state.json`` is replaced last, so it always names files that exist. ``metrics.jsonl`` is appended
line by line; a torn last line (a kill mid-write) is ignored when read and dropped on resume.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from rest_fast.atomic_io import (  # noqa: F401 - re-exported for the trainer's modules
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    fsync_dir,
)

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    # safetensors refuses shared storage; checkpoints hold independent copies.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def atomic_save_numpy(path: str | Path, array) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a torn or malformed line (a kill mid-append) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class RunDir:
    """Paths and durable writes of one run. Only rank 0 writes (see :mod:`rest_fast.train.distributed`)."""

    def __init__(self, root: str | Path, *, writable: bool = True) -> None:
        self.root = Path(root)
        self.writable = writable
        if writable:
            for sub in ("checkpoints", "cache", "captions", "features", "plots"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)

    # --- paths ------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    def cache_path(self, r: int) -> Path:
        return self.root / "cache" / f"round_{r:02d}.rfcc"

    def captions_path(self, r: int) -> Path:
        return self.root / "captions" / f"round_{r:02d}.jsonl"

    def checkpoint_dir(self, epoch: int) -> Path:
        return self.root / "checkpoints" / f"epoch_{epoch:04d}"

    # --- state -------------------------------------------------------------------------------------
    def read_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as exc:  # cannot happen with atomic writes; say so plainly if it does
            raise ValueError(f"{self.state_path} is not valid JSON ({exc}); the run directory was modified by hand") from exc
        return state

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, {**state, "time": time.time()})

    # --- metrics -----------------------------------------------------------------------------------
    def append_metric(self, record: dict) -> None:
        """Append one record as one line, flushed and fsynced (kill -9 leaves at most a torn last line)."""
        line = json.dumps({**record, "time": round(time.time(), 3)}, ensure_ascii=False) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def filter_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite metrics.jsonl atomically with only the records ``keep`` accepts (used on resume)."""
        atomic_write_jsonl(self.metrics_path, [r for r in self.read_metrics() if keep(r)])

    # --- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, model_state: dict[str, torch.Tensor], train_state: dict, meta: dict) -> Path:
        """Write ``checkpoints/epoch_XXXX/`` whole: a temp folder renamed into place."""
        final = self.checkpoint_dir(epoch)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=str(final.parent)))
        try:
            atomic_save_safetensors(model_state, tmp / "model.safetensors")
            atomic_torch_save(train_state, tmp / "train_state.pt")
            atomic_write_json(tmp / "meta.json", {**meta, "epoch": epoch})
            fsync_dir(tmp)
            if final.exists():  # a stale copy of the same epoch (from before a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        return final

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (temp folders start with '.')."""
        d = self.root / "checkpoints"
        if not d.exists():
            return []
        return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("epoch_") and (p / "meta.json").exists())

    def prune_checkpoints(self, keep: int, protect: Iterable[Path] = ()) -> None:
        """Delete all but the newest ``keep`` checkpoints (never one in ``protect``) and stale temp folders."""
        protect = {Path(p).resolve() for p in protect}
        ckpts = self.list_checkpoints()
        for p in ckpts[: max(0, len(ckpts) - keep)]:
            if p.resolve() not in protect:
                shutil.rmtree(p, ignore_errors=True)
        for p in (self.root / "checkpoints").glob(".epoch_*"):
            shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """(model state, train state, meta) of a checkpoint folder."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "meta.json").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
        model_state = load_file(str(path / "model.safetensors"))
        train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
        meta = json.loads((path / "meta.json").read_text())
        return model_state, train_state, meta


def capture_rng() -> dict:
    """RNG states of python, numpy and torch (CPU and CUDA) for a checkpoint."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
