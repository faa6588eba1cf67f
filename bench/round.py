"""Scale rehearsal of one retrieval update: caption-feature table update + caption-cache candidates + re-rank +
cache update, on synthetic features, before (the code path of the base commit) and after (this tree), on CPU.

    python bench/round.py                          # N=240K videos, H=20, both kinds of round, ~minutes on 2 cores
    python bench/round.py --n 20000 --h 10 --quick # smoke run
    python bench/round.py --kind round0 --n 60000 --h 50
    torchrun --standalone --nproc-per-node 4 bench/round.py --kind round0   # sharded rehearsal (gloo, CPU)

Each (implementation, kind) runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own.
Times are process CPU seconds (all threads; robust when the machine is shared) and wall seconds; ratios use CPU time.
"before" loads ``rest_fast/train/retrieval_update.py`` and ``features.py`` of ``--base`` (default: the merge base
with main) straight from git, and uses them as the trainer did there: fp32 video and caption features, the table
doubled on growth and gathered through concatenated copies, round 0 re-ranking all (H+1)·T·P initial ids per video.
"after" is this tree: fp16 features (docs/PRECISION), the table allocated once for round 0's captions and
``--later-rounds`` × N more (as the trainer plans its run: no growth copy), in-place gather, round 0 on distinct ids.

Workload (seeded): N videos with D-dim unit features; each video has ``--distinct`` distinct initial captions spread
over M = T·P = ``--m`` slots (frame captions repeat); neighbours are H distinct videos from a window around the video
(overlapping sets, as k-NN graphs have; not a real k-NN search — that is bench/retrieval.py's job). ``round0`` = the
first update (all initial captions embedded, then re-ranked with their neighbours'); ``round`` = a later round (K slots
filled, one new pending caption per video: N new rows embedded, then re-ranked). The text encoder is a stand-in that
returns random unit vectors (the CLIP text tower is not what is measured). Re-ranking runs on the CPU reference path
(TRITON_INTERPRET=0), as the trainer does on CPU.

Under ``torchrun`` (``WORLD_SIZE`` set) every rank builds the same workload, holds only its shard of the caption-feature
table (``CaptionFeatures(rank=, world_size=)``) and of the caption strings (``ShardedCaptionCache``: its block's
captions interned collectively) and runs the sharded retrieval update (owner-computes re-rank over gloo,
issue 20); each rank reports its peak RSS, the caption-table rows it holds, the bytes it sent and its times, and rank 0
prints one row per rank. Only "after" runs there.

Time of the re-rank scales with N·H (it reads every candidate's feature row); the table and caches with N; the
neighbour graph with N·H. The README/closing note extrapolates from the measured size to N=240K, H=2000.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import module_from_git, peak_rss_gb, rss_gb  # noqa: E402


class _StandInEncoder:
    """``encode_text(texts) -> [n, D]`` random unit vectors (fp32), cheap and deterministic per call."""

    def __init__(self, dim: int) -> None:
        import torch

        self.dim = dim
        self.calls = 0
        self.g = torch.Generator().manual_seed(1)

    def encode_text(self, texts):
        import torch

        self.calls += 1
        x = torch.randn(len(texts), self.dim, generator=self.g)
        return torch.nn.functional.normalize(x, dim=1)


def worker(args, env=None) -> dict:
    os.environ["TRITON_INTERPRET"] = "0"
    import numpy as np
    import torch

    from rest_fast.cache import CaptionCache
    from rest_fast.train.distributed import DistEnv

    env = env or DistEnv(0, 1, 0, torch.device("cpu"))

    if args.impl == "before":
        ru = module_from_git(args.base, "rest_fast/train/retrieval_update.py", "_before_retrieval_update")
        fe = module_from_git(args.base, "rest_fast/train/features.py", "_before_features")
        dtype = torch.float32
        feats_kw = {}
    else:
        ru = importlib.import_module("rest_fast.train.retrieval_update")
        fe = importlib.import_module("rest_fast.train.features")
        dtype = torch.float16
        feats_kw = {"dtype": torch.float16, "rank": env.rank, "world_size": env.world_size}
    import rest_fast.cache.sharded  # noqa: F401  (imported before the baseline is read)
    from rest_fast.ops import rerank_captions

    # the first call of a torch.library custom op imports torch._dynamo, sympy and triton (~170 MB, once per process,
    # whatever N): make it before the baseline, so "above the imports" is what the workload and the update hold
    rerank_captions(torch.zeros(1, args.d), torch.zeros(1, args.d), torch.zeros(1, 1, dtype=torch.int32), 1)
    base_gb = rss_gb()  # the process with torch and rest_fast imported, before the workload exists
    rng = np.random.default_rng(0)
    n, h, d, k, m, dist_ = args.n, args.h, args.d, args.k, args.m, args.distinct
    # low intrinsic dimension (as CLIP features): a random 32-dim subspace plus a little noise
    basis = torch.randn(32, d, generator=torch.Generator().manual_seed(0))
    latent = torch.randn(n, 32, generator=torch.Generator().manual_seed(2))
    # the trainer under torchrun holds its own block of video rows only: build just those (the same rows for any
    # world size: noise drawn per fixed chunk of 4,096 videos)
    v_lo, v_hi = ((n * env.rank) // env.world_size, (n * (env.rank + 1)) // env.world_size) \
        if env.world_size > 1 and args.impl == "after" else (0, n)
    chunks = []
    for c0 in range(v_lo - v_lo % 4096, v_hi, 4096):
        noise = torch.randn(min(4096, n - c0), d, generator=torch.Generator().manual_seed(3 + c0))
        a, b = max(v_lo, c0), min(v_hi, c0 + 4096)
        chunks.append(latent[a:b] @ basis + 0.1 * noise[a - c0: b - c0])
    video = torch.nn.functional.normalize(torch.cat(chunks) if chunks else torch.zeros(0, d), dim=1).to(dtype)
    del latent
    win = max(4 * h, 64)
    offs = np.stack([rng.choice(np.arange(1, win), h, replace=False) for _ in range(min(n, 4096))])
    sign = np.where(rng.random((n, 1)) < 0.5, 1, -1)
    sharded_cache = env.world_size > 1 and args.impl == "after"
    # under torchrun a rank holds (memory-maps) only its own videos' rows of the graph, as the trainer does
    nb_rows = np.arange(v_lo, v_hi) if sharded_cache else np.arange(n)
    neighbours = ((nb_rows[:, None] + offs[nb_rows % len(offs)] * sign[nb_rows]) % n).astype(np.int32)
    if sharded_cache:  # the trainer's cache under torchrun: each rank interns its own block's captions
        from rest_fast.cache.sharded import ShardedCaptionCache

        cache = ShardedCaptionCache(n, k)
        lo, hi = cache.lo, cache.hi
        cache.intern([f"video {v} caption {j}" for v in range(lo, hi) for j in range(dist_)],
                     np.arange(lo * dist_, hi * dist_), n * dist_)
    else:
        cache = CaptionCache(n, k)
        texts = [f"video {v} caption {j}" for v in range(n) for j in range(dist_)]
        cache.intern(texts)
        del texts
    own = np.arange(n, dtype=np.int64)[:, None] * dist_
    if sharded_cache:  # what the trainer passes under torchrun: every video's distinct initial ids, gathered from the
        initial = (own + np.arange(dist_)).astype(np.int32)  # ranks (train/loop._gather_distinct_rows), [N, distinct]
    else:  # one process: the M = T x P frame-caption ids of every video, repeats included
        pick = np.random.default_rng(4).integers(0, dist_, size=(n, m))
        pick[:, :dist_] = np.arange(dist_)  # every distinct caption appears at least once
        initial = (own + pick).astype(np.int32)
        del pick
    enc = _StandInEncoder(d)
    table = fe.CaptionFeatures(d, torch.device("cpu"), **feats_kw)
    if hasattr(table, "plan_capacity"):  # as the trainer sizes it at round 0: the initial captions + N per later
        table.plan_capacity(n * dist_ + n * args.later_rounds)  # round, allocated once (no growth copy)
    if args.kind == "round":
        table.update(cache, enc, env, batch_size=4096)  # the initial captions, embedded in an earlier round
        slot_src = (np.arange(n)[:, None] + rng.integers(-win, win, size=(n, k))) % n
        slots = (slot_src * dist_ + rng.integers(0, dist_, size=(n, k))).astype(np.int32)
        slots = np.where(np.arange(k)[None] < 1, (np.arange(n) * dist_)[:, None], slots).astype(np.int32)
        srt = np.sort(slots, 1)
        dup = np.zeros_like(slots, dtype=bool)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        slots = np.where(dup, -1, srt).astype(np.int32)
        if sharded_cache:
            cache.set_own(slots[lo:hi], np.where(slots[lo:hi] >= 0, 0.0, -np.inf).astype(np.float32))
            cache.add_pending_own(cache.intern([f"video {v} generated" for v in range(lo, hi)], np.arange(lo, hi), n))
        else:
            cache.set(np.arange(n), slots, np.where(slots >= 0, 0.0, -np.inf).astype(np.float32))
            pending = cache.intern([f"video {v} generated" for v in range(n)])
            cache.add_pending(np.arange(n), pending)
    rss0, t0, c0 = rss_gb(), time.perf_counter(), time.process_time()
    embedded = table.update(cache, enc, env, batch_size=4096)
    t1, c1 = time.perf_counter(), time.process_time()
    kw = {"initial_ids": initial} if args.kind == "round0" else {}
    stats = ru.retrieval_update(cache, video, table.valid, neighbours, k, env, **kw)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"impl": args.impl, "kind": args.kind, "n": n, "h": h, "embedded": int(embedded),
            "captions": len(cache), "table_dtype": str(table.feats.dtype).replace("torch.", ""),
            "table_rows": int(table.feats.shape[0]), "embed_s": t1 - t0, "rerank_s": t2 - t1, "total_s": t2 - t0,
            "embed_cpu_s": c1 - c0, "rerank_cpu_s": c2 - c1, "cpu_s": c2 - c0,
            "rss_before_gb": rss0, "peak_gb": peak_rss_gb(), "imports_gb": base_gb, "mean_score": stats["mean_score"],
            "candidates_scored": int(stats.get("candidates_scored", -1)), "rank": env.rank, "world": env.world_size,
            "rows_held": int(table.valid.shape[0]), "bytes_sent": int(stats.get("rerank_bytes_sent", 0)),
            # caption strings this rank holds: its id-owned texts + its share of the text -> id dictionary
            "strings_held": (cache.own_captions() + len(cache._dict)) if sharded_cache else len(cache)}


def sharded(args) -> None:
    """One rank of ``torchrun --nproc-per-node P bench/round.py``: the sharded update, one table row per rank."""
    import torch
    import torch.distributed as dist

    from rest_fast.train.distributed import DistEnv

    dist.init_process_group("gloo")
    env = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), torch.device("cpu"))
    args.impl = "after"
    kinds = ["round0", "round"] if args.kind == "both" else [args.kind]
    rows = []
    for kind in kinds:
        args.kind = kind
        r = worker(args, env)
        parts = [None] * env.world_size
        dist.all_gather_object(parts, r)
        rows += parts
    dist.destroy_process_group()
    if env.rank != 0:
        return
    from harness import Table, hardware_name

    table = Table("round_sharded", ["kind", "ranks", "rank", "shape", "captions", "rows held", "strings held",
                                    "peak GB", "imports GB", "bytes sent", "embed cpu s", "re-rank cpu s",
                                    "wall s", "load"])
    load = f"{os.getloadavg()[0]:.1f}"
    for r in rows:
        table.add(kind=r["kind"], ranks=r["world"], rank=r["rank"],
                  shape=f"N={r['n']} H={r['h']} D={args.d} K={args.k} M={args.m}", captions=r["captions"],
                  **{"rows held": r["rows_held"], "strings held": r["strings_held"], "peak GB": r["peak_gb"],
                     "imports GB": r["imports_gb"], "bytes sent": r["bytes_sent"],
                     "embed cpu s": r["embed_cpu_s"], "re-rank cpu s": r["rerank_cpu_s"], "wall s": r["total_s"]},
                  load=load)
        print(f"{r['kind']} rank {r['rank']}/{r['world']}: peak RSS {r['peak_gb']:.2f} GB ({r['peak_gb'] - r['imports_gb']:.2f} above the imports), {r['rows_held']} caption rows "
              f"and {r['strings_held']} strings held of {r['captions']}, {r['bytes_sent'] / 2**20:.1f} MiB sent, {r['total_s']:.1f} s wall",
              flush=True)
    print(table.format())
    if not args.no_save:
        print(f"appended to {table.save(hardware_name('cpu'), {'device': 'cpu'})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=240_000)
    ap.add_argument("--h", type=int, default=20)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--m", type=int, default=24, help="initial captions per video (T x P)")
    ap.add_argument("--distinct", type=int, default=8, help="distinct initial captions per video")
    ap.add_argument("--kind", choices=["round0", "round", "both"], default="both")
    ap.add_argument("--later-rounds", type=int, default=1,
                    help="caption rounds after round 0 the table is planned for (the trainer plans the whole run's)")
    ap.add_argument("--impl", choices=["before", "after", "both"], default="both")
    ap.add_argument("--base", default=None, help="git revision of the 'before' code (default: merge base with main)")
    ap.add_argument("--quick", action="store_true", help="N=20000, H=10")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.h = 20_000, 10
    if args.base is None:
        args.base = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.strip()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if "WORLD_SIZE" in os.environ:
        sharded(args)
        return
    from harness import Table, hardware_name

    kinds = ["round0", "round"] if args.kind == "both" else [args.kind]
    impls = ["before", "after"] if args.impl == "both" else [args.impl]
    table = Table("round", ["kind", "impl", "shape", "captions", "table", "embed cpu s", "re-rank cpu s", "cpu s",
                            "wall s", "peak GB", "x cpu", "x peak", "scored ids", "note"])
    for kind in kinds:
        base = None
        for impl in impls:
            cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--kind", kind, "--n", str(args.n),
                   "--h", str(args.h), "--d", str(args.d), "--k", str(args.k), "--m", str(args.m),
                   "--distinct", str(args.distinct), "--base", args.base, "--later-rounds", str(args.later_rounds)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{kind}/{impl} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            base = base or r
            table.add(kind=kind, impl=impl, shape=f"N={r['n']} H={r['h']} D={args.d} K={args.k} M={args.m}",
                      captions=r["captions"], table=f"{r['table_rows']}x{args.d} {r['table_dtype']}",
                      **{"embed cpu s": r["embed_cpu_s"], "re-rank cpu s": r["rerank_cpu_s"], "cpu s": r["cpu_s"],
                         "wall s": r["total_s"], "peak GB": r["peak_gb"], "x cpu": base["cpu_s"] / r["cpu_s"],
                         "x peak": base["peak_gb"] / r["peak_gb"], "scored ids": r["candidates_scored"]},
                      note=f"before = {args.base[:8]}" if impl == "before" else "")
            print(f"{kind}/{impl}: {r['cpu_s']:.1f} CPU s ({r['total_s']:.1f} s wall), peak {r['peak_gb']:.2f} GB",
                  flush=True)
    print(table.format())
    if not args.no_save and table.rows:
        print(f"appended to {table.save(hardware_name('cpu'), {'device': 'cpu'})}")


if __name__ == "__main__":
    main()
