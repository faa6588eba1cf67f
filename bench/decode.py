"""Clip decoding throughput: clips/s at 8 x 224 per backend and worker count, vs plain sequential PyAV.

Clips: generated 10 s, 30 fps, 604x340 videos (moving texture; h264 via libx264 crf 28 / veryfast, whose
defaults give B-frames and keyframes at scene cuts; VP9 via libvpx realtime), cached in --cache.
Rows: ``plain`` (header frame count + sequential decode, one thread: the baseline), ``reference`` (decoded
count + sequential decode), ``fast`` (rest_fast's verified keyframe-jump / NONREF-skip path as production
runs it outside DataLoader workers: 2 frame threads, ``decode_threads()``), ``fast-1thread`` (the same with one
decoding thread, as inside DataLoader workers), the PyAV DataLoader with 1 and 2 workers, and DALI when
installed. Single-clip rows also report clips per CPU-second of this process (``cpu_clips_s``, all threads),
which other jobs on a shared machine do not distort; loader rows include worker start-up (wall time only).

    python bench/decode.py [--quick] [--device cuda] [--summary FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness  # noqa: E402
import video_fixtures as vf  # noqa: E402

from rest_fast.data import PyAVClipLoader, VideoIndex, read_clip  # noqa: E402
from rest_fast.data import decode as D  # noqa: E402

T, S = 8, 224
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def make_clip(path: Path, codec: str, seconds: float) -> Path:
    if path.exists():
        return path
    n = int(30 * seconds)
    tex = np.random.default_rng(0).normal(0, 10, size=(400, 700, 3)).astype(np.float32)

    def frame(i):
        img = vf.textured_frame(i, 604, 340).astype(np.float32)
        img += tex[(i // 2) % 40:(i // 2) % 40 + 340, i % 60:i % 60 + 604]
        return np.clip(img, 0, 255).astype(np.uint8)

    opts = {"preset": "veryfast", "crf": "28"} if codec == "h264" else {"deadline": "realtime", "cpu-used": "8"}
    tmp = path.with_suffix(".part" + path.suffix)
    vf.write_video(tmp, (frame(i) for i in range(n)), codec, options=opts)
    os.replace(tmp, path)
    return path


def cpu_seconds(fn, reps: int) -> float:
    """Median process CPU time of ``fn()`` (all threads of this process): robust to other jobs sharing the
    cores, which inflate wall time but not the CPU time a clip costs."""
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return float(np.median(ts))


def dali_rows(clips: dict, device: str, table, base: dict, quick: bool) -> str:
    try:
        from rest_fast.data.dali import DALIClipLoader, dali_available
    except ImportError as e:
        return f"DALI: not importable ({e})"
    ok, why = dali_available()
    if not ok:
        return f"DALI: absent ({why})"
    dev = "mixed" if device == "cuda" else "cpu"
    notes = []
    for codec, path in clips.items():
        if dev == "cpu" and codec == "h264":
            notes.append("DALI cpu cannot decode h264 (skipped)")
            continue
        n = 4 if quick else 16
        idx = VideoIndex.from_paths([str(path)] * n)
        try:
            ld = DALIClipLoader(idx, batch_size=4, num_frames=T, size=S, mean=MEAN, std=STD, decoder_device=dev,
                                device=device, num_threads=2)
            next(iter(ld))  # warm-up (pipeline build)
            t0 = time.perf_counter()
            for _ in ld:
                pass
            dt = time.perf_counter() - t0
            rate = n / dt
            table.add(codec=codec, backend=f"dali-{dev}", workers=2, clips_s=rate, ratio=rate / base[codec])
        except Exception as e:  # noqa: BLE001 - a bench reports, it does not crash
            notes.append(f"DALI {codec} failed: {type(e).__name__}: {e}")
    return "; ".join(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="3 s clips and short timings (CPU smoke run)")
    ap.add_argument("--cache", default=os.environ.get("REST_FAST_BENCH_CACHE", "/tmp/rest_fast_bench_videos"))
    ap.add_argument("--summary", default=None, help="append the compact table to this file")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    secs = 3 if args.quick else 10
    clips = {"h264": make_clip(cache / f"bench_{secs}s_340p.mp4", "h264", secs),
             "vp9": make_clip(cache / f"bench_{secs}s_340p.webm", "vp9", secs)}
    table = harness.Table("decode", ["codec", "backend", "workers", "clips_s", "ratio", "cpu_clips_s", "cpu_ratio"])
    base, cpu_base = {}, {}
    min_time = 0.5 if args.quick else 2.0
    for codec, path in clips.items():
        for method in ("plain", "reference", "fast", "fast-1thread"):
            row_name = method
            if method == "fast-1thread":
                os.environ["REST_FAST_DECODE_THREADS"] = "1"
                method = "fast"
            D.reset_verification()
            read_clip(path, T, size=S, method=method)  # warm-up (and, for fast, nothing to verify)
            t = harness.time_fn(lambda m=method, p=path: read_clip(p, T, size=S, method=m), warmup=1, min_time_s=min_time,
                                max_reps=20)
            rate = 1e3 / t.median_ms
            cpu = 1.0 / cpu_seconds(lambda m=method, p=path: read_clip(p, T, size=S, method=m), 3 if args.quick else 5)
            base.setdefault(codec, rate)
            cpu_base.setdefault(codec, cpu)
            os.environ.pop("REST_FAST_DECODE_THREADS", None)
            table.add(codec=codec, backend=f"pyav-{row_name}", workers=0, clips_s=rate, ratio=rate / base[codec],
                      cpu_clips_s=cpu, cpu_ratio=cpu / cpu_base[codec])
        n = 8 if args.quick else 16
        for workers in (1, 2):
            idx = VideoIndex.from_paths([str(path)] * n)
            ld = PyAVClipLoader(idx, batch_size=4, num_frames=T, size=S, mean=MEAN, std=STD, num_workers=workers,
                                device=args.device)
            t0 = time.perf_counter()
            for _ in ld:
                pass
            rate = n / (time.perf_counter() - t0)  # includes worker start-up: a conservative figure
            table.add(codec=codec, backend="pyav-loader", workers=workers, clips_s=rate, ratio=rate / base[codec])
    note = dali_rows(clips, args.device, table, base, args.quick)
    hw = harness.hardware_name(args.device)
    text = f"decode ({T}x{S}, {secs} s 604x340 clips, ratio vs pyav-plain) on {hw}\n{table.format()}"
    if note:
        text += f"\n{note}"
    print(text)
    table.save(hw, {"quick": args.quick})
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
