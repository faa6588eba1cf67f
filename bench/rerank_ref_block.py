"""Block size of the CPU re-rank reference: time per video and peak memory, old default vs new, same run.

    python bench/rerank_ref_block.py              # three shapes, ~1 min on 2 cores
    python bench/rerank_ref_block.py --quick

``rerank_captions_ref`` (the trainer's CPU re-rank and the owner's local re-rank of the sharded update) gathers the
candidate caption features of ``block`` videos at a time, ``[block, L, d]``, and dots them with the videos. The
block is sized by a byte budget (``REF_BLOCK_BYTES``, ~8 B per gathered element). This bench runs the same inputs
with the budget the reference had before (256 MiB on every device) and the CPU one it has now (8 MiB), checks the
ids are identical (scores within float32 rounding), and reports per-video time (median of repeats, harness.time_fn) and the peak resident
growth of one call (VmHWM reset through /proc/self/clear_refs, after malloc_trim, Linux). Shapes: the round-0
candidates of bench/round.py as an owner receives them (L = 30 local ids) and as one process has them (L = 132),
and a later REST round at H = 2000 (L ≈ 4,000 candidates). Appends to ``bench/results/rerank_ref_block.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

OLD_BUDGET = 256 << 20  # the reference's block budget before this bench (all devices)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=400_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    os.environ["TRITON_INTERPRET"] = "0"

    import torch
    from harness import Table, hardware_name, peak_growth_gb, time_fn

    from rest_fast.ops.rerank import REF_BLOCK_BYTES, rerank_captions_ref

    g = torch.Generator().manual_seed(0)
    caps = torch.nn.functional.normalize(torch.randn(args.captions, args.d, generator=g), dim=1).half()
    shapes = [(4000, 30), (4000, 132), (256, 4000)] if not args.quick else [(500, 30), (64, 2000)]
    table = Table("rerank_ref_block", ["shape", "budget", "block", "us/video", "peak MB", "x speed", "x memory",
                                       "load"])
    for n, L in shapes:
        video = torch.nn.functional.normalize(torch.randn(n, args.d, generator=g), dim=1).half()
        cand = torch.randint(-1, args.captions, (n, L), generator=g, dtype=torch.int32)
        rerank_captions_ref(video[:2], caps, cand[:2], 3)  # warm-up (first-call allocations)
        rows, outs = [], []
        for name, budget in (("256 MiB (before)", OLD_BUDGET), ("8 MiB (now)", REF_BLOCK_BYTES["cpu"])):
            block = max(1, min(1024, budget // max(1, L * args.d * 8)))
            fn = lambda b=block, v=video, c=cand: rerank_captions_ref(v, caps, c, 3, block=b, check=False)  # noqa: E731
            outs.append(fn())
            peak = peak_growth_gb(fn) * 1024  # MB
            t = time_fn(fn, warmup=1, min_time_s=1.0, max_reps=10)
            rows.append(dict(shape=f"N={n} L={L} d={args.d} C={args.captions} fp16", budget=name, block=block,
                             **{"us/video": t.median_ms * 1000 / n, "peak MB": peak}))
        # ids identical; scores agree to float32 rounding (the batched dot sums in another order per block size)
        err = float((outs[0][0] - outs[1][0]).nan_to_num(posinf=0, neginf=0).abs().max()) if n else 0.0
        if not torch.equal(outs[0][1], outs[1][1]) or err > 1e-5:
            raise SystemExit(f"outputs differ between block sizes at N={n} L={L} (max score diff {err:.2e})")
        base = rows[0]
        for r in rows:
            table.add(**r, **{"x speed": base["us/video"] / r["us/video"],
                              "x memory": base["peak MB"] / max(r["peak MB"], 1.0)}, load=f"{os.getloadavg()[0]:.1f}")
        print(f"N={n} L={L}: {base['us/video']:.0f} -> {rows[1]['us/video']:.0f} us/video, "
              f"peak {base['peak MB']:.0f} -> {rows[1]['peak MB']:.0f} MB (same ids, scores within {err:.1e})", flush=True)
    print(table.format())
    if not args.no_save:
        print(f"appended to {table.save(hardware_name('cpu'), {'device': 'cpu'})}")


if __name__ == "__main__":
    main()
