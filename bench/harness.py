"""Shared benchmark harness: timing, hardware description, tables, result rows.

Every bench script measures its baseline in the same run and reports ratios against it. On CUDA
times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed between reps); on CPU from
``torch.utils.benchmark`` (which handles threads and warm-up). Medians with p20/p80.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_fn(fn: Callable[[], object], *, device: str | torch.device = "cpu", warmup: int = 2,
            min_time_s: float = 0.5, max_reps: int = 50) -> Timing:
    """Median / p20 / p80 wall time of ``fn()`` in milliseconds on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(*map(float, q))
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < 3 or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()

    def q(p: float) -> float:
        return samples[min(len(samples) - 1, int(p * (len(samples) - 1) + 0.5))]

    return Timing(statistics.median(samples), q(0.2), q(0.8))


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
