"""``prepare``: decode every video once into WebDataset tar shards of JPEG frames.

Layout of a prepared directory ``OUT``::

    OUT/prepared.json          written last: format, settings, counts, class names, the source root
                               (the videos' common folder), the shard list (the completion mark)
    OUT/index.jsonl            one line per stored video (see :data:`ENTRY_FIELDS`; absolute source paths)
    OUT/shard-000000.tar ...   WebDataset shards; sample ``KEY`` = ``KEY.000.jpg`` ... + ``KEY.json``
    OUT/shard-000000.json      that shard's index lines (merged into index.jsonl at the end)
    OUT/manifest.json          progress: completed shards, bad files, next video to decode (resume)
    OUT/settings.json          the settings and the video list's digest (a resume must match them)
    OUT/bad_files.tsv/.json    videos that could not be decoded (path, reason, count)

Per video: the frames the robust decoder outputs (:func:`rest_fast.data.decode.read_frames`, the same
frame definition as the direct-video loaders), ``F`` of them kept at the centres of ``F`` uniform
segments (:func:`~rest_fast.data.decode.sample_indices`; a video with ``N <= F`` frames keeps all ``N``,
so reading it back samples exactly the frames the direct path samples), display rotation applied, the
shorter side resized to ``short_side`` (never enlarged), JPEG at ``quality``. The sample's ``json``
holds ``path``, ``label``, ``num_decoded`` (N), ``fps``, ``frame_indices`` (source index of each stored
frame), ``height``/``width`` of the stored frames.

Crash safety: a shard is written to ``.shard-NNNNNN.tar.tmp``, flushed, fsynced and renamed; only then is
its index written and the manifest updated (both atomically). A killed run resumes at the manifest's
``next`` video; leftover temporary files and shards the manifest does not list are deleted first, so
the output never holds a partial shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import tarfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from rest_fast.atomic_io import atomic_write_text
from rest_fast.errors import UserError

FORMAT = "rest_fast.shards"
VERSION = 1
ENTRY_FIELDS = ("id", "key", "path", "label", "shard", "offset", "size", "frames", "num_decoded", "height", "width")

__all__ = ["prepare", "PrepareResult", "parse_size", "encode_video", "FORMAT", "VERSION", "ENTRY_FIELDS"]


def parse_size(text: str | int) -> int:
    """Bytes from ``"1GB"``, ``"500MB"``, ``"64MiB"``, ``"1e9"`` or an int (decimal K/M/G/T, binary KiB...)."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
        if not m:
            raise ValueError(f"shard_size must look like 1GB, 500MB or a byte count, got {text!r}")
        base = 1024 if m.group(3) else 1000
        n = int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))
    if n < 1:
        raise ValueError(f"shard_size must be positive, got {text!r}")
    return n


# ------------------------------------------------------------------------------------------- one video
def _target_size(h: int, w: int, short_side: int | None) -> tuple[int, int]:
    s = min(h, w)
    if not short_side or s <= short_side:
        return h, w
    scale = short_side / s
    nh, nw = (short_side, max(1, round(w * scale))) if h <= w else (max(1, round(h * scale)), short_side)
    return nh, nw


def encode_video(path: str, frames: int = 32, short_side: int | None = 256, quality: int = 90):
    """Decode ``path`` once and return ``(jpegs, meta)``: the stored frames as JPEG bytes and the sample's
    json dict (see the module doc). Raises :class:`~rest_fast.data.decode.VideoDecodeError`."""
    from PIL import Image

    from rest_fast.data.decode import SWSCALE_KW, VideoDecodeError, _rotation, read_frames

    decoded, idx = read_frames(path, frames, train=False, convert=None)
    keep, seen = [], set()
    for f, i in zip(decoded, idx):  # N < F repeats the last frame: store each source frame once
        if i not in seen:
            seen.add(i)
            keep.append((f, i))
    sizes = {((f.width, f.height) if _rotation(f) % 2 else (f.height, f.width)) for f, _ in keep}
    if len(sizes) != 1:
        raise VideoDecodeError(path, f"frame size changes inside the clip: {sorted(sizes)}")
    h, w = sizes.pop()
    th, tw = _target_size(h, w, short_side)
    jpegs = []
    try:
        for f, _ in keep:
            k = _rotation(f)
            ch, cw = (tw, th) if k % 2 else (th, tw)  # coded size before the display rotation
            # scale in the decoder's pixel format, then convert: ~1.5x cheaper than swscale's scale+convert
            if (cw, ch) != (f.width, f.height):
                f = f.reformat(width=cw, height=ch, interpolation="AREA", **SWSCALE_KW)
            a = f.to_ndarray(format="rgb24", **SWSCALE_KW)
            if k:
                a = np.ascontiguousarray(np.rot90(a, k))
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=quality)
            jpegs.append(buf.getvalue())
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"frame conversion failed: {e.strerror or e}") from None
    fps = None
    try:
        with av.open(path) as c:
            rate = c.streams.video[0].average_rate
            fps = float(rate) if rate else None
    except Exception:  # noqa: BLE001 - fps is informational only
        fps = None
    n = _num_decoded(path, idx, frames)
    meta = {"path": path, "num_decoded": n, "fps": fps, "frame_indices": [i for _, i in keep],
            "height": th, "width": tw}
    return jpegs, meta


def _num_decoded(path: str, idx: list[int], frames: int) -> int:
    """``N`` for the sampled ``idx`` (read_frames does not return it): the probe's count (packets on a
    trusted file, else a full decode), checked against ``idx``; a full lenient decode when they disagree."""
    from rest_fast.data.decode import count_frames, probe_video, sample_indices

    n = probe_video(path).num_frames
    if sample_indices(n, frames) != idx:
        n = count_frames(path)
    return n


def _init_worker() -> None:
    """Decoding workers die with the prepare process (a SIGKILL of the main process alone would
    otherwise leave them waiting on the task queue forever). Linux only; elsewhere a no-op."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _work(task):
    i, path, frames, short_side, quality = task
    from rest_fast.data.decode import VideoDecodeError

    try:
        jpegs, meta = encode_video(path, frames, short_side, quality)
        return i, jpegs, meta, None
    except VideoDecodeError as e:
        return i, None, None, e.reason
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a dataset-wide job
        return i, None, None, f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------- the writer
class _ShardWriter:
    """One shard being written to a temporary name; :meth:`commit` renames it into place."""

    def __init__(self, out: Path, number: int):
        self.name = f"shard-{number:06d}.tar"
        self.final = out / self.name
        self.tmp = out / f".{self.name}.tmp"
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.entries: list[dict] = []

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, entry: dict, jpegs: list[bytes], meta: dict) -> None:
        start = self.tar.offset
        key = entry["key"]
        for k, data in enumerate(jpegs):
            self._add(f"{key}.{k:03d}.jpg", data)
        self._add(f"{key}.json", json.dumps(meta).encode())
        entry.update(shard=self.name, offset=start, size=self.tar.offset - start)
        self.entries.append(entry)

    @property
    def bytes(self) -> int:
        return self.tar.offset

    def commit(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.tar.close()
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


@dataclass
class PrepareResult:
    """What :func:`prepare` did: ``out`` dir, videos stored, bad files, shards, seconds, resumed from."""

    out: Path
    num_videos: int
    num_bad: int
    num_shards: int
    seconds: float
    resumed_from: int
    decoded_now: int


# names prepare writes; only these are ever replaced or deleted in ``out``
_OWN_FILES = ("settings.json", "manifest.json", "index.jsonl", "prepared.json", "bad_files.tsv", "bad_files.json")
_SHARD = re.compile(r"shard-(\d{6})\.(tar|json)")
# temporaries: a shard being written, and rest_fast.atomic_io's ".NAME.XXXXXXXX.tmp"
_OWN_TMP = re.compile(r"\.shard-\d{6}\.tar\.tmp|\.(?:" + "|".join(re.escape(n) for n in _OWN_FILES)
                      + r"|shard-\d{6}\.json)\.[A-Za-z0-9_]+\.tmp")


def _check_ours(out: Path) -> None:
    """``out`` must be new, empty, or a prepare output (its ``settings.json`` says so): never write into,
    or delete from, a folder of someone else's files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    # the folder's lock (`.lock`, taken by the prepare command around this call) is not content
    entries = sorted(f.name for f in out.iterdir() if f.name != ".lock" and not f.name.startswith(".lock."))
    if not entries:
        return
    try:
        ours = json.loads((out / "settings.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise UserError(f"--out {out} already holds files that are not a `rest-fast prepare` output ({shown}); "
                         "pass a new or empty folder (nothing in it is changed or deleted)")


def _remove_leftovers(out: Path, manifest: dict) -> None:
    """Delete what a killed prepare left behind — our temporaries, and the one shard committed after the
    manifest was last written — and refuse to go on over shards the manifest cannot explain."""
    listed = {s["name"] for s in manifest["shards"]}
    nxt = len(manifest["shards"])  # the only shard number a killed run can have left unlisted
    foreign = []
    for f in sorted(out.iterdir()):
        m = _SHARD.fullmatch(f.name)
        if _OWN_TMP.fullmatch(f.name):
            f.unlink()
        elif m and f.name.rsplit(".", 1)[0] + ".tar" not in listed:
            if int(m.group(1)) == nxt:
                f.unlink()
            else:
                foreign.append(f.name)
    if foreign:
        raise UserError(f"{out} holds shards its manifest does not list ({', '.join(foreign[:5])}): they were not "
                         "written by this prepare run; move them away or use another --out")


def _digest(paths: Sequence[str], labels) -> str:
    h = hashlib.sha256()
    for k, p in enumerate(paths):
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0" + str(None if labels is None else labels[k]).encode() + b"\n")
    return h.hexdigest()


def _load_index(data, data_root):
    """(index with absolute paths, the folder its paths are relative to: the class root or the list's root)."""
    from rest_fast.data.index import VideoIndex

    if isinstance(data, VideoIndex):
        index, root = data, None
    else:
        p = Path(data)
        if p.is_dir():
            index, root = VideoIndex.from_folder(p), p
        elif p.is_file():
            root = Path(data_root) if data_root is not None else p.parent
            index = VideoIndex.from_list(p, root, skip_missing=True)
        else:
            raise FileNotFoundError(f"data={str(data)!r} is neither a folder of class sub-folders nor a list file")
    index = VideoIndex([os.path.abspath(q) for q in index.paths], index.labels, index.class_names,
                       [os.path.abspath(q) for q in index.missing],
                       {os.path.abspath(q): why for q, why in index.bad_reasons.items()})
    return index, None if root is None else os.path.abspath(root)


def prepare(data, out: str | os.PathLike, *, frames: int = 32, short_side: int | None = 256, quality: int = 90,
            workers: int | None = None, shard_size: str | int = "1GB", data_root: str | None = None,
            progress: bool = True, max_videos: int | None = None) -> PrepareResult:
    """Decode the videos of ``data`` (list file, class-folder root or a :class:`VideoIndex`) into shards.

    Args:
        frames: F, frames stored per video (use F >= the T you will train with).
        short_side: resize so the shorter side is this (never enlarges; ``None``/0 keeps the size).
        quality: JPEG quality (1-95).
        workers: decoding processes (default: CPU count; 0 = in this process).
        shard_size: start a new shard once one holds this many bytes ("1GB", "500MB", int).
        data_root: root of a list file's relative paths (default: the list's folder).
        max_videos: stop after this many videos of the list (the next call continues; tests, trials).

    Resumes a killed run in the same ``out`` (settings must match); a finished ``out`` returns at once.
    """
    from tqdm import tqdm

    from rest_fast.data.bad_files import BadFilesReport

    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if short_side is not None and (not isinstance(short_side, int) or short_side < 0):
        raise ValueError(f"short_side must be a non-negative int or None, got {short_side!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    limit = parse_size(shard_size)
    index, source_root = _load_index(data, data_root)
    out = Path(out)
    _check_ours(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    settings = {"format": FORMAT, "version": VERSION, "frames": frames, "short_side": short_side or None,
                "quality": quality, "shard_size": limit, "num_listed": len(index),
                "list_digest": _digest(index.paths, index.labels)}
    sfile = out / "settings.json"
    if sfile.exists():
        old = json.loads(sfile.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise UserError(f"{out} holds a prepare run with other settings ({', '.join(diff)} differ); "
                             "use another --out or delete it")
    else:
        atomic_write_text(sfile, json.dumps(settings, indent=1))

    mfile = out / "manifest.json"
    manifest = json.loads(mfile.read_text()) if mfile.exists() else {"shards": [], "bad": [], "next": 0}
    _remove_leftovers(out, manifest)
    start = int(manifest["next"])
    stop = len(index) if max_videos is None else min(len(index), start + max_videos)
    done_marker = out / "prepared.json"

    if start < stop:
        done_marker.unlink(missing_ok=True)
        nworkers = (os.cpu_count() or 1) if workers is None else workers
        width = max(6, len(str(len(index) - 1)))
        # imap returns results in list order: a slow video holds back the ones after it, so bound the
        # number of tasks in flight (their JPEGs wait in memory) instead of queueing the whole list
        window, halt = threading.Semaphore(max(8, 8 * nworkers)), threading.Event()

        def tasks():
            for i in range(start, stop):
                while not window.acquire(timeout=0.1):
                    if halt.is_set():
                        return
                yield i, index.paths[i], frames, short_side, quality
        bar = tqdm(total=len(index), initial=start, disable=not progress, unit="video", desc="prepare",
                   dynamic_ncols=True)
        writer: _ShardWriter | None = None
        pending_bad: list = []

        def checkpoint(nxt: int) -> None:
            nonlocal writer
            if writer is not None:
                writer.commit()
                atomic_write_text(out / writer.name.replace(".tar", ".json"),
                              "".join(json.dumps(e) + "\n" for e in writer.entries))
                manifest["shards"].append({"name": writer.name, "videos": len(writer.entries), "bytes": writer.bytes})
                writer = None
            manifest["bad"].extend(pending_bad)
            pending_bad.clear()
            manifest["next"] = nxt
            atomic_write_text(mfile, json.dumps(manifest))

        pool = mp.get_context("fork").Pool(nworkers, initializer=_init_worker) if nworkers > 0 else None
        try:
            results = pool.imap(_work, tasks(), chunksize=1) if pool else map(_work, tasks())
            for i, jpegs, meta, err in results:
                if err is not None:
                    pending_bad.append([i, index.paths[i], err])
                else:
                    if writer is None:
                        writer = _ShardWriter(out, len(manifest["shards"]))
                    label = None if index.labels is None else index.labels[i]
                    meta["label"] = label
                    entry = {"id": i, "key": f"{i:0{width}d}", "path": index.paths[i], "label": label,
                             "frames": len(jpegs), "num_decoded": meta["num_decoded"],
                             "height": meta["height"], "width": meta["width"]}
                    writer.add(entry, jpegs, meta)
                    if writer.bytes >= limit:
                        checkpoint(i + 1)
                window.release()
                bar.update(1)
                bar.set_postfix(bad=len(manifest["bad"]) + len(pending_bad), shards=len(manifest["shards"]),
                                refresh=False)
            checkpoint(stop)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            halt.set()
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()

    decoded_now = stop - start
    if int(manifest["next"]) < len(index):  # stopped early on purpose (max_videos)
        return PrepareResult(out, sum(s["videos"] for s in manifest["shards"]), len(manifest["bad"]),
                             len(manifest["shards"]), time.perf_counter() - t0, start, decoded_now)
    if not done_marker.exists():
        lines = []
        for s in manifest["shards"]:
            lines.append((out / s["name"].replace(".tar", ".json")).read_text())
        atomic_write_text(out / "index.jsonl", "".join(lines))
        report = BadFilesReport()
        for p in index.missing:
            report.add(p, index.bad_reasons.get(p, "missing file"))
        for _, p, reason in manifest["bad"]:
            report.add(p, reason)
        report.write(out)
        info = {**settings, "num_videos": sum(s["videos"] for s in manifest["shards"]),
                "num_bad": len(report), "num_shards": len(manifest["shards"]),
                "class_names": index.class_names, "labelled": index.labels is not None,
                "source_root": source_root,
                "shards": [s["name"] for s in manifest["shards"]],
                "bytes": sum(s["bytes"] for s in manifest["shards"])}
        atomic_write_text(done_marker, json.dumps(info, indent=1))
    info = json.loads(done_marker.read_text())
    return PrepareResult(out, info["num_videos"], info["num_bad"], info["num_shards"], time.perf_counter() - t0,
                         start, decoded_now)
