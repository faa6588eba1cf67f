"""Ahead-of-time compile of every Triton kernel for real GPU targets, without a GPU or a driver.

The interpreter proves the kernels' arithmetic; it says nothing of what the GPU compiler makes of them
(registers, spills to local memory, shared memory). This module compiles the launches the launchers
would make — built by the launchers' own argument builders (``_filter_launch``, ``_fwd_launch``, ...) on
``meta`` tensors, specialised by the kernel's own binder exactly as a launch would be (ints equal to 1
or divisible by 16, 16-byte aligned pointers) — for ``sm_90`` / ``sm_80`` with the ``ptxas`` that ships in
the Triton wheel, and reads registers and spill bytes from the ``ptxas -v`` log and shared memory from
the compiled kernel's metadata.

* :func:`launches` — the launch list: every kernel × every configuration its launcher can choose
  (the forward's autotune list included) × dtype; ``full=False`` keeps a representative set (the launches
  of the trainer's path: fp16 retrieval, bf16 adapters).
* :func:`compile_all` — compile them (in parallel processes, results cached on disk keyed by the Triton
  version, the kernel source and the specialisation) and return one :class:`AotResult` per launch.
* :func:`format_table` — the table the test prints and ``bench/kernels_aot.py`` writes.

Works with triton 3.6–3.9 (the binder, ``JITFunction._pack_args``, ``ASTSource`` and
``knobs.nvidia.dump_ptxas_log`` have the same shape there); kernels are loaded from a private copy of
their module with the interpreter off, so this also runs inside a test session where
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["ARCHS", "SMEM_LIMIT", "Launch", "AotResult", "launches", "compile_all", "format_table"]

# Streaming multiprocessors and the per-block dynamic shared memory limit of the compile targets.
ARCHS = {90: dict(name="sm_90", sms=132), 80: dict(name="sm_80", sms=108)}
SMEM_LIMIT = {90: 232448, 80: 166912}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher would make it: ``kernel[grid](*args, **kwargs)``."""

    module: str  # rest_fast.kernels.<module>
    kernel: str
    config: str  # human-readable: the shape case and the tiles
    dtype: str
    args: tuple
    kwargs: dict


@dataclass
class AotResult:
    kernel: str
    config: str
    dtype: str
    arch: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill_stores == 0 and self.spill_loads == 0
                and self.smem <= SMEM_LIMIT[self.arch])


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------------------------------
# the launch list, built with the launchers' own helpers
# ----------------------------------------------------------------------------------------------------


def _topk_launches(dt: str, k: int, N: int, D: int, M: int, exclude: bool, arch: int) -> list[Launch]:
    from rest_fast.ops import topk as op

    dtype = DTYPES[dt]
    t = op._tiles("cuda", dtype, D)
    ieee = dtype == torch.float32
    ng, G, jstride, cap = op._plan(N, k, 0.5)
    dense = ng == 0
    # Rows per launch as the launcher chunks them on a card with ~140 GB free (8 GB budget).
    per_row = cap * 32 + ng * 8 + 64
    mc = min(max(t["BM"], ((8 << 30) // per_row) // t["BM"] * t["BM"]), op._max_rows(cap))
    rows = sorted({min(M, mc), M % mc or min(M, mc)})
    q, keys = _meta(M, D, dtype=dtype), _meta(N, D, dtype=dtype)
    out = []
    tag = f"k={k} N={N} d={D}{' ex' if exclude else ''}"
    for mb in rows:
        qb = q[:mb]
        ex = _meta(mb, dtype=torch.int64) if exclude else None
        if ng:
            gmax = _meta(mb, ng)
            _, args, kw = op._group_max_launch(qb, keys, ex, gmax, ng, G, jstride, t, ieee, False)
            out.append(Launch("topk", "group_max_kernel", f"{tag} M={mb} BM={t['GBM']} BG={t['BG']} "
                              f"BK={t['GBK']} w={t['g_warps']} s={t['g_stages']}", dt, args, kw))
        c = cap if not dense else N
        # The overflow redo uses an arbitrary (unaligned) width: compile that specialisation too.
        for width in ((c,) if dense else (c, c + 1)):
            cnt, tau = _meta(mb, dtype=torch.int32), _meta(mb)
            cs, ci = _meta(mb, width), _meta(mb, width, dtype=torch.int32)
            _, args, kw = op._filter_launch(qb, keys, ex, tau, cnt, cs, ci, t, ieee, False, dense)
            out.append(Launch("topk", "filter_kernel", f"{tag} M={mb} cap={width}{' dense' if dense else ''} "
                              f"BM={t['BM']} BN={t['BN']} BK={t['BK']} w={t['num_warps']} s={t['num_stages']}",
                              dt, args, kw))
    return out


def _dwconv_launches(dt: str, shape: tuple[int, ...], ksize: tuple[int, int, int], arch: int,
                     configs: str, fwd: bool = True) -> list[Launch]:
    """Forward and dx launches for each autotune configuration the launcher keeps for this C (``configs``
    "all") or only the widest-tile ones ("worst"), plus the dw/db kernel's fixed configuration."""
    from rest_fast.ops import dwconv3d as op

    dtype = DTYPES[dt]
    C = shape[-1]
    x, y = _meta(*shape, dtype=dtype), _meta(*shape, dtype=dtype)
    wt = op._padded_weight(_meta(C, *ksize, dtype=dtype), dtype)
    bias = _meta(C, dtype=dtype)
    cfgs = op._prune_fwd(op._fwd_configs(), {"C": C})
    if configs == "worst":  # most elements per thread: the highest register pressure
        most = max(c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_C"] // c.num_warps for c in cfgs)
        cfgs = [c for c in cfgs if c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_C"] // c.num_warps == most][:1]
    out = []
    tag = f"x={'x'.join(map(str, shape))} k={'x'.join(map(str, ksize))}"
    # The adapter's forward (bias, residual) and its input gradient (mirrored kernel, residual, no bias).
    for name, b, flip in ((("fwd", bias, False), ("dx", None, True)) if fwd else ()):
        args, flags = op._fwd_launch(x, wt, b, y, residual=True, flip=flip)
        for c in cfgs:
            kw = dict(flags, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            out.append(Launch("dwconv3d", "dwconv3d_fwd_kernel", f"{name} {tag} BP={c.kwargs['BLOCK_P']} "
                              f"BC={c.kwargs['BLOCK_C']} w={c.num_warps}", dt, args, kw))
    taps = ksize[0] * ksize[1] * ksize[2]
    N = shape[0] * shape[1] * shape[2] * shape[3]
    bp, bc, progs, nw = op._bwd_w_config(C, op.next_pow2(taps), "cuda", sms=ARCHS[arch]["sms"])
    progs, per_prog = op._bwd_w_programs(N, bp, progs)
    part = _meta(progs, taps + 1, C)
    _, args, kw = op._bwd_w_launch(x, x, part, ksize, bp, bc, per_prog, nw)
    out.append(Launch("dwconv3d", "dwconv3d_bwd_w_kernel", f"dw {tag} BP={bp} BC={bc} w={nw} progs={progs}",
                      dt, args, kw))
    return out


def _rerank_launches(dt: str, k: int, N: int, L: int, D: int, C: int, cand_dtype: torch.dtype) -> list[Launch]:
    from rest_fast.ops import rerank as op

    dtype = DTYPES[dt]
    t = op._tiles("cuda", L, D, dtype)
    v, c = _meta(N, D, dtype=dtype), _meta(C, D, dtype=dtype)
    cand = _meta(N, L, dtype=cand_dtype)
    _, args, kw = op._rerank_launch(v, c, cand, _meta(N, k), _meta(N, k, dtype=torch.int32), t)
    cd = "int32" if cand_dtype == torch.int32 else "int64"
    return [Launch("rerank", "rerank_kernel", f"k={k} L={L} d={D} cand={cd} BL={t['BL']} BD={t['BD']} "
                   f"w={t['num_warps']}", dt, args, kw)]


def launches(full: bool = True, arch: int = 90) -> list[Launch]:
    """Every launch to compile for ``arch``; ``full=False``: a representative set (see the module docstring)."""
    out: list[Launch] = []
    dts = list(DTYPES)
    if full:
        for dt in dts:
            for k, N in ((16, 240_000), (2000, 240_000), (2000, 20_000)):
                for ex in (True, False):
                    out += _topk_launches(dt, k, N, 512, 240_000, ex, arch)
            out += _dwconv_launches(dt, (2, 8, 14, 14, 768), (3, 3, 3), arch, "all")
            # Odd C and the extremes of the kernel sizes. The 7x7x7 forward (343 unrolled taps) takes minutes
            # to compile, so only its dw/db kernel is in the matrix.
            for ks in ((5, 3, 1), (1, 1, 1), (7, 7, 7)):
                out += _dwconv_launches(dt, (1, 3, 5, 7, 37), ks, arch, "worst", fwd=ks != (7, 7, 7))
            for k in (1, 3, 32):
                out += _rerank_launches(dt, k, 240_000, 8000, 512, 2_000_000, torch.int32)
            out += _rerank_launches(dt, 3, 240_000, 8000, 512, 2_000_000, torch.int64)
    else:
        # The trainer's path: fp16 retrieval (threshold + filter passes at the neighbour-graph shape, re-rank
        # with k = 3) and the bf16 adapter (forward, dx and dw/db at ViT-B/16 shape, the widest-tile config).
        items = _topk_launches("fp16", 2000, 240_000, 512, 240_000, True, arch)
        out += [next(x for x in items if x.kernel == name) for name in ("group_max_kernel", "filter_kernel")]
        out += _dwconv_launches("bf16", (2, 8, 14, 14, 768), (3, 3, 3), arch, "worst")
        out += _rerank_launches("fp16", 3, 240_000, 8000, 512, 2_000_000, torch.int32)
    return out


# ----------------------------------------------------------------------------------------------------
# compiling one launch
# ----------------------------------------------------------------------------------------------------

_KERNEL_MODULES: dict[str, object] = {}


def _jit_module(name: str):
    """A private copy of ``rest_fast.kernels.<name>`` whose kernels are compiled ``JITFunction`` s even when
    the process runs with ``TRITON_INTERPRET=1`` (``triton.jit`` decides that when a kernel is defined)."""
    if name not in _KERNEL_MODULES:
        from triton import knobs

        import rest_fast.kernels as pkg

        path = Path(pkg.__file__).parent / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_rest_fast_aot_kernels_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        old = knobs.runtime.interpret
        knobs.runtime.interpret = False
        try:
            spec.loader.exec_module(mod)
        finally:
            knobs.runtime.interpret = old
        _KERNEL_MODULES[name] = mod
    return _KERNEL_MODULES[name]


def _cache_dir() -> Path:
    root = os.environ.get("REST_FAST_AOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rest_fast", "aot")
    return Path(root)


_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _specialise(launch: Launch, arch: int):
    """``(fn, ASTSource, target, options dict, key)``: what ``kernel[grid](*args, **kwargs)`` would compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(_jit_module(launch.module), launch.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    opts = {k: v for k, v in options.__dict__.items()}
    key = hashlib.sha256(f"{triton.__version__}|{src.hash()}|{sorted(opts.items())!r}|{arch}".encode()).hexdigest()
    return src, target, opts, key


def _lookup(launch: Launch, arch: int) -> AotResult | None:
    """The cached result of ``launch`` for ``arch``, or ``None``."""
    try:
        cache = _cache_dir() / f"{_specialise(launch, arch)[3]}.json"
        d = json.loads(cache.read_text())
        if "error" in d:  # written by an older version that cached failures: recompile
            return None
        return AotResult(launch.kernel, launch.config, launch.dtype, arch, d["regs"], d["spill_stores"],
                         d["spill_loads"], d["stack"], d["smem"])
    except Exception:  # noqa: BLE001 - missing or bad entry: compile
        return None


def _compile_one(launch: Launch, arch: int) -> AotResult:
    """Compile one launch (cached). Run it in a process that has not run interpreted kernels."""
    res = AotResult(launch.kernel, launch.config, launch.dtype, arch, 0, 0, 0, 0, 0)
    try:
        src, target, opts, key = _specialise(launch, arch)
    except Exception as e:  # noqa: BLE001 - reported in the table
        res.error = f"specialise: {type(e).__name__}: {e}".splitlines()[0]
        return res
    cached = _lookup(launch, arch)
    if cached is not None:
        return cached
    cache = _cache_dir() / f"{key}.json"
    import triton
    from triton import knobs

    log = io.StringIO()
    old = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.runtime.interpret)
    # The log needs a real ptxas run (no Triton cache hit); the code generator must not take the
    # interpreter's semantics when this process runs with TRITON_INTERPRET=1 (the test session).
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.runtime.interpret = True, True, False
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=target, options=opts)
    except Exception as e:  # noqa: BLE001 - a compile failure is a result of the check
        res.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return res  # not cached: a failure may come from the environment, not the kernel
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.runtime.interpret = old
    text = log.getvalue()
    m_sp, m_rg = _PTXAS_SPILL.search(text), _PTXAS_REGS.search(text)
    if not (m_sp and m_rg):
        res.error = "no ptxas -v log captured"
        return res
    res.stack, res.spill_stores, res.spill_loads = (int(g) for g in m_sp.groups())
    res.regs = int(m_rg.group(1))
    res.smem = int(ck.metadata.shared)
    try:  # best effort; a missing cache only costs a recompile
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: v for k, v in asdict(res).items()
                                   if k in ("regs", "spill_stores", "spill_loads", "stack", "smem")}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return res


def _worker_main(argv: list[str]) -> None:
    """``python -m rest_fast.ops.aot FULL ARCH:INDEX ...``: compile those launches; one JSON line per launch
    on stdout (successes also go to the cache).

    The launch list is rebuilt in the worker: meta tensors and JIT functions need not cross processes.
    """
    full = argv[0] == "1"
    lists: dict[int, list[Launch]] = {}
    for job in argv[1:]:
        arch, index = (int(x) for x in job.split(":"))
        if arch not in lists:
            lists[arch] = launches(full, arch)
        res = _compile_one(lists[arch][index], arch)
        print(json.dumps({"job": job, **asdict(res)}), flush=True)


def _dedupe(items: list[Launch], arch: int) -> list[int]:
    """Indices of the launches with distinct specialisations (a real launch would compile each once)."""
    seen, keep = set(), []
    for i, launch in enumerate(items):
        try:
            key = _specialise(launch, arch)[3]
        except Exception:  # noqa: BLE001 - keep it: the compile step reports the error
            key = f"error-{i}"
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def compile_all(full: bool = True, archs: tuple[int, ...] = (90, 80), workers: int | None = None,
                select=None) -> list[AotResult]:
    """Compile :func:`launches` for each arch; ``select(launch) -> bool`` filters the list.

    Uncached launches compile in ``workers`` subprocesses (default: the CPU count).
    """
    jobs = []
    for arch in archs:
        items = launches(full, arch)
        for i in _dedupe(items, arch):
            if select is None or select(items[i]):
                jobs.append((arch, i, items[i]))
    workers = max(1, workers or os.cpu_count() or 1)
    todo = [(a, i) for a, i, launch in jobs if not _cached(launch, a)]
    fresh: dict[str, AotResult] = {}
    if todo:
        # Compiles always run in fresh subprocesses with the interpreter off: a process that has run
        # interpreted kernels (TRITON_INTERPRET=1, the test session) has Triton's language patched for the
        # interpreter and cannot code-generate. Plain subprocesses, not multiprocessing: nothing depends on
        # how the parent was started.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, TRITON_INTERPRET="0",
                   PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        procs = []
        for w in range(min(workers, len(todo))):
            mine = [f"{a}:{i}" for a, i in todo[w::workers]]
            procs.append(subprocess.Popen([sys.executable, "-m", "rest_fast.ops.aot", "1" if full else "0", *mine],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        for p in procs:
            out, _ = p.communicate()
            for line in out.splitlines():
                if line.startswith("{"):
                    d = json.loads(line)
                    job = d.pop("job")
                    fresh[job] = AotResult(**d)
    results = []
    for a, i, launch in jobs:
        r = fresh.get(f"{a}:{i}") or _lookup(launch, a)
        if r is None:
            r = AotResult(launch.kernel, launch.config, launch.dtype, a, 0, 0, 0, 0, 0,
                          error="the compile worker died (out of memory?)")
        results.append(r)
    return results


def _cached(launch: Launch, arch: int) -> bool:
    return _lookup(launch, arch) is not None


def format_table(results: list[AotResult]) -> str:
    head = ("kernel", "dtype", "arch", "config", "regs", "spill st/ld B", "stack B", "smem B", "ok")
    rows = [(r.kernel, r.dtype, ARCHS[r.arch]["name"], r.config, str(r.regs), f"{r.spill_stores}/{r.spill_loads}",
             str(r.stack), str(r.smem), "ok" if r.ok else (r.error or "FAIL")) for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda row: " | ".join(c.ljust(w) for c, w in zip(row, widths))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, rows)])


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
