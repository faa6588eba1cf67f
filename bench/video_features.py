"""Peak resident memory per rank of the CLIP video-feature step under torchrun, before and after issue 20 item 5.

    python bench/video_features.py                       # N=200K x 512, 2 ranks (gloo, CPU), before and after
    python bench/video_features.py --n 50000 --nproc 3   # smaller, 3 ranks

Each implementation runs in its own ``torchrun --standalone`` job (so ``ru_maxrss`` is its own): every rank holds its
block of synthetic unit features (the precomputed rows the trainer hands over), calls ``video_features`` and keeps the
fp16 features the trainer keeps. "before" loads ``rest_fast/train/features.py`` of ``--base`` (default: the merge base
with main) from git and uses it as the trainer did there (every rank gets all N rows, fp32, then fp16); "after" is this
tree (``rows=env.block(N)``: rank 0 writes the file from chunks it receives, each rank keeps its block). Reported per
rank: the RSS before the step, the peak RSS, their difference, the rows kept, the wall time; and whether the two
``video_clip.npy`` files are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import module_from_git, peak_rss_gb, rss_gb  # noqa: E402


class _RowsClip:
    """The trainer's ``PrecomputedRows`` role: the "clips" are already this rank's feature rows."""

    def __init__(self, dim: int) -> None:
        self.embed_dim = dim

    def encode_frames(self, clips):
        return clips


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from rest_fast.train.distributed import DistEnv, all_gather_objects

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    env = DistEnv(rank, world, rank, torch.device("cpu"))
    lo, hi = env.block(args.n)
    g = torch.Generator().manual_seed(lo)
    block = torch.nn.functional.normalize(torch.randn(hi - lo, args.d, generator=g), dim=1)  # this rank's rows
    mine = torch.arange(lo, hi)
    batches = [(mine[i: i + 4096], block[i: i + 4096]) for i in range(0, hi - lo, 4096)]
    if args.impl == "before":
        fe = module_from_git(args.base, "rest_fast/train/features.py", "_before_features")
        kw = {}
    else:
        from rest_fast.train import features as fe

        kw = {"rows": (lo, hi)}
    dist.barrier()
    rss0 = rss_gb()
    t0 = time.time()
    feats = fe.video_features(_RowsClip(args.d), batches, args.n, env, cache_dir=args.out, key="bench", amp=False,
                              **kw)
    feats = feats.to(torch.float16)  # what the trainer keeps
    wall = time.time() - t0
    row = {"rank": rank, "rss_before_gb": rss0, "peak_gb": peak_rss_gb(), "rows_kept": int(feats.shape[0]),
           "kept_gb": feats.numel() * 2 / 2**30, "wall_s": wall}
    rows = all_gather_objects(env, row)
    if rank == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", "--videos", dest="n", type=int, default=200_000)
    ap.add_argument("--d", "--dim", dest="d", type=int, default=512)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--impl", choices=["before", "after", "both"], default="both")
    ap.add_argument("--base", default=None, help="git revision of the 'before' code (default: merge base with main)")
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.base is None:
        args.base = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.strip()
    if "WORLD_SIZE" in os.environ:
        rank_main(args)
        return
    impls = ["before", "after"] if args.impl == "both" else [args.impl]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="bench_vf_") as tmp:
        files = {}
        for impl in impls:
            out = Path(tmp) / impl
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
                   __file__, "--impl", impl, "--videos", str(args.n), "--dim", str(args.d), "--base", args.base,
                   "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode != 0:
                print(f"{impl} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            for r in json.loads(proc.stdout.strip().splitlines()[-1]):
                print(f"{impl:6s} N={args.n} D={args.d} P={args.nproc} rank {r['rank']}: RSS before "
                      f"{r['rss_before_gb']:.3f} GB, peak {r['peak_gb']:.3f} GB (+{r['peak_gb'] - r['rss_before_gb']:.3f}),"
                      f" rows kept {r['rows_kept']} ({r['kept_gb']:.3f} GB fp16), {r['wall_s']:.1f} s")
            files[impl] = (out / "video_clip.npy").read_bytes()
        if len(files) == 2:
            print("video_clip.npy byte-identical:", files["before"] == files["after"])


if __name__ == "__main__":
    main()
