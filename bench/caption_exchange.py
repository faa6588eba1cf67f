"""What a sharded caption cache costs a training step: the per-step caption exchange under torchrun.

    torchrun --standalone --nproc-per-node 4 bench/caption_exchange.py -- --n 100000 --batch 64

With the caption cache sharded over ranks (``rest_fast.cache.sharded``), each optimiser step draws one slot caption
per clip from the replicated slot ids and fetches the texts from the ranks holding them
(``ShardedCaptionCache.sample_texts``: one all-to-all of ids and one of UTF-8 bytes, on a CPU gloo group in the
trainer). The baseline, measured in the same run on the same ranks, is the one-process path: every rank holding
the whole cache (``CaptionCache.sample`` + ``texts``, no communication). Rank 0 prints both per-step times, their
ratio, then the time per step around a stand-in training step (``--step-ms`` of sleep) with the captions fetched
inline and one step ahead (``CaptionPrefetch``, the trainer's path), the bytes each rank sent per step and the caption strings each rank holds, and appends a row to
``bench/results/caption_exchange.csv``. Times are medians over ``--steps`` steps after warm-up; on a shared CPU
machine the load is printed with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="videos")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="clips per rank per optimiser step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-ms", type=float, default=20.0,
                    help="a stand-in training step (sleep, no CPU) for the prefetch rows")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch.distributed as dist
    from harness import Table, hardware_name, summarize

    from rest_fast.cache import CaptionCache
    from rest_fast.cache.sharded import ShardedCaptionCache

    dist.init_process_group("gloo")
    P, rank = dist.get_world_size(), dist.get_rank()
    n, k = args.n, args.k
    g = np.random.default_rng(0)
    texts = [f"a person is doing action {i % 997} in scene {i}" for i in range(n * 2)]
    slots = g.integers(0, n * 2, size=(n, k)).astype(np.int32)
    slots[:, 1:][slots[:, 1:] == slots[:, :1]] = -1  # some holes; repeats within a row removed
    slots[:, 2:][slots[:, 2:] == slots[:, 1:2]] = -1

    whole = CaptionCache(n, k)  # the baseline: every rank holds everything
    whole.intern(texts)
    whole.set(np.arange(n), slots, np.where(slots >= 0, 0.5, -np.inf).astype(np.float32))

    sharded = ShardedCaptionCache(n, k)
    lo, hi = sharded.lo, sharded.hi
    sharded.intern(texts[2 * lo: 2 * hi], np.arange(2 * lo, 2 * hi), 2 * n)  # ids in order: the same as whole's
    sharded.set_own(slots[lo:hi], np.where(slots[lo:hi] >= 0, 0.5, -np.inf))

    def batch(step: int) -> np.ndarray:  # a DistributedSampler-like draw of any video on any rank
        return np.random.default_rng([step, rank]).integers(0, n, size=args.batch)

    def one_step_whole(step: int) -> list[str]:
        return list(whole.texts(np.asarray(whole.sample(batch(step), step), dtype=np.int32)))

    def one_step_sharded(step: int) -> list[str]:
        return sharded.sample_texts(batch(step), step)

    for s in range(5):  # warm-up; and both paths give the same captions
        assert one_step_whole(s) == one_step_sharded(s)
    times = {}
    sent0 = sharded.comm.bytes_sent
    for name, fn in (("whole cache (no exchange)", one_step_whole), ("sharded cache", one_step_sharded)):
        dist.barrier()
        samples = []
        for s in range(args.steps):
            t0 = time.perf_counter()
            fn(s)
            samples.append((time.perf_counter() - t0) * 1e3)
        times[name] = summarize(samples)
    per_step = (sharded.comm.bytes_sent - sent0) / args.steps

    # the trainer's path: a step of --step-ms, its captions fetched inline or one step ahead (CaptionPrefetch)
    import torch

    from rest_fast.train.self_train import CaptionPrefetch

    groups = [[(torch.from_numpy(batch(s)), None)] for s in range(args.steps)]
    pause = args.step_ms / 1e3
    stepped = {}
    for name in ("whole cache", "sharded, inline", "sharded, prefetched"):
        dist.barrier()
        t0 = time.perf_counter()
        if name == "sharded, prefetched":
            for _micro, _caps in CaptionPrefetch(groups, sharded, lambda s: s, 0):
                time.sleep(pause)
        else:
            for s in range(args.steps):
                (one_step_whole if name == "whole cache" else one_step_sharded)(s)
                time.sleep(pause)
        stepped[name] = (time.perf_counter() - t0) * 1e3 / args.steps
    held = sharded.own_captions() + len(sharded._dict)
    gathered = [None] * P
    dist.all_gather_object(gathered, (per_step, held, len(whole)))
    dist.destroy_process_group()
    if rank != 0:
        return
    base, fast = times["whole cache (no exchange)"], times["sharded cache"]
    load = f"{os.getloadavg()[0]:.1f}"
    print(f"{P} ranks, N={n}, batch {args.batch} per rank: whole cache {base.median_ms:.3f} ms/step, sharded "
          f"{fast.median_ms:.3f} ms/step (p20-p80 {fast.p20_ms:.3f}-{fast.p80_ms:.3f}), "
          f"{fast.median_ms / base.median_ms:.1f}x; bytes sent per step per rank "
          f"{min(g[0] for g in gathered):.0f}-{max(g[0] for g in gathered):.0f}; strings held per rank "
          f"{min(g[1] for g in gathered)}-{max(g[1] for g in gathered)} of {gathered[0][2]} (load {load})")
    print(f"with a {args.step_ms:g} ms step: " + ", ".join(f"{k} {v:.2f} ms/step" for k, v in stepped.items()))
    table = Table("caption_exchange", ["ranks", "videos", "batch per rank", "whole ms/step", "sharded ms/step",
                                       "ratio", "bytes sent per step", "strings held per rank", "captions",
                                       "step ms", "whole ms/step with step", "inline ms/step with step",
                                       "prefetched ms/step with step", "load"])
    table.add(ranks=P, videos=n, **{"batch per rank": args.batch, "whole ms/step": base.median_ms,
                                    "sharded ms/step": fast.median_ms, "ratio": fast.median_ms / base.median_ms,
                                    "bytes sent per step": max(g[0] for g in gathered),
                                    "strings held per rank": max(g[1] for g in gathered)},
              captions=gathered[0][2], load=load,
              **{"step ms": args.step_ms, "whole ms/step with step": stepped["whole cache"],
                 "inline ms/step with step": stepped["sharded, inline"],
                 "prefetched ms/step with step": stepped["sharded, prefetched"]})
    print(table.format())
    if not args.no_save:
        print(f"appended to {table.save(hardware_name('cpu'), {'device': 'cpu'})}")


if __name__ == "__main__":
    main()
