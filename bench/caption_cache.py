"""Caption cache benchmark: intern, candidates, sample, save/load; the C++ class vs the pure-Python class
vs a vectorised numpy baseline (candidates, sample), all measured in the same run.

    python bench/caption_cache.py            # default size, < 1 min on 2 cores
    python bench/caption_cache.py --full     # N=240K videos, K=3, H=2000 neighbours, ~1M captions

The workload imitates one REST round: every video has K slots and one pending (newly generated)
caption; neighbours are drawn from a window around the video (so neighbour sets overlap, as k-NN graphs
do) and slots hold pending captions of nearby videos, so candidate rows contain real duplicates.
For candidates, the Python class and the numpy baseline run on a subset of rows (--py-rows; 4000 /
1000 at --full for Python, 4096 for numpy) and their time is extrapolated per row to all N rows
(marked "extrapolated" in the note column); the C++ class always runs all N rows (at --full in calls
of --chunk rows: the output of one call is [chunk, L] int32). At --full the Python class is timed once
per operation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Table, Timing, hardware_name, time_fn  # noqa: E402

from rest_fast import cache  # noqa: E402
from rest_fast.cache import PyCaptionCache  # noqa: E402
from rest_fast.cache.sharded import sample_slots  # noqa: E402

WORDS = ("a person is playing the guitar on stage while dog runs in park man woman child riding horse "
         "bike kitchen cooking pasta swimming pool ball football basketball Dancing Singing outdoors indoors "
         "slowly quickly red blue green wearing hat near tree under bridge").split()


# ---- vectorised numpy baselines (same results as the cache classes) ----------------------------------

def numpy_candidates(rows: np.ndarray, videos: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """rows: int32 [N, K+1] (slots + pending). Stable sort per row keeps each id's first occurrence."""
    n = nb.shape[0]
    valid = nb >= 0
    g = np.concatenate([rows[videos][:, None, :],
                        np.where(valid[..., None], rows[np.where(valid, nb, 0)], -1)], axis=1).reshape(n, -1)
    order = np.argsort(g, axis=1, kind="stable")
    s = np.take_along_axis(g, order, 1)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    keep = np.empty_like(first)
    np.put_along_axis(keep, order, first & (s >= 0), 1)
    counts = keep.sum(1)
    width = int(counts.max(initial=0))
    pos = np.cumsum(keep, 1) - 1
    out = np.full((n, width), -1, dtype=np.int32)
    r, c = np.nonzero(keep)
    out[r, pos[r, c]] = g[r, c]
    return out


def numpy_sample(slots: np.ndarray, videos: np.ndarray, seed: int) -> np.ndarray:
    """The package's vectorised numpy draw (``cache.sharded.sample_slots``, what the sharded cache runs) on the
    videos' rows of the slot table."""
    return sample_slots(slots[videos], videos, seed).astype(np.int32)


# ---- workload --------------------------------------------------------------------------------------

def make_texts(count: int, distinct: int, rng: np.random.Generator) -> list[str]:
    """`count` raw captions (mixed case, stray whitespace) with about `distinct` distinct normal forms."""
    lens = rng.integers(6, 12, distinct)
    words = rng.integers(0, len(WORDS), int(lens.sum()))
    base, o = [], 0
    for i, n in enumerate(lens.tolist()):
        base.append(" ".join(WORDS[w] for w in words[o:o + n].tolist()) + f" {i}")
        o += n
    pick = np.concatenate([np.arange(distinct), rng.integers(0, distinct, count - distinct)])
    deco = rng.integers(0, 4, count)
    out = []
    for p, d in zip(pick.tolist(), deco.tolist()):
        t = base[p]
        out.append(t if d == 0 else ("  " + t.upper() if d == 1 else (t.replace(" ", "\t ") if d == 2 else t + "\n")))
    return out


def make_round(n: int, k: int, num_captions: int, rng: np.random.Generator):
    """A k-NN-like layout: videos sit at random positions of a hidden 1-D "embedding order" (so ids of
    similar videos are scattered over [0, N), as in a real graph). Returns the order, slots int32 [N, K]
    (pending captions of videos close in that order) and pending int32 [N] (one caption per video)."""
    order = rng.permutation(n)  # order[p] = the video at position p
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    pending = rng.integers(0, num_captions, n).astype(np.int32)
    near = order[(pos[:, None] + rng.integers(-64, 65, (n, k))) % n]
    slots = pending[near]
    for j in range(1, k):  # no repeats within a row
        slots[:, j][(slots[:, j:j + 1] == slots[:, :j]).any(1)] = -1
    slots[rng.random((n, k)) < 0.05] = -1  # a few empty slots
    return order, pos, slots.astype(np.int32), pending


def make_neighbours(videos: np.ndarray, order: np.ndarray, pos: np.ndarray, h: int,
                    rng: np.random.Generator) -> np.ndarray:
    """H neighbours per video: videos within a window of 2H positions, so neighbour sets overlap."""
    n = len(order)
    window = max(2 * h, 64)
    nb = order[(pos[videos][:, None] + rng.integers(-window, window + 1, (len(videos), h))) % n]
    nb[rng.random(nb.shape) < 0.01] = -1
    return nb.astype(np.int32)


# ---- benchmark -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="N=240K, K=3, H=2000, ~1M distinct captions")
    ap.add_argument("--videos", type=int, default=None)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--neighbours", type=int, default=None)
    ap.add_argument("--captions", type=int, default=None, help="distinct captions")
    ap.add_argument("--chunk", type=int, default=8192, help="rows per candidates call")
    ap.add_argument("--py-rows", type=int, default=None, help="rows for the Python class / numpy candidates")
    ap.add_argument("--no-save", action="store_true", help="do not append rows to bench/results/")
    ap.add_argument("--only", choices=("candidates",), default=None,
                    help="time only this operation (the caches are still built; no memory table)")
    args = ap.parse_args()
    if not cache.NATIVE_AVAILABLE:
        sys.exit(f"the native extension is not available: {cache.NATIVE_ERROR}")
    from rest_fast import _C

    n = args.videos or (240_000 if args.full else 20_000)
    h = args.neighbours or (2000 if args.full else 200)
    distinct = args.captions or (1_000_000 if args.full else 80_000)
    k = args.k
    py_rows = min(n, args.py_rows or (1000 if args.full else 4000))
    np_rows = min(n, args.py_rows or 4096)
    py_reps = 1 if args.full else 3  # the slow Python class: few repetitions
    size = "full" if args.full else "default"
    rng = np.random.default_rng(0)
    hw = hardware_name()
    print(f"# caption cache benchmark ({size}): N={n} K={k} H={h} distinct captions~{distinct} on {hw}, "
          f"{os.cpu_count()} threads for C++", flush=True)

    table = Table("caption_cache", ["op", "impl", "rows", "median_ms", "p20_ms", "p80_ms", "x_vs_python",
                                    "x_vs_numpy", "note"])

    def add(op, impl, rows, t, ref_py=None, ref_np=None, note=""):
        table.add(op=op, impl=impl, rows=rows, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                  x_vs_python=(ref_py / t.median_ms) if ref_py else "", x_vs_numpy=(ref_np / t.median_ms) if ref_np
                  else "", note=note)

    # intern: all captions of a cache built from scratch (a fresh cache per repetition)
    texts = make_texts(int(distinct * 1.2), distinct, rng)
    if args.only is None:
        t_py = time_fn(lambda: PyCaptionCache(1, k).intern(texts), warmup=0, min_time_s=0, max_reps=py_reps)
        t_c = time_fn(lambda: _C.CaptionCache(1, k).intern(texts), warmup=1, min_time_s=0.5, max_reps=10)
        add("intern", "python class", len(texts), t_py)
        add("intern", "C++", len(texts), t_c, ref_py=t_py.median_ms)

    nat, py = _C.CaptionCache(n, k), PyCaptionCache(n, k)
    ids_nat, ids_py = nat.intern(texts), py.intern(texts)
    assert np.array_equal(ids_nat, ids_py) and len(nat) == len(py)
    num = len(nat)
    raw = sum(len(s.encode()) for s in nat.texts(np.arange(num)))
    order, pos, slots, pending = make_round(n, k, num, rng)
    scores = rng.standard_normal((n, k)).astype(np.float32)
    for c in (nat, py):
        c.set(np.arange(n), slots, scores)
        c.add_pending(np.arange(n), pending)
        c.snapshot_round(0)
    rows = np.concatenate([slots, pending[:, None]], axis=1)

    # candidates
    def chunks(total, step):
        return [(s, min(total, s + step)) for s in range(0, total, step)]

    if args.full:  # C++ over all rows, chunked; neighbour lists generated per chunk, outside the timing
        total, cpu, widths = 0.0, 0.0, []
        for s, e in chunks(n, args.chunk):
            nb = make_neighbours(np.arange(s, e), order, pos, h, rng)
            t0, c0 = time.perf_counter(), time.process_time()
            out = nat.candidates(np.arange(s, e), nb)
            total += time.perf_counter() - t0
            cpu += time.process_time() - c0
            widths.append(out.shape[1])
            del out, nb
        t_cand_c_row = total * 1e3 / n
        t_cand_c = Timing(total * 1e3, total * 1e3, total * 1e3)
        cand_note = (f"all rows, {len(widths)} calls of {args.chunk}; L={min(widths)}..{max(widths)}; "
                     f"CPU time {cpu:.1f} s (all threads)")
    else:
        nb_all = make_neighbours(np.arange(n), order, pos, h, rng)
        out_c = nat.candidates(np.arange(n), nb_all)
        t_cand_c = time_fn(lambda: nat.candidates(np.arange(n), nb_all), warmup=1)
        t_cand_c_row = t_cand_c.median_ms / n
        cand_note = f"one call, L={out_c.shape[1]}"
    sub_py = np.arange(py_rows)
    nb_py = make_neighbours(sub_py, order, pos, h, np.random.default_rng(1))
    ref = nat.candidates(sub_py, nb_py)
    assert np.array_equal(py.candidates(sub_py, nb_py), ref), "python class disagrees with C++"
    t_py_sub = time_fn(lambda: py.candidates(sub_py, nb_py), warmup=0, min_time_s=0, max_reps=py_reps)
    sub_np = np.arange(np_rows)
    nb_np = make_neighbours(sub_np, order, pos, h, np.random.default_rng(2))
    assert np.array_equal(numpy_candidates(rows, sub_np, nb_np), nat.candidates(sub_np, nb_np))
    t_np_sub = time_fn(lambda: numpy_candidates(rows, sub_np, nb_np), warmup=0, min_time_s=0, max_reps=py_reps)

    def scale(t, rows_done):  # per-row extrapolation to all N rows
        f = n / rows_done
        return Timing(t.median_ms * f, t.p20_ms * f, t.p80_ms * f)

    t_py_all, t_np_all = scale(t_py_sub, py_rows), scale(t_np_sub, np_rows)
    add("candidates", "python class", n, t_py_all,
        note=f"extrapolated from {py_rows} rows" if py_rows < n else "")
    add("candidates", "numpy (vectorised)", n, t_np_all, ref_py=t_py_all.median_ms,
        note=f"extrapolated from {np_rows} rows" if np_rows < n else "")
    add("candidates", "C++", n, t_cand_c, ref_py=t_py_all.median_ms, ref_np=t_np_all.median_ms, note=cand_note)
    print(f"# candidates C++: {t_cand_c_row * 1e3:.2f} us/row, "
          f"{n * (h + 1) * (k + 1) / (t_cand_c.median_ms * 1e-3) / 1e9:.2f} G ids/s", flush=True)

    if args.only == "candidates":
        print(table.format())
        if not args.no_save:
            table.save(hw, extra={"size": f"{size}, candidates only"})
        return

    # sample
    videos = np.arange(n)
    assert np.array_equal(nat.sample(videos, 7), py.sample(videos, 7))
    assert np.array_equal(numpy_sample(slots, videos, 7), nat.sample(videos, 7))
    t_s_py = time_fn(lambda: py.sample(videos, 7), warmup=0, min_time_s=0, max_reps=py_reps)
    t_s_np = time_fn(lambda: numpy_sample(slots, videos, 7), warmup=1)
    t_s_c = time_fn(lambda: nat.sample(videos, 7), warmup=2)
    add("sample", "python class", n, t_s_py)
    add("sample", "numpy (vectorised)", n, t_s_np, ref_py=t_s_py.median_ms)
    add("sample", "C++", n, t_s_c, ref_py=t_s_py.median_ms, ref_np=t_s_np.median_ms)

    # save / load (fsync included)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        p_c, p_py = os.path.join(d, "c.rfc"), os.path.join(d, "py.rfc")
        t_sv_py = time_fn(lambda: py.save(p_py), warmup=0, min_time_s=0, max_reps=py_reps)
        t_sv_c = time_fn(lambda: nat.save(p_c), warmup=1, min_time_s=0.3, max_reps=5)
        mb = os.path.getsize(p_c) / 1e6
        t_ld_py = time_fn(lambda: PyCaptionCache.load(p_c), warmup=0, min_time_s=0, max_reps=py_reps)
        t_ld_c = time_fn(lambda: _C.CaptionCache.load(p_py), warmup=1, min_time_s=0.3, max_reps=5)
        t_ldm_c = time_fn(lambda: _C.CaptionCache.load(p_py, mmap=True), warmup=1, min_time_s=0.3, max_reps=5)
    add("save", "python class", n, t_sv_py, note=f"{mb:.1f} MB file")
    add("save", "C++", n, t_sv_c, ref_py=t_sv_py.median_ms, note=f"{mb:.1f} MB file")
    add("load", "python class", n, t_ld_py, note="reads the C++ file")
    add("load", "C++", n, t_ld_c, ref_py=t_ld_py.median_ms, note="reads the Python file")
    add("load mmap", "C++", n, t_ldm_c, ref_py=t_ld_py.median_ms)

    print(table.format())
    budget = 1.3 * raw + 16 * num
    mem = Table("caption_cache_memory", ["impl", "captions", "raw_utf8_MB", "held_MB", "bytes_per_caption",
                                         "budget_bytes_per_caption", "within_budget"])
    for impl, c in (("C++", nat), ("python class", py)):
        mem.add(impl=impl, captions=num, raw_utf8_MB=raw / 1e6, held_MB=c.nbytes / 1e6,
                bytes_per_caption=c.nbytes / num, budget_bytes_per_caption=budget / num,
                within_budget=c.nbytes <= budget)
    print()
    print(f"# memory (budget = 1.3 x raw UTF-8 + 16 B per caption; raw = {raw / num:.1f} B per caption)")
    print(mem.format())
    if not args.no_save:
        table.save(hw, extra={"size": size})
        mem.save(hw, extra={"size": size})


if __name__ == "__main__":
    main()
