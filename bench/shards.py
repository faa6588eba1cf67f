"""Prepared shards: prepare throughput, bytes per clip, and read throughput (clips/s at 8 x 224) of the CPU
shard reader and DALI, against direct PyAV decoding of the same clips in the same run.

Clips: the generated 10 s, 30 fps, 604x340 h264 video of bench/decode.py (cached in --cache), listed
``--videos`` times (each entry is prepared and read as its own video). Prepare: F = 32 frames, short
side 256, JPEG quality 90, one decoding worker (videos/s per core; ``cpu_s`` counts the worker's and
this process's CPU time). Read rows: ``pyav-plain`` (header count + sequential decode, the plain
loader), ``pyav-fast`` (rest_fast's verified fast path, the video loader's default), then the shard
reader per clip (eval; train with the Table-10 augmentations; ``train-gpu-colour``: train minus flip /
jitter / grayscale, the worker's share when those run on the GPU as ``ShardClipLoader`` does with a
CUDA device), the shard DataLoader (1 and 2 workers, wall time with
start-up) and DALI (``mixed`` = nvJPEG with ``--device cuda``, ``cpu`` otherwise). ``ratio`` is clips/s
over ``pyav-fast`` clips/s; ``cpu_clips_s`` is clips per CPU-second of this process (robust to other
jobs on a shared machine) where the work runs in this process.

    python bench/shards.py [--quick] [--device cuda] [--summary FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness  # noqa: E402
from decode import cpu_seconds, make_clip  # noqa: E402  (bench/decode.py: the same generated clips)

from rest_fast.data import VideoIndex, read_clip  # noqa: E402
from rest_fast.data.shards import (  # noqa: E402
    PreparedIndex,
    ShardClipLoader,
    clip_from_sample,
    prepare,
    read_prepared_clip,
    read_sample,
)

T, S = 8, 224
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def dali_row(index: PreparedIndex, device: str, table, base: float, quick: bool) -> str:
    try:
        from rest_fast.data.dali import dali_available
        from rest_fast.data.shards.dali import DALIShardLoader
    except ImportError as e:
        return f"DALI: not importable ({e})"
    ok, why = dali_available()
    if not ok:
        return f"DALI: absent ({why})"
    dev = "mixed" if device == "cuda" else "cpu"
    bs = 8 if quick or dev == "cpu" else 64
    notes = []
    for mode, stream in (("eval", False), ("train-stream", True)):
        try:
            ld = DALIShardLoader(index, batch_size=bs, num_frames=T, size=S, mean=MEAN, std=STD, decoder_device=dev,
                                 device=device, num_threads=2 if dev == "cpu" else 8, drop_last=False,
                                 train=stream, stream=stream)
            next(iter(ld))  # pipeline build and warm-up
            reps = 1 if dev == "cpu" else 5
            t0 = time.perf_counter()
            n = 0
            for _ in range(reps):
                for b in ld:
                    n += b.clips.shape[0]
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            rate = n / (time.perf_counter() - t0)
            table.add(backend=f"dali-{dev}", mode=mode, workers=f"{ld._pipe_args['num_threads']} thr",
                      clips_s=rate, ratio=rate / base)
        except Exception as e:  # noqa: BLE001 - a bench reports, it does not crash
            notes.append(f"DALI {mode} failed: {type(e).__name__}: {e}")
    return "; ".join(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="3 s clips, fewer videos, short timings (CPU smoke run)")
    ap.add_argument("--videos", type=int, default=None, help="entries to prepare (default 16, quick 6)")
    ap.add_argument("--cache", default=os.environ.get("REST_FAST_BENCH_CACHE", "/tmp/rest_fast_bench_videos"))
    ap.add_argument("--summary", default=None, help="append the compact table to this file")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # single-clip rows measure one core (DataLoader workers use one thread too)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    secs = 3 if args.quick else 10
    clip = make_clip(cache / f"bench_{secs}s_340p.mp4", "h264", secs)
    n = args.videos or (6 if args.quick else 16)
    min_time = 0.5 if args.quick else 2.0
    work = Path(tempfile.mkdtemp(prefix="rest_fast_shards_bench_"))
    table = harness.Table("shards", ["backend", "mode", "workers", "clips_s", "ratio", "cpu_clips_s", "cpu_ratio"])
    try:
        # ---- prepare: one decoding worker, so videos/s is per core
        t_cpu0, t0 = os.times(), time.perf_counter()
        res = prepare(VideoIndex.from_paths([str(clip)] * n), work / "prep", frames=32, short_side=256, quality=90,
                      workers=1, progress=False)
        wall = time.perf_counter() - t0
        t_cpu1 = os.times()
        cpu = sum(t_cpu1[k] - t_cpu0[k] for k in range(4))  # user + sys, self + children
        index = PreparedIndex.load(res.out)
        total = sum((res.out / s).stat().st_size for s in index.info["shards"])
        per_clip = total / len(index)
        prep_line = (f"prepare: {n} videos in {wall:.1f} s with 1 worker = {n / wall:.2f} videos/s per core "
                     f"({n / cpu:.2f} videos per CPU-second); {per_clip / 1e6:.3f} MB per clip "
                     f"(F=32, short side 256, q90; {index.entries[0]['width']}x{index.entries[0]['height']} frames)")

        # ---- read: direct video decoding (baselines), then the shard reader
        rates = {}
        for method in ("plain", "fast"):
            read_clip(clip, T, size=S, method=method)
            t = harness.time_fn(lambda m=method: read_clip(clip, T, size=S, method=m), warmup=1,
                                min_time_s=min_time, max_reps=20)
            c = 1.0 / cpu_seconds(lambda m=method: read_clip(clip, T, size=S, method=m), 3 if args.quick else 5)
            rates[method] = (1e3 / t.median_ms, c)
        base, cpu_base = rates["fast"]
        for method in ("plain", "fast"):
            r, c = rates[method]
            table.add(backend=f"pyav-{method}", mode="eval", workers=0, clips_s=r, ratio=r / base, cpu_clips_s=c,
                      cpu_ratio=c / cpu_base)
        k0 = [0]

        def direct_train():
            k0[0] += 1
            return read_clip(clip, T, size=S, train=True, seed=k0[0])

        t = harness.time_fn(direct_train, warmup=1, min_time_s=min_time, max_reps=20)
        c = 1.0 / cpu_seconds(direct_train, 3 if args.quick else 5)
        train_base = (1e3 / t.median_ms, c)
        table.add(backend="pyav-fast", mode="train", workers=0, clips_s=train_base[0],
                  ratio=train_base[0] / base, cpu_clips_s=c, cpu_ratio=c / cpu_base)
        for mode in ("eval", "train", "train-gpu-colour"):
            tr = mode != "eval"

            def one(tr=tr, mode=mode, k=[0]):  # noqa: B006 - a call counter: next video, fresh seed
                k[0] += 1
                if mode == "train-gpu-colour":  # the worker's share when flip/jitter/gray run on the GPU
                    jpegs, meta = read_sample(index, k[0] % len(index))
                    return clip_from_sample(jpegs, meta, T, size=S, train=True, seed=k[0], colour=False)
                return read_prepared_clip(index, k[0] % len(index), T, size=S, train=tr, seed=k[0])

            t = harness.time_fn(one, warmup=2, min_time_s=min_time, max_reps=200)
            c = 1.0 / cpu_seconds(one, 10)
            r = 1e3 / t.median_ms
            table.add(backend="shards-cpu", mode=mode, workers=0, clips_s=r, ratio=r / base, cpu_clips_s=c,
                      cpu_ratio=c / cpu_base)
        for workers in (1, 2):
            ld = ShardClipLoader(index, batch_size=8, num_frames=T, size=S, mean=MEAN, std=STD, train=True,
                                 num_workers=workers, device=args.device, drop_last=False)
            t0 = time.perf_counter()
            m = 0
            for _ in range(1 if args.quick else 3):
                for b in ld:
                    m += b.clips.shape[0]
            r = m / (time.perf_counter() - t0)
            table.add(backend="shards-loader", mode="train", workers=workers, clips_s=r, ratio=r / base)
        note = dali_row(index, args.device, table, base, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hw = harness.hardware_name(args.device)
    text = (f"shards ({T}x{S}, {secs} s 604x340 h264 clips, ratio vs pyav-fast) on {hw} ({os.cpu_count()} CPUs)\n"
            f"{prep_line}\n{table.format()}")
    if note:
        text += f"\n{note}"
    print(text)
    table.save(hw, {"quick": args.quick, "mb_per_clip": round(per_clip / 1e6, 4),
                    "prepare_videos_s_per_core": round(n / wall, 3)})
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
