"""Loaders end to end: clips/s of the DALI loaders vs the PyAV and CPU shard loaders, same clips, same run.

Every row is a whole loader as the trainer builds it (train mode: Table-10 augmentations, T = 8, S = 224,
normalised float batches on ``--device``): workers persistent across epochs, an untimed first epoch (worker
start-up, DALI pipeline build), then ``--epochs`` timed epochs; clips/s = clips delivered / wall seconds
(CUDA synchronised). ``ratio`` is clips/s over the ``pyav`` row's. Two more rows time the colour
augmentations of one batch on ``--device``: ``colour-batched`` (what the loaders run) against
``colour-per-clip`` (the per-clip loop it replaced); their ``ratio`` is over the per-clip row.

* ``pyav`` — :class:`~rest_fast.data.PyAVClipLoader` (PyAV decoding in ``--workers`` processes);
* ``shards`` — :class:`~rest_fast.data.shards.ShardClipLoader` (CPU JPEG reader of a prepared dir);
* ``dali-video`` — :class:`~rest_fast.data.DALIClipLoader` (NVDEC with ``--device cuda``; DALI's CPU
  variant otherwise, which decodes VP9, so the CPU run uses VP9 clips for every row);
* ``dali-shards`` — :class:`~rest_fast.data.shards.DALIShardLoader` (nvJPEG with ``--device cuda``).
* ``nvjpeg-shards`` — :class:`~rest_fast.data.shards.nvjpeg.NvJpegShardLoader` (torchvision's batched
  ``decode_jpeg`` on ``--device``: nvJPEG on CUDA, no DALI needed); a note gives its clips/s against ``shards``.

Clips: the generated 604x340 clip of bench/decode.py (h264 on CUDA, VP9 on CPU), listed ``--videos``
times. One summary line per loader is printed last (what bench/gpu_suite.sh collects); rows are appended
to bench/results/loaders.csv.

    python bench/loaders.py --device cuda                 # the GPU run
    python bench/loaders.py --quick                       # CPU smoke run (DALI's CPU variant)
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
import torch  # noqa: E402
from decode import make_clip  # noqa: E402  (bench/decode.py: the same generated clips)

from rest_fast.data import PyAVClipLoader, VideoIndex  # noqa: E402
from rest_fast.data.shards import PreparedIndex, ShardClipLoader, prepare  # noqa: E402
from rest_fast.data.workers import default_num_workers  # noqa: E402

T, S = 8, 224
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def time_loader(loader, epochs: int, device: torch.device) -> tuple[float, int]:
    """(clips/s over ``epochs`` timed epochs after one untimed epoch, clips per epoch)."""
    loader.set_epoch(0)
    n = sum(b.clips.shape[0] for b in loader)  # warm: workers forked, pipeline built, caches filled
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    m = 0
    for e in range(1, epochs + 1):
        loader.set_epoch(e)
        for b in loader:
            m += b.clips.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return m / (time.perf_counter() - t0), n


def colour_rows(table, device: torch.device, bs: int, quick: bool) -> None:
    """Flip/jitter/grayscale of one batch on ``device``: batched (what the loaders run) vs the per-clip loop
    (the baseline of this pair: ``ratio`` = batched clips/s over per-clip clips/s)."""
    import numpy as np

    from rest_fast.data import augment

    rng = np.random.default_rng(0)
    params = [augment.draw_train_params(rng, 256, 340) for _ in range(bs)]
    u8 = torch.randint(0, 256, (bs, T, S, S, 3), dtype=torch.uint8, device=device)
    kw = dict(device=device, warmup=1, min_time_s=0.3 if quick else 1.0, max_reps=10 if quick else 50)
    loop = harness.time_fn(lambda: [augment.apply_colour(u8[k], p) for k, p in enumerate(params)], **kw)
    batched = harness.time_fn(lambda: augment.apply_colour_batch(u8, params), **kw)
    for name, t in (("colour-per-clip", loop), ("colour-batched", batched)):
        table.add(loader=name, decoder="torch", workers=0, batch=bs, clips=bs, clips_s=bs / (t.median_ms * 1e-3),
                  ratio=loop.median_ms / t.median_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: NVDEC / nvJPEG rows)")
    ap.add_argument("--quick", action="store_true", help="few short clips, one timed epoch (CPU smoke run)")
    ap.add_argument("--videos", type=int, help="clips per epoch (default 512 on cuda, 64 on cpu, 8 quick)")
    ap.add_argument("--batch-size", type=int, help="per-rank batch (default 32 on cuda, 4 on cpu)")
    ap.add_argument("--workers", type=int, help="worker processes per loader (default: from the CPUs)")
    ap.add_argument("--epochs", type=int, help="timed epochs (default 2, quick 1)")
    ap.add_argument("--cache", default=os.environ.get("REST_FAST_BENCH_CACHE", "/tmp/rest_fast_bench_videos"))
    ap.add_argument("--summary", default=None, help="also append the summary lines to this file")
    args = ap.parse_args()
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    cuda = device.type == "cuda"
    codec = "h264" if cuda else "vp9"  # DALI's CPU variant decodes VP8/VP9/MJPEG only
    secs = 3 if args.quick else 10
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    clip = make_clip(cache / f"bench_{secs}s_340p.{'mp4' if codec == 'h264' else 'webm'}", codec, secs)
    n = args.videos or (8 if args.quick else (512 if cuda else 64))
    bs = args.batch_size or (32 if cuda else 4)
    workers = default_num_workers() if args.workers is None else args.workers
    epochs = args.epochs or (1 if args.quick else 2)
    index = VideoIndex.from_paths([str(clip)] * n)
    common = dict(batch_size=bs, mean=MEAN, std=STD, num_frames=T, size=S, train=True, seed=0, device=device,
                  drop_last=False, num_workers=workers, prefetch_factor=4, decode_timeout_s=60.0)
    table = harness.Table("loaders", ["loader", "decoder", "workers", "batch", "clips", "clips_s", "ratio"])
    notes: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="rest_fast_loaders_bench_"))
    try:
        t0 = time.perf_counter()
        res = prepare(VideoIndex.from_paths([str(clip)]), work / "prep", frames=32, short_side=256, quality=90,
                      workers=min(workers, 1), progress=False)
        one = PreparedIndex.load(res.out)
        # n entries of the one prepared video (the reader's cost per entry is the same; prepare runs once)
        prep = PreparedIndex([one.paths[0]] * n, None, None, entries=[one.entries[0]] * n, root=one.root,
                             info=one.info)
        notes.append(f"prepare: 1 video in {time.perf_counter() - t0:.1f} s (F=32, short side 256, q90), "
                     f"listed {n} times")
        rows = [("pyav", "PyAV", lambda: PyAVClipLoader(index, **common)),
                ("shards", "PIL JPEG", lambda: ShardClipLoader(prep, **common))]
        from rest_fast.data.shards.nvjpeg import NvJpegShardLoader, nvjpeg_available

        tv_ok, tv_why = nvjpeg_available(device)
        if tv_ok:  # the GPU decode path of the GPU image (no DALI there): batched decode_jpeg on --device
            rows.append(("nvjpeg-shards", f"torchvision {'nvJPEG' if cuda else 'libjpeg (cpu)'}",
                         lambda: NvJpegShardLoader(prep, **common)))
        else:
            notes.append(f"nvjpeg-shards row skipped: {tv_why}")
        from rest_fast.data.dali import dali_available

        ok, why = dali_available()
        if ok:
            from rest_fast.data.dali import DALIClipLoader
            from rest_fast.data.shards.dali import DALIShardLoader

            dec = "mixed" if cuda else "cpu"
            dali_kw = dict(common, decoder_device=dec, prefetch=min(4, max(1, n // bs)), num_threads=4 if cuda else 1)
            rows += [("dali-video", f"DALI {'NVDEC' if cuda else 'cpu'}", lambda: DALIClipLoader(index, **dali_kw)),
                     ("dali-shards", f"DALI {'nvJPEG' if cuda else 'cpu'}", lambda: DALIShardLoader(prep, **dali_kw))]
        else:
            notes.append(f"DALI rows skipped: nvidia-dali not importable ({why})")
        base = None
        for name, dec, make in rows:
            try:
                rate, per_epoch = time_loader(make(), epochs, device)
            except Exception as e:  # noqa: BLE001 - one failing loader must not hide the others' rows
                notes.append(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            base = rate if name == "pyav" else base
            table.add(loader=name, decoder=dec, workers=workers, batch=bs, clips=per_epoch, clips_s=rate,
                      ratio=rate / base if base else float("nan"))
        by = {r["loader"]: r["clips_s"] for r in table.rows}
        if "nvjpeg-shards" in by and by.get("shards"):
            notes.append(f"nvjpeg-shards vs the CPU shard reader: x{by['nvjpeg-shards'] / by['shards']:.2f} clips/s")
        colour_rows(table, device, bs, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hw = harness.hardware_name(device)
    head = (f"loaders (train, T={T}, S={S}, {secs} s 604x340 {codec} clips, {epochs} timed epoch(s), ratio vs pyav) "
            f"on {hw} ({os.cpu_count()} CPUs)")
    summary = [f"loaders: {r['loader']:<15} {r['clips_s']:8.1f} clips/s  x{r['ratio']:.2f} vs "
               f"{'per-clip' if r['loader'].startswith('colour') else 'pyav'}  "
               f"[{r['decoder']}, {args.device}, B={bs}, workers={r['workers']}]" for r in table.rows]
    print("\n".join([head, table.format(), *notes, *summary]))
    table.save(hw, {"quick": args.quick, "device": args.device, "codec": codec})
    if args.summary:
        with open(args.summary, "a") as f:
            f.write("\n".join([head, *summary, *notes]) + "\n\n")


if __name__ == "__main__":
    main()
