"""Benchmark the retrieval engine: exact top-k similarity and fused caption re-ranking.

    python bench/retrieval.py                          # CPU: 12,000 x 512 fp16, k=100 and 2000, ~3 min on 2 cores
    python bench/retrieval.py --dtype fp32 --with-ref  # fp32 inputs, plus the pure-torch reference path
    python bench/retrieval.py --device cuda            # GPU medium shape
    python bench/retrieval.py --device cuda --full     # REST shape: N=240K, d=512, k=2000, fp16

Top-k rows: ``rest_fast.ops.topk_similarity`` (the production entry point, self excluded as in the neighbour
graph, inputs in the trainer's storage dtype: fp16 by default) against chunked torch ``mm`` + ``topk`` (same
exclusion), faiss-cpu ``IndexFlatIP`` (fp32 copy of the same rounded features: faiss has no fp16 flat index;
on CUDA timed on a query subset and scaled), faiss GPU when installed (``k ≤ 2048``), optionally the pure-torch
reference (``--with-ref``: the CPU path when the native extension is absent), and the GEMM floor. On CPU the
methods are timed in interleaved rounds (A, B, C, A, B, C, ...) so that load from other processes hits them
alike; the ratio column is the meaningful figure, absolute times on a shared machine are noisy. ``cpu_s`` is
the process CPU time of one call (all threads; other jobs do not inflate it) and ``x base cpu`` its ratio.
Re-rank rows: ``rest_fast.ops.rerank_captions`` against the torch reference (gather + bmm + distinct top-k).
``x base`` = baseline time / rest_fast time (> 1: rest_fast is faster); ``agree`` = fraction of ids equal to
rest_fast's (ties may permute ids). Data has low intrinsic dimension (low-rank projection + noise).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import MIN_REPS, Table, fused_path, hardware_name, matmul_tflops, time_fn  # noqa: E402

from rest_fast.ops import (  # noqa: E402
    rerank_captions,
    rerank_captions_ref,
    topk_similarity,
    topk_similarity_ref,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["op", "method", "shape", "ms", "p20", "p80", "rate", "x base", "cpu_s", "x base cpu", "agree"]


def low_rank(n: int, d: int, device, dtype, *, rank: int = 32, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    proj = torch.randn(rank, d, generator=g).to(device)
    out = torch.empty(n, d, dtype=dtype, device=device)
    for i in range(0, n, 65536):  # chunks keep the fp32 temporaries small at N = 240K
        m = min(65536, n - i)
        z = torch.randn(m, rank, generator=g).to(device) @ proj / math.sqrt(rank)
        z += noise * torch.randn(m, d, generator=g).to(device)
        out[i:i + m] = (z / z.norm(dim=1, keepdim=True)).to(dtype)
    return out


def timed(fn, device: str, heavy: bool):
    """Median/p20/p80 in ms. Heavy (multi-second) ops: one warm-up and three timed runs on CPU,
    ``MIN_REPS`` on CUDA."""
    if heavy:
        fn()
        samples = []
        for _ in range(MIN_REPS if device == "cuda" else 3):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        n = len(samples)
        return samples[n // 2], samples[int(0.2 * (n - 1) + 0.5)], samples[int(0.8 * (n - 1) + 0.5)]
    t = time_fn(fn, device=device, warmup=1, min_time_s=0.0, max_reps=MIN_REPS if device == "cuda" else 3)
    return t.median_ms, t.p20_ms, t.p80_ms


def mm_topk(q: torch.Tensor, keys: torch.Tensor, k: int, exclude: torch.Tensor, chunk: int):
    """Baseline: chunked scores = q @ keys.T (input dtype), self masked, torch.topk."""
    out_s, out_i = [], []
    for m0 in range(0, q.shape[0], chunk):
        s = q[m0:m0 + chunk] @ keys.T
        if s.dtype != torch.float32 and q.device.type == "cpu":
            s = s.float()
        s.scatter_(1, exclude[m0:m0 + chunk, None], float("-inf"))
        v, i = torch.topk(s, k, dim=1)
        out_s.append(v.float())
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


def bench_topk(args, table: Table, device: str, dtype: torch.dtype) -> None:
    n, d, k = args.n, args.d, args.k
    keys = low_rank(n, d, device, dtype, seed=1)
    q = keys  # the neighbour graph: every item against every item, self excluded
    ex = torch.arange(n, device=device)
    shape = f"M=N={n} d={d} k={k} {args.dtype}"
    heavy = device == "cpu" or n >= 100_000
    flops = 2.0 * n * n * d
    if device == "cpu":
        bench_topk_cpu_interleaved(args, table, q, keys, k, ex, shape, flops)
        return

    with fused_path("topk_similarity", device):  # the rest_fast row on CUDA is the Triton kernel's
        ours = topk_similarity(q, keys, k, exclude=ex)
        t_ours = timed(lambda: topk_similarity(q, keys, k, exclude=ex), device, heavy)
    table.add(op="topk", method="rest_fast", shape=shape, ms=t_ours[0], p20=t_ours[1], p80=t_ours[2],
              rate=f"{flops / t_ours[0] / 1e6:.3g} GFLOP/s", **{"x base": 1.0, "agree": 1.0})

    def agree(idx: torch.Tensor) -> float:
        return float((idx.to(ours[1].device).long() == ours[1]).float().mean())

    def row(method: str, t, idx: torch.Tensor | None, note: str = "") -> None:
        table.add(op="topk", method=method + note, shape=shape, ms=t[0], p20=t[1], p80=t[2],
                  rate=f"{flops / t[0] / 1e6:.3g} GFLOP/s", **{"x base": t[0] / t_ours[0],
                                                              "agree": agree(idx) if idx is not None else ""})

    if not args.skip_mm:
        budget = (2 << 30) if device == "cuda" else (256 << 20)
        chunk = max(1, budget // (n * 4))
        base = mm_topk(q, keys, k, ex, chunk)
        row("torch mm+topk", timed(lambda: mm_topk(q, keys, k, ex, chunk), device, heavy), base[1])
        del base

    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None and not args.skip_faiss:
        xb = keys.float().cpu().numpy()
        index = faiss.IndexFlatIP(d)
        index.add(xb)
        sub = n if device == "cpu" else min(n, 4096)
        xq = xb[:sub]
        # faiss has no exclusion: ask for k+1 and drop the self match.
        fi = torch.from_numpy(index.search(xq, k + 1)[1])
        fi = torch.stack([r[r != j][:k] for j, r in enumerate(fi)])
        t = timed(lambda: index.search(xq, k + 1), "cpu", True)
        scale = n / sub
        t = tuple(x * scale for x in t)
        note = "" if sub == n else f" (x{scale:.0f} from {sub} queries)"
        row("faiss-cpu FlatIP", t, None, note)
        table.rows[-1]["agree"] = float((fi == ours[1][:sub].cpu()).float().mean())
        if device == "cuda" and hasattr(faiss, "StandardGpuResources") and k + 1 <= 2048:
            res = faiss.StandardGpuResources()
            gindex = faiss.GpuIndexFlatIP(res, d)
            gindex.add(xb)
            xq_all = keys.float().cpu().numpy()
            t = timed(lambda: gindex.search(xq_all, k + 1), "cpu", True)
            row("faiss-gpu FlatIP", t, None, " (fp32, host arrays)")

    rate = matmul_tflops(device, dtype=torch.bfloat16) * 1e12
    t_floor = flops / rate * 1e3
    table.add(op="topk", method="GEMM floor", shape=shape, ms=t_floor, p20="", p80="",
              rate=f"{rate / 1e9:.3g} GFLOP/s", **{"x base": t_floor / t_ours[0], "agree": ""})


def bench_topk_cpu_interleaved(args, table: Table, q, keys, k: int, ex, shape: str, flops: float) -> None:
    """CPU: every method once per round, ``--reps`` rounds after one warm-up round; medians and p20/p80."""
    n, d = keys.shape
    methods: dict[str, object] = {"rest_fast": lambda: topk_similarity(q, keys, k, exclude=ex)}
    if args.with_ref:
        methods["rest_fast reference (no native)"] = lambda: topk_similarity_ref(q, keys, k, exclude=ex)
    if not args.skip_mm:
        chunk = max(1, (256 << 20) // (n * 4))
        methods["torch mm+topk"] = lambda: mm_topk(q, keys, k, ex, chunk)
    faiss = None
    if not args.skip_faiss:
        try:
            import faiss
        except ImportError:
            faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
        xb = keys.float().numpy()
        index = faiss.IndexFlatIP(d)
        index.add(xb)
        methods["faiss-cpu FlatIP"] = lambda: index.search(xb, k + 1)  # k+1: drop the self match
    results = {name: fn() for name, fn in methods.items()}  # warm-up round, results for the id check
    samples: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append(time.process_time() - c0)
    ours = results["rest_fast"][1]

    def ids(name: str) -> torch.Tensor:
        r = results[name]
        if name.startswith("faiss"):
            fi = torch.from_numpy(r[1])
            keep = fi != torch.arange(n)[:, None]
            return torch.stack([row[m][:k] for row, m in zip(fi, keep)])
        return r[1]

    t_ours = statistics.median(samples["rest_fast"])
    c_ours = statistics.median(cpu["rest_fast"])
    for name in methods:
        v = sorted(samples[name])
        med = statistics.median(v)
        table.add(op="topk", method=name, shape=shape, ms=med, p20=v[int(0.2 * (len(v) - 1) + 0.5)],
                  p80=v[int(0.8 * (len(v) - 1) + 0.5)], rate=f"{flops / med / 1e6:.3g} GFLOP/s",
                  cpu_s=statistics.median(cpu[name]),
                  **{"x base": med / t_ours, "x base cpu": statistics.median(cpu[name]) / c_ours,
                     "agree": float((ids(name).long() == ours).float().mean())})
    rate = matmul_tflops("cpu", dtype=torch.float32) * 1e12
    t_floor = flops / rate * 1e3
    table.add(op="topk", method="GEMM floor (torch fp32 mm)", shape=shape, ms=t_floor, p20="", p80="",
              rate=f"{rate / 1e9:.3g} GFLOP/s", **{"x base": t_floor / t_ours, "agree": ""})


def bench_rerank(args, table: Table, device: str, dtype: torch.dtype) -> None:
    N, L, C, d, k = args.rerank_n, args.rerank_l, args.rerank_c, args.d, args.rerank_k
    video = low_rank(N, d, device, dtype, seed=2)
    caps = low_rank(C, d, device, dtype, seed=3)
    g = torch.Generator(device=device).manual_seed(4)
    # REST-like candidates: the captions of a video's neighbours, so ids repeat (~4x) and some slots are empty.
    cand = torch.empty(N, L, dtype=torch.int32, device=device)
    for i in range(0, N, 8192):
        m = min(8192, N - i)
        pool = torch.randint(0, C, (m, max(1, L // 4)), generator=g, dtype=torch.int32, device=device)
        pos = torch.randint(0, pool.shape[1], (m, L), generator=g, device=device)
        c = pool.gather(1, pos)
        c[torch.rand(m, L, generator=g, device=device) < 0.05] = -1
        cand[i:i + m] = c
    shape = f"N={N} L={L} C={C} d={d} k={k} {args.dtype}"
    nbytes = N * L * (d * video.element_size() + 4)
    heavy = device == "cpu" or N * L >= 10**9
    with fused_path("rerank_captions", device):
        ours = rerank_captions(video, caps, cand, k)
        t_ours = timed(lambda: rerank_captions(video, caps, cand, k), device, heavy)
    table.add(op="rerank", method="rest_fast", shape=shape, ms=t_ours[0], p20=t_ours[1], p80=t_ours[2],
              rate=f"{nbytes / t_ours[0] / 1e6:.3g} GB/s", **{"x base": 1.0, "agree": 1.0})
    # The torch route: gather [block, L, d] + bmm + distinct top-k, ~1 GiB of gathered features per block.
    block = max(1, (1 << 30) // (L * d * 8)) if device == "cuda" else None
    base = rerank_captions_ref(video, caps, cand, k, block=block)
    t = timed(lambda: rerank_captions_ref(video, caps, cand, k, block=block), device, heavy)
    table.add(op="rerank", method="torch gather+bmm+topk", shape=shape, ms=t[0], p20=t[1], p80=t[2],
              rate=f"{nbytes / t[0] / 1e6:.3g} GB/s",
              **{"x base": t[0] / t_ours[0], "agree": float((base[1] == ours[1]).float().mean())})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=None, help="items (queries = keys) for top-k")
    p.add_argument("--d", type=int, default=512, help="feature dimension")
    p.add_argument("--k", type=str, default=None, help="neighbours per item; a comma list runs several")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="feature storage dtype (default fp16, the trainer's; scores accumulate in fp32)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds on CPU (after one warm-up round)")
    p.add_argument("--with-ref", action="store_true", help="also time the pure-torch reference top-k")
    p.add_argument("--full", action="store_true", help="REST shape: N=240K, d=512, k=2000, fp16; L=8000")
    p.add_argument("--quick", action="store_true", help="small shapes, seconds on CPU (smoke run)")
    p.add_argument("--rerank-n", type=int, default=None, help="videos for re-ranking")
    p.add_argument("--rerank-l", type=int, default=None, help="candidate slots per video")
    p.add_argument("--rerank-c", type=int, default=None, help="distinct captions")
    p.add_argument("--rerank-k", type=int, default=3, help="captions kept per video")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--skip-mm", action="store_true", help="skip the mm+topk baseline")
    p.add_argument("--only", choices=["topk", "rerank"], default=None)
    p.add_argument("--summary", default=None, help="append the table to this file")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    cuda = args.device == "cuda"
    if args.quick:
        defaults = dict(n=2000, k=50, dtype="fp16", rerank_n=64, rerank_l=200, rerank_c=1024)
    elif args.full:
        defaults = dict(n=240_000, k=2000, dtype="fp16", rerank_n=240_000, rerank_l=8000, rerank_c=480_000)
    elif cuda:
        defaults = dict(n=65_536, k=1000, dtype="fp16", rerank_n=32_768, rerank_l=8000, rerank_c=131_072)
    else:
        defaults = dict(n=12_000, k="100,2000", dtype="fp16", rerank_n=256, rerank_l=1000, rerank_c=8192)
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    dtype = DTYPES[args.dtype]

    table = Table("retrieval", COLUMNS)
    if args.only in (None, "topk"):
        for k in (int(v) for v in str(args.k).split(",")):
            args.k = k
            bench_topk(args, table, args.device, dtype)
    if args.only in (None, "rerank"):
        bench_rerank(args, table, args.device, dtype)

    hw = hardware_name(args.device)
    text = (f"retrieval ({hw}, {torch.get_num_threads()} threads; x base = method time / rest_fast time, "
            f"measured in the same run)\n{table.format()}\n")
    print(text)
    table.save(hw, {"device": args.device})
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
