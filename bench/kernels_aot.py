"""Ahead-of-time compile table of every Triton kernel (registers, spills, shared memory) for sm_90 / sm_80.

No GPU needed: the launches are the launchers' own, compiled with the ptxas inside the Triton wheel
(:mod:`rest_fast.ops.aot`). Writes ``bench/results/kernels_aot.csv`` (one row per launch, with date,
git SHA, triton version) and prints the table; exit code 1 when any variant spills, overflows shared
memory or fails to compile.

    python bench/kernels_aot.py            # full matrix (parallel, cached)
    python bench/kernels_aot.py --quick    # representative set
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rest_fast.ops import aot  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="representative set only")
    ap.add_argument("--arch", type=int, action="append", choices=sorted(aot.ARCHS),
                    help="compile target(s), default: all")
    ap.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPU count)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels_aot.csv"))
    ap.add_argument("--summary", default=None, help="append the table to this file")
    args = ap.parse_args()
    import triton

    t0 = time.time()
    results = aot.compile_all(full=not args.quick, archs=tuple(args.arch or aot.ARCHS), workers=args.workers)
    table = aot.format_table(results)
    n_bad = sum(not r.ok for r in results)
    footer = (f"{len(results)} launches, {n_bad} not clean, triton {triton.__version__}, "
              f"{time.time() - t0:.0f} s")
    print(table)
    print(footer)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        sha = "unknown"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "git", "triton", "kernel", "dtype", "arch", "config", "regs", "spill_stores",
                        "spill_loads", "stack", "smem", "ok"])
        date = time.strftime("%Y-%m-%d %H:%M")
        for r in results:
            w.writerow([date, sha, triton.__version__, r.kernel, r.dtype, aot.ARCHS[r.arch]["name"], r.config,
                        r.regs, r.spill_stores, r.spill_loads, r.stack, r.smem, "ok" if r.ok else r.error or "FAIL"])
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(f"## AOT compile (ptxas -v)\n{footer}\n")
            for r in results:
                if not r.ok:
                    f.write(f"NOT CLEAN: {r.kernel} {r.dtype} sm_{r.arch} {r.config}: {r.error or 'spills'}\n")
    return 1 if n_bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    sys.exit(main())
