"""Benchmark: the temporal adapter's depth-wise 3×3×3 conv, Triton vs torch, forward / backward / both.

The op benchmarked is the adapter's: ``y = x + conv3d_dw(x) + bias`` on channels-last tokens
``x [B, T, H, W, C]`` (ViT-B/16: T=8, 14×14, C=768), with gradients for x, weight and bias.

Providers (all produce/consume ``[B, T, H, W, C]``, so layout changes are part of their cost):
  triton       ``rest_fast.ops.temporal_dwconv3d(..., residual=True)`` (CUDA only; on CPU Triton is the
               interpreter, reported as n/a)
  torch_ncdhw  permute to NCDHW + ``.contiguous()``, ``F.conv3d(groups=C)``, permute back + ``.contiguous()``
  torch_cl3d   the channels-last tokens *are* a ``channels_last_3d`` NCDHW tensor: conv3d on that view
               (no copies), permute back (a view)
  compile_ref  ``torch.compile`` of ``temporal_dwconv3d_ref`` (computes in fp32 for 16-bit inputs)

Columns: median / p20 / p80 ms; GB/s over the ideal traffic (fwd: read x, write y; bwd: read dy and x,
write dx; fwd+bwd: both); % of the device-to-device copy bandwidth measured in the same run; speed-up
over the best torch provider for that shape and mode.

    python bench/dwconv.py                      # cuda if available, else cpu --quick
    python bench/dwconv.py --quick              # tiny CPU smoke run
    python bench/dwconv.py --device cuda --summary results/summary.txt
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Table, copy_bandwidth_gbs, fused_path, hardware_name, time_fn  # noqa: E402

from rest_fast.ops import temporal_dwconv3d, temporal_dwconv3d_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
TORCH_PROVIDERS = ("torch_ncdhw", "torch_cl3d", "compile_ref")


def _torch_ncdhw(x, w, b):
    C = x.shape[-1]
    y = F.conv3d(x.permute(0, 4, 1, 2, 3).contiguous(), w.unsqueeze(1), b, padding=1, groups=C)
    return (y.permute(0, 2, 3, 4, 1) + x).contiguous()


def _torch_cl3d(x, w, b):
    C = x.shape[-1]
    xc = x.permute(0, 4, 1, 2, 3)  # a channels_last_3d view of contiguous [B, T, H, W, C]
    wc = w.unsqueeze(1).contiguous(memory_format=torch.channels_last_3d)
    y = F.conv3d(xc, wc, b, padding=1, groups=C) + xc
    return y.permute(0, 2, 3, 4, 1)


def _triton(x, w, b):
    return temporal_dwconv3d(x, w, b, residual=True)


def _make_providers(device: torch.device, compile_ref: bool):
    provs = {"torch_ncdhw": _torch_ncdhw, "torch_cl3d": _torch_cl3d}
    if compile_ref:
        ref = lambda x, w, b: temporal_dwconv3d_ref(x, w, b, residual=True)
        provs["compile_ref"] = torch.compile(ref, dynamic=False)
    if device.type == "cuda":
        provs = {"triton": _triton, **provs}
    return provs


def _case_fn(fn, mode, x, w, b, dy):
    """A zero-argument callable timing ``mode`` of provider ``fn``."""
    leaves = (x, w, b)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(x, w, b)
        return run
    if mode == "bwd":
        y = fn(x, w, b)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    return lambda: torch.autograd.grad(fn(x, w, b), leaves, dy)


def run(device: torch.device, dtype: torch.dtype, shapes, *, compile_ref: bool = True) -> Table:
    bw = copy_bandwidth_gbs(device, nbytes=(256 << 20) if device.type == "cuda" else (32 << 20))
    provs = _make_providers(device, compile_ref)
    table = Table("dwconv", ["shape", "dtype", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "GB/s",
                             "%copy_bw", "speedup"])
    dname = {v: k for k, v in DTYPES.items()}[dtype]
    g = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        B, T, H, W, C = shape
        x = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn((C, 3, 3, 3), device=device, dtype=dtype, generator=g) * 0.1).requires_grad_()
        b = torch.randn(C, device=device, dtype=dtype, generator=g).requires_grad_()
        dy = torch.randn(shape, device=device, dtype=dtype, generator=g)
        unit = x.numel() * x.element_size()
        for mode in MODES:
            nbytes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * unit
            times = {}
            for name, fn in provs.items():
                # The triton row must have run the fused kernels (benches run strict: no silent fallback).
                with fused_path("temporal_dwconv3d", device, expect=name == "triton"):
                    case = _case_fn(fn, mode, x, w, b, dy)
                    case()  # warm-up: autotune / compile / cudnn algorithm choice
                    times[name] = time_fn(case, device=device)
            best_torch = min(times[p].median_ms for p in times if p in TORCH_PROVIDERS)
            names = list(times) if "triton" in times else ["triton", *times]
            for name in names:
                row = dict(shape="x".join(map(str, shape)), dtype=dname, mode=mode, provider=name)
                if name not in times:  # CPU: Triton only runs interpreted, which says nothing about speed
                    row.update(median_ms="n/a", speedup="n/a", **{"GB/s": "n/a", "%copy_bw": "n/a"})
                    table.add(**row)
                    continue
                t = times[name]
                gbs = nbytes / (t.median_ms * 1e-3) / 1e9
                table.add(**row, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                          **{"GB/s": gbs, "%copy_bw": 100 * gbs / bw}, speedup=best_torch / t.median_ms)
    table.copy_bw_gbs = bw  # type: ignore[attr-defined]
    return table


def summary(table: Table, hardware: str) -> str:
    """One line per (shape, mode): Triton vs the best torch provider."""
    lines = [f"dwconv (adapter x + dwconv3x3x3(x) + b) on {hardware}; copy bw {table.copy_bw_gbs:.0f} GB/s",
             f"{'shape':<18} {'dtype':<5} {'mode':<8} {'triton ms':>9} {'best torch':>22} {'speedup':>7} {'%copy_bw':>8}"]
    keys = []
    for r in table.rows:
        k = (r["shape"], r["dtype"], r["mode"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rows = [r for r in table.rows if (r["shape"], r["dtype"], r["mode"]) == k]
        tri = next((r for r in rows if r["provider"] == "triton"), None)
        torch_rows = [r for r in rows if r["provider"] in TORCH_PROVIDERS]
        best = min(torch_rows, key=lambda r: r["median_ms"])
        if tri is None or isinstance(tri["median_ms"], str):
            tms, sp, pct = "n/a", "n/a", "n/a"
        else:
            tms, sp, pct = f"{tri['median_ms']:.3f}", f"{tri['speedup']:.2f}x", f"{tri['%copy_bw']:.0f}%"
        bt = f"{best['provider']} {best['median_ms']:.3f}"
        lines.append(f"{k[0]:<18} {k[1]:<5} {k[2]:<8} {tms:>9} {bt:>22} {sp:>7} {pct:>8}")
    return "\n".join(lines)


def sweep(device: torch.device, dtype: torch.dtype, shape) -> Table:
    """Time the Triton launchers over explicit tile configurations (to choose ``_bwd_config`` and check the
    forward autotuner's pick). The backward is not autotuned: its tiles fix the dw reduction order."""
    from rest_fast.ops.dwconv3d import dwconv3d_bwd, dwconv3d_fwd

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=g)
    w = torch.randn((shape[-1], 3, 3, 3), device=device, dtype=dtype, generator=g) * 0.1
    b = torch.randn(shape[-1], device=device, dtype=dtype, generator=g)
    dy = torch.randn(shape, device=device, dtype=dtype, generator=g)
    unit = x.numel() * x.element_size()
    table = Table("dwconv_sweep", ["shape", "dtype", "kernel", "BLOCK_P", "BLOCK_C", "num_warps", "programs",
                                   "median_ms", "GB/s"])
    dname = {v: k for k, v in DTYPES.items()}[dtype]
    base = dict(shape="x".join(map(str, shape)), dtype=dname)
    for bp in (16, 32, 64, 128):
        for bc in (32, 64, 128):
            for nw in (1, 2, 4, 8):
                if not 512 <= bp * bc <= 8192:
                    continue
                tiles = dict(residual=True, block_p=bp, block_c=bc, num_warps=nw)
                cases = {"fwd": (functools.partial(dwconv3d_fwd, x, w, b, **tiles), 2)}
                if bp * bc <= 4096:
                    cases["bwd"] = (functools.partial(dwconv3d_bwd, dy, x, w, **tiles), 3)
                for kname, (fn, units) in cases.items():
                    try:
                        fn()
                        t = time_fn(fn, device=device)
                    except Exception as e:  # noqa: BLE001 - e.g. out of resources for a large tile
                        print(f"skip {kname} {bp}x{bc} w{nw}: {type(e).__name__}")
                        continue
                    table.add(**base, kernel=kname, BLOCK_P=bp, BLOCK_C=bc, num_warps=nw, median_ms=t.median_ms,
                              **{"GB/s": units * unit / (t.median_ms * 1e-3) / 1e9})
    table.rows.sort(key=lambda r: (r["kernel"], r["median_ms"]))
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--batches", default="8,64", help="batch sizes of the ViT-B/16 shapes (T=8, 14x14, C=768)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--summary", default=None, metavar="FILE", help="append the compact table to FILE")
    ap.add_argument("--sweep", action="store_true",
                    help="CUDA: also time the Triton launchers over explicit tile configs (batch = last of --batches)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type == "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if quick:
        shapes = [(1, 8, 7, 7, 64), (2, 8, 14, 14, 96)]
    else:
        shapes = [(int(b), 8, 14, 14, 768) for b in args.batches.split(",")]

    hw = hardware_name(device)
    table = run(device, dtype, shapes, compile_ref=not args.no_compile)
    print(f"# {hw}; copy bandwidth {table.copy_bw_gbs:.1f} GB/s; adapter op y = x + dwconv3x3x3(x) + b")
    print(table.format())
    path = table.save(hw, extra={"device": device.type, "quick": quick})
    print(f"rows appended to {path}")
    text = summary(table, hw)
    print()
    print(text)
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text + "\n\n")
    if args.sweep and device.type == "cuda":
        st = sweep(device, dtype, shapes[-1])
        print(st.format())
        st.save(hw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
