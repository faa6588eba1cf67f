"""Shared benchmark harness: timing, hardware description, tables, result rows.

Every bench script measures its baseline in the same run and reports ratios against it. :func:`time_fn`
warms up, times one repeat to size the run, then takes at least :data:`MIN_REPS` timed repeats (more for
short steps, to fill ``min_time_s``): on CUDA with CUDA events, L2 flushed between repeats, one host sync
at the end (as ``triton.testing.do_bench``, which took a single repeat of a 100+ ms step); on CPU with
``time.perf_counter``. Medians with p20/p80 and min/max.

Benches run strict (``REST_FAST_STRICT=1`` unless set otherwise): a fused op that would fall back to its
reference raises, and :func:`fused_path` checks that a row labelled as a fused op ran its Triton kernels.
Result rows go to ``bench/results/`` or to ``$REST_FAST_BENCH_RESULTS`` (the GPU suite's results folder).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(os.environ.get("REST_FAST_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
# Timed repeats a measurement takes at least (after warm-up), unless its caller caps max_reps lower.
MIN_REPS = 5
# Benches measure the fused paths, never a silent fallback to the references.
os.environ.setdefault("REST_FAST_STRICT", "1")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float = math.nan
    max_ms: float = math.nan
    reps: int = 0


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median / p20 / p80 / min / max of per-repeat times (ms), and how many repeats there were."""
    v = sorted(samples_ms)

    def q(p: float) -> float:
        return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]

    return Timing(statistics.median(v), q(0.2), q(0.8), v[0], v[-1], len(v))


def repeats_for(estimate_ms: float, *, min_time_s: float = 0.5, max_reps: int = 50,
                min_reps: int = MIN_REPS) -> int:
    """Timed repeats for a step of ``estimate_ms``: enough to fill ``min_time_s``, at least ``min_reps``
    (``max_reps`` below it wins: a caller's explicit cap on a very slow baseline), at most ``max_reps``."""
    want = math.ceil(min_time_s * 1e3 / max(estimate_ms, 1e-6))
    return max(min(min_reps, max_reps), min(max_reps, want))


# A timer runs ``fn`` n times and returns the n per-repeat times in ms.
Timer = Callable[[Callable[[], object], int], list[float]]


def cpu_timer(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def cuda_timer(device: torch.device) -> Timer:
    """CUDA events around each repeat, L2 flushed before each (a 256 MiB write), one sync at the end so
    the queue stays full and host launch latency is not counted."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def run(fn: Callable[[], object], n: int) -> list[float]:
        with torch.cuda.device(device):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            torch.cuda.synchronize()
            for s, e in zip(starts, ends):
                flush.zero_()
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    return run


def time_fn(fn: Callable[[], object], *, device: str | torch.device = "cpu", warmup: int = 2,
            min_time_s: float = 0.5, max_reps: int = 50, min_reps: int = MIN_REPS,
            timer: Timer | None = None) -> Timing:
    """Per-repeat wall time of ``fn()`` in ms on ``device``: ``warmup`` untimed calls, one timed repeat
    that sizes the run (:func:`repeats_for`), then the rest; the sizing repeat counts as a sample.
    ``timer`` replaces the device's timer (tests)."""
    dev = torch.device(device)
    if timer is None:
        timer = cuda_timer(dev) if dev.type == "cuda" else cpu_timer
    for _ in range(warmup):
        fn()
    samples = timer(fn, 1)
    n = repeats_for(samples[0], min_time_s=min_time_s, max_reps=max_reps, min_reps=min_reps)
    if n > 1:
        samples += timer(fn, n - 1)
    return summarize(samples)


@contextlib.contextmanager
def fused_path(op: str, device: str | torch.device, *, expect: bool | None = None) -> Iterator[None]:
    """Assert that ``op``'s Triton launcher ran inside the block, for a row labelled as the fused op.

    ``expect`` defaults to "on CUDA" (on CPU the fused ops serve their references or native code by design).
    """
    from rest_fast.ops._dispatch import launch_count

    before = launch_count(op)
    yield
    if (torch.device(device).type == "cuda" if expect is None else expect) and launch_count(op) == before:
        raise AssertionError(f"the row is labelled as the fused {op}, but its Triton kernels did not run "
                             "(see `rest-fast info` for the op's path)")


def copy_bandwidth_gbs(device: str | torch.device, nbytes: int = 256 << 20) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    dev = torch.device(device)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=dev)
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9


def matmul_tflops(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 4096) -> float:
    """Measured dense matmul rate in TFLOP/s (the GEMM floor for similarity search)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        n, dtype = min(n, 1024), torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = time_fn(lambda: a @ b, device=dev)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def hardware_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


@dataclass
class Table:
    """Rows of dicts printed as an aligned text table and appended to ``bench/results/<name>.csv``."""

    name: str
    columns: Sequence[str]
    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def format(self) -> str:
        def cell(v) -> str:
            if isinstance(v, float):
                return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
            return str(v)

        cells = [[cell(r.get(c, "")) for c in self.columns] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def save(self, hardware: str, extra: dict | None = None) -> Path:
        """Append rows (with hardware, versions, git SHA, date) to ``bench/results/<name>.csv``."""
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.csv"
        meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "hardware": hardware,
                "versions": versions(), "git": git_sha(), **(extra or {})}
        fields = list(meta) + list(self.columns)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in self.rows:
                w.writerow({**meta, **r})
        return path


# --- memory and the code of a base commit (the scale benches: round.py, video_features.py) ---------------------------
def _status_gb(key: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in GB; NaN where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def rss_gb() -> float:
    """This process's resident memory now (GB, from /proc)."""
    return _status_gb("VmRSS")


def peak_growth_gb(fn: Callable[[], object]) -> float:
    """Peak resident growth (GB) during one ``fn()`` call (Linux): freed heap handed back first (``malloc_trim``),
    then the high-water mark reset to the current RSS (``/proc/self/clear_refs``), so the figure is this call's."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = rss_gb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    fn()
    return _status_gb("VmHWM") - before


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (GB; ``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def module_from_git(rev: str, path: str, name: str) -> types.ModuleType:
    """Module ``path`` as it was at commit ``rev`` of this repository (a bench's "before" baseline)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(name)
    mod.__file__ = f"{rev}:{path}"
    sys.modules[name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - our own repository's history
    return mod
