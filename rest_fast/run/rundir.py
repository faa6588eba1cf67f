"""The run directory: everything a run made, written so that ``kill -9`` never corrupts it.

Layout::

    RUN/
      config.yaml               resolved TrainConfig
      state.json                the last complete point: epoch, round, checkpoint, cache snapshot
      .rest_fast_run            marker: this folder was made by `rest-fast train` (we write and delete only here)
      .lock                     pid/host of the trainer using the folder (see :class:`RunLock`)
      videos.json               count, hash and list of the videos the run was made from (resume checks it)
      checkpoints/epoch_XXXX/   model.safetensors, train_state.pt (optimiser, scheduler, RNG: tensors and
                                plain numbers only, loaded with ``weights_only=True``), meta.json (with the
                                SHA-256 of both files, checked on every load)
      cache/round_XX.rfcc       CaptionCache snapshot after round XX (its own atomic save); under torchrun
                                round_XX.rankRRR_ofPPP.{npz,texts.rfcc,dict.rfcc} per rank + round_XX.sharded.json
      captions/initial.jsonl    the T x P initial BLIP captions of every video
      captions/round_XX.jsonl   per video: K captions with scores (+ the caption generated that round)
      features/                 frozen-CLIP video features (memory-mapped), neighbour graph, caption features
      metrics.jsonl             one JSON record per line: step, epoch and round records
      bad_files.json            files that could not be decoded
      plots/, report.html       written by :mod:`rest_fast.train.report`
      tensorboard/, wandb/      live dashboards when ``log_to`` names them (:mod:`rest_fast.run.sinks`);
      wandb_run.json            the W&B run id, so a resumed run continues the same W&B run

Atomicity: every file is written to a temporary name in the same folder, fsynced, then renamed over
the final name (rename is atomic on POSIX), and the folder is fsynced. A checkpoint is a folder
written under a temporary name and renamed whole, so a checkpoint folder exists only complete.
``state.json`` is replaced last, so it always names files that exist. ``metrics.jsonl`` is appended
line by line; a torn last line (a kill mid-write) is ignored when read and dropped on resume.

Integrity: a checkpoint whose files do not match the checksums in its ``meta.json`` (a flipped bit, a
truncated copy) is never loaded: :meth:`RunDir.load_checkpoint` raises :class:`CheckpointCorrupt` and
the trainer and ``eval`` fall back to the newest intact checkpoint, saying so. Paths read from
``state.json`` must stay inside the run folder (:meth:`RunDir.inside`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import socket
import time
import warnings
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
    make_temp_dir,
)
from rest_fast.errors import UserError

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
MARKER_FILE = ".rest_fast_run"
LOCK_FILE = ".lock"
VIDEOS_FILE = "videos.json"
CHECKPOINT_FILES = ("model.safetensors", "train_state.pt")


class CheckpointCorrupt(ValueError):
    """A checkpoint folder whose files are missing, altered (checksum mismatch) or not plain data."""


class ForeignFolderError(ValueError):
    """``--out`` holds files that ``rest-fast train`` did not write: we neither use nor delete them."""


class UnsafePath(UserError):
    """A path read from a run's own files that would lead outside the run folder (or to a file that is not
    the run's): one line from the CLI."""


class VideoListChanged(ValueError):
    """The videos differ from those the run was made from (its captions are stored by position)."""


class RunLockedError(RuntimeError):
    """Another live trainer holds the run folder's lock."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_relative(root: str | Path, rel: str, what: str) -> Path:
    """``root / rel`` for a path read from a file inside ``root``; refuses absolute paths, ``..`` and links
    that leave ``root`` (a hand-edited or planted file must not make us read or delete elsewhere)."""
    root = Path(root)
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts or "\0" in rel:
        raise UnsafePath(f"{what}: {rel!r} is not a path inside {root}")
    p = root / rel
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(p)]) != real_root:
        raise UnsafePath(f"{what}: {rel!r} leads outside {root} (not a path inside it)")
    return p


def atomic_torch_save(obj: Any, path: str | Path) -> str:
    """Save ``obj`` (tensors and plain Python values only) atomically; returns the file's SHA-256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Save ``tensors`` as safetensors atomically; returns the file's SHA-256."""
    from safetensors.torch import save

    # safetensors refuses shared storage; checkpoints hold independent copies.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = save(flat, metadata=metadata)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def atomic_save_numpy(path: str | Path, array) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def iter_jsonl(path: str | Path):
    """Records of a JSONL file, one at a time (never the whole file in memory); a torn or malformed line (a kill
    mid-append) is skipped, and a missing file has none."""
    try:  # open, not exists() then open: the file may be replaced or removed between the two (a resume)
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file (:func:`iter_jsonl` as a list)."""
    return list(iter_jsonl(path))


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

    def inside(self, rel: str, what: str) -> Path:
        """A path read from one of the run's files, refused unless it stays inside the run folder."""
        return safe_relative(self.root, rel, what)

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
        """Round ``r``'s caption cache of a one-process run (``CaptionCache.save``)."""
        return self.root / "cache" / f"round_{r:02d}.rfcc"

    def sharded_cache_index(self, r: int) -> Path:
        """The index of round ``r``'s caption cache saved by a run under torchrun (``ShardedCaptionCache.save``)."""
        return self.root / "cache" / f"round_{r:02d}.sharded.json"

    def saved_cache(self, r: int) -> Path | None:
        """Round ``r``'s saved caption cache (one file, or the index of per-rank files), or None."""
        for p in (self.cache_path(r), self.sharded_cache_index(r)):
            if p.is_file():
                return p
        return None

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
    def save_checkpoint(self, epoch: int, model_state: dict[str, torch.Tensor], train_state: dict, meta: dict,
                        *, name: str | None = None) -> Path:
        """Write ``checkpoints/epoch_XXXX/`` (or ``checkpoints/NAME/``, a mid-epoch one) whole: a temp folder
        renamed into place.

        ``train_state`` must hold tensors and plain Python values only (it is loaded with
        ``weights_only=True``); ``meta.json`` records the SHA-256 of both files."""
        final = self.checkpoint_dir(epoch) if name is None else self.root / "checkpoints" / name
        tmp = make_temp_dir(final.parent, f".{final.name}.")
        try:
            sums = {"model.safetensors": atomic_save_safetensors(model_state, tmp / "model.safetensors"),
                    "train_state.pt": atomic_torch_save(train_state, tmp / "train_state.pt")}
            atomic_write_json(tmp / "meta.json", {**meta, "epoch": epoch, "sha256": sums})
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

    def newest_intact_checkpoint(self, before: int | None = None) -> tuple[Path | None, list[str]]:
        """(the newest checkpoint that passes :func:`verify_checkpoint`, with an epoch < ``before`` if given;
        the problems of the newer ones skipped, one line each)."""
        skipped = []
        for p in reversed(self.list_checkpoints()):
            if before is not None and _epoch_of(p) >= before:
                continue
            problem = verify_checkpoint(p)
            if problem is None:
                return p, skipped
            skipped.append(problem)
        return None, skipped

    @staticmethod
    def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """(model state, train state, meta) of a checkpoint folder, after checking its checksums.

        Raises :class:`CheckpointCorrupt` for missing or altered files, and for a ``train_state.pt`` that
        holds anything but tensors and plain values (never unpickled with code execution)."""
        from safetensors.torch import load

        path = Path(path)
        if not (path / "meta.json").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
        meta, blobs = _read_verified(path)
        try:
            model_state = load(blobs["model.safetensors"])
        except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
            raise CheckpointCorrupt(f"{path / 'model.safetensors'}: not a readable safetensors file ({exc})") from exc
        try:
            train_state = torch.load(io.BytesIO(blobs["train_state.pt"]), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointCorrupt(
                f"{path / 'train_state.pt'} was refused: it must hold only tensors and plain values "
                f"(loaded with weights_only=True; {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from exc
        return model_state, train_state, meta

    # --- ownership and lock -------------------------------------------------------------------------
    @staticmethod
    def claim(root: str | Path) -> None:
        """Make ``root`` a run folder, or check it is one: it must be new, empty, or hold our marker
        (older runs: ``config.yaml`` + ``state.json``). Anything else raises :class:`ForeignFolderError`."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ForeignFolderError(f"--out {root} is a file, not a folder")
        if (root / MARKER_FILE).is_file():
            return
        if root.is_dir():
            entries = sorted(e.name for e in root.iterdir() if e.name != LOCK_FILE)
            legacy = (root / STATE_FILE).is_file() and (root / CONFIG_FILE).is_file()
            if entries and not legacy:
                shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
                raise ForeignFolderError(
                    f"--out {root} already holds files that are not a rest-fast run ({shown}); pass a new or "
                    "empty folder (nothing in it is changed or deleted)")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / MARKER_FILE, {"format": "rest_fast.run", "created": time.time()})

    # --- the video list -------------------------------------------------------------------------------
    def check_videos(self, videos: list[str], *, record: bool = False) -> None:
        """Record the ordered video list (``record``: a new run, or the first call), or check it is the one
        the run was made from.

        Raises ``ValueError`` naming how many videos were added and removed (and the first few) when
        the list changed: captions are stored by position, so a changed list would mix videos up."""
        now = {"count": len(videos), "sha256": video_list_hash(videos), "videos": list(videos)}
        path = self.root / VIDEOS_FILE
        if record or not path.is_file():
            if self.writable:
                atomic_write_json(path, now)
            return
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = {}
        if saved.get("sha256") == now["sha256"] and saved.get("count") == now["count"]:
            return
        raise VideoListChanged(describe_video_change(saved.get("videos") or [], videos, str(self.root)))


def _epoch_of(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[1])


def checksum_map(path: str | Path, meta: Any) -> dict[str, str]:
    """The SHA-256 map of checkpoint folder ``path``'s ``meta.json``, complete: one entry for each of
    :data:`CHECKPOINT_FILES` and nothing else.

    A map that lacks an entry (``{}``, or no map at all) leaves a file unverified: :class:`CheckpointCorrupt`
    (callers fall back to an older checkpoint). An entry naming any other file (``../../etc/passwd``) is
    :class:`UnsafePath`: a checkpoint only ever checks its own two files, so such a map was planted."""
    path = Path(path)
    sums = meta.get("sha256") if isinstance(meta, dict) else None
    if sums is not None and not isinstance(sums, dict):
        raise CheckpointCorrupt(f"{path / 'meta.json'}: 'sha256' is not a map of file checksums")
    sums = sums or {}
    other = sorted(str(k) for k in sums if k not in CHECKPOINT_FILES)
    if other:
        raise UnsafePath(f"{path / 'meta.json'} lists checksums of files that are not part of a checkpoint "
                         f"({', '.join(repr(o) for o in other[:3])}); only {' and '.join(CHECKPOINT_FILES)} belong "
                         "there: the file was altered, the checkpoint is not used")
    lacking = [n for n in CHECKPOINT_FILES if not isinstance(sums.get(n), str)]
    if lacking:
        raise CheckpointCorrupt(f"{path / 'meta.json'} has no checksum for {' and '.join(lacking)}: unverified, "
                                "treated as corrupt")
    return sums


def _read_verified(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(meta, file bytes) of a checkpoint whose files match ``meta.json``'s SHA-256s."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupt(f"{path / 'meta.json'} is unreadable ({exc})") from exc
    sums = checksum_map(path, meta)
    blobs = {}
    for name in CHECKPOINT_FILES:
        f = path / name
        if not f.is_file():
            raise CheckpointCorrupt(f"{f} is missing")
        blobs[name] = f.read_bytes()
        if sha256_bytes(blobs[name]) != sums[name]:
            raise CheckpointCorrupt(f"{f} does not match its checksum in meta.json (corrupted or altered)")
    return meta, blobs


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint folder is complete and its files match their checksums, else why not.

    Raises :class:`UnsafePath` when ``meta.json`` lists checksums of other files (see :func:`checksum_map`)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        return f"{path} is incomplete (no meta.json)"
    try:
        meta = json.loads((path / "meta.json").read_text())
        sums = checksum_map(path, meta)
        for name in CHECKPOINT_FILES:
            f = path / name
            if not f.is_file():
                return f"{f} is missing"
            if sha256_file(f) != sums[name]:
                return f"{f} does not match its checksum (corrupted or altered)"
    except CheckpointCorrupt as exc:
        return str(exc)
    except (OSError, ValueError, AttributeError) as exc:
        if isinstance(exc, UnsafePath):
            raise
        return f"{path}: unreadable ({exc})"
    return None


def video_list_hash(videos: list[str]) -> str:
    h = hashlib.sha256()
    for v in videos:
        h.update(v.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def describe_video_change(old: list[str], new: list[str], where: str, show: int = 3) -> str:
    """One message saying how the video list changed between a run and now."""
    old_set, new_set = set(old), set(new)
    added = [v for v in new if v not in old_set]
    removed = [v for v in old if v not in new_set]
    parts = []
    if added:
        parts.append(f"{len(added)} added (e.g. {', '.join(added[:show])})")
    if removed:
        parts.append(f"{len(removed)} removed (e.g. {', '.join(removed[:show])})")
    if not parts:
        parts.append("same videos in another order" if old else "the run's list is unreadable")
    return (f"the videos changed since the run at {where} was made ({len(old)} then, {len(new)} now: "
            f"{'; '.join(parts)}); its captions belong to the old list: restore the data or start a new run")


class RunLock:
    """An exclusive lock on a run folder: ``.lock`` holds the holder's pid, host and start time.

    Taken with a hard link (atomic, also on NFS). A lock whose pid is dead on this host is stale (a
    ``kill -9``): it is taken over with a warning. A live holder, or one on another host (whose pids we
    cannot check), makes :meth:`acquire` raise :class:`RunLockedError` naming it."""

    def __init__(self, root: str | Path, holder: str = "trainer") -> None:
        self.path = Path(root) / LOCK_FILE
        self.holder = holder  # what takes the lock, for the messages: "trainer", "prepare"
        self.held = False
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}

    def _holder(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text())
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.info['pid']}.{time.time_ns()}.tmp")
        atomic_write_json(tmp, self.info)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile: try again
                pid, host = holder.get("pid"), holder.get("host")
                if not isinstance(pid, int) or not isinstance(host, str):  # empty or garbage: we never write that
                    raise RunLockedError(
                        f"{self.path.parent} has a lock file that names no process (empty or not ours: "
                        f"{_peek(self.path)}); if no trainer or prepare is working on it, delete {self.path}")
                if host == self.info["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    stale = self.path.with_name(f"{LOCK_FILE}.stale.{pid}.{time.time_ns()}")
                    try:
                        os.rename(self.path, stale)  # only one contender wins the rename
                    except FileNotFoundError:
                        continue
                    stale.unlink(missing_ok=True)
                    warnings.warn(f"{self.path.parent}: taking over the lock of pid {pid} on {host}, which is no "
                                  "longer running (a killed trainer)", stacklevel=2)
                    continue
                since = holder.get("since")
                when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
                raise RunLockedError(
                    f"{self.path.parent} is in use by another {self.holder} (pid {pid} on host {host}{when}); wait for it "
                    f"to finish, or if it is surely gone, delete {self.path}")
            raise RunLockedError(f"could not take the lock {self.path} (it keeps changing hands)")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _peek(path: Path, n: int = 40) -> str:
    """The start of a small file, for a message: ``'empty'`` or its first ``n`` characters, repr'd."""
    try:
        with open(path, "rb") as f:
            head = f.read(n)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return "empty" if not head.strip() else repr(head.decode("utf-8", "replace"))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    # a zombie (killed, not yet reaped by its parent) holds nothing
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def capture_rng() -> dict:
    """RNG states of python, numpy and torch (CPU and CUDA) for a checkpoint: tensors and plain values only,
    so a checkpoint loads with ``weights_only=True``."""
    import random

    import numpy as np

    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": int(version), "state": torch.tensor(keys, dtype=torch.int64),
                        "gauss": None if gauss is None else float(gauss)},
             "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
