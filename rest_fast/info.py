"""What is built and available: versions, the native extension, Triton, CUDA, DALI, degraded fast paths.

``rest-fast info`` prints :func:`collect`; tests and bug reports read the same dict.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is information here
        return f"not available ({type(exc).__name__}: {exc})".splitlines()[0]
    return str(getattr(mod, "__version__", "installed"))


def degraded_fast_paths() -> dict[str, str]:
    """``{fast path: what runs instead, and why}`` for every fast path that cannot run here (empty: none).

    Everything a fast path needs is a base dependency (``pyproject.toml``) except DALI (the ``dali`` extra,
    built per CUDA version), so an entry here means a broken or partial install, a ``REST_FAST_NO_NATIVE``
    build, or a CUDA machine without the extra."""
    out: dict[str, str] = {}
    from rest_fast import cache

    if not cache.NATIVE_AVAILABLE:
        out["caption cache"] = f"pure-Python cache instead of the C++ one: {cache.NATIVE_ERROR}"
    try:
        from rest_fast.ops import topk_cpu

        reason = topk_cpu.degraded_reason()
        if reason is not None:
            out["topk_similarity (CPU)"] = reason
    except Exception as exc:  # noqa: BLE001 - information, never a failure
        out["topk_similarity (CPU)"] = f"unknown ({type(exc).__name__}: {exc})"
    try:
        from rest_fast.ops._dispatch import KERNEL_IMPORT_ERRORS, load_kernels

        broken = [name for name in ("dwconv3d", "topk", "rerank") if load_kernels(name) is None]
        if broken:
            out["Triton kernels"] = (f"pure-torch reference for {', '.join(broken)} on CUDA: the kernels do not "
                                     f"import ({KERNEL_IMPORT_ERRORS.get(broken[0])})")
    except Exception as exc:  # noqa: BLE001
        out["Triton kernels"] = f"unknown ({type(exc).__name__}: {exc})"
    try:
        import torch

        if torch.cuda.is_available():
            dali = _version("nvidia.dali")
            if dali.startswith("not available"):
                out["video decoding"] = (f"PyAV on the CPU instead of DALI on the GPU: nvidia.dali {dali} "
                                         "(pip install -e '.[dali]')")
    except Exception as exc:  # noqa: BLE001
        out["video decoding"] = f"unknown ({type(exc).__name__}: {exc})"
    return out


def collect() -> dict[str, object]:
    """Return a flat, JSON-serialisable description of the environment."""
    from rest_fast import __version__, cache

    info: dict[str, object] = {
        "rest_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "native extension": "loaded (rest_fast._C)" if cache.NATIVE_AVAILABLE else f"not loaded: {cache.NATIVE_ERROR}",
        "caption cache backend": cache.CaptionCache.__module__ + "." + cache.CaptionCache.__qualname__,
    }
    for name in ("numpy", "torch", "triton", "transformers", "open_clip", "av", "faiss"):
        info[name] = _version(name)
    info["triton interpreter (TRITON_INTERPRET)"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        from rest_fast.ops._dispatch import KERNEL_IMPORT_ERRORS, load_kernels

        for name in ("dwconv3d", "topk", "rerank"):
            ok = load_kernels(name) is not None
            info[f"kernels.{name}"] = "importable" if ok else f"not importable: {KERNEL_IMPORT_ERRORS.get(name)}"
    except Exception as exc:  # noqa: BLE001
        info["kernels"] = f"unknown ({exc})"
    try:  # which path each fused op takes now, per device (and why, when CUDA would fall back)
        import rest_fast.ops  # noqa: F401 - registers the ops
        from rest_fast.ops._dispatch import op_paths

        for op, path in op_paths().items():
            info[f"op {op}"] = path
    except Exception as exc:  # noqa: BLE001
        info["op paths"] = f"unknown ({exc})"
    try:
        import torch

        if torch.cuda.is_available():
            devs = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda devices"] = ", ".join(devs)
        else:
            info["cuda devices"] = "none"
        info["torch cuda build"] = str(torch.version.cuda)
    except Exception as exc:  # noqa: BLE001
        info["cuda devices"] = f"unknown ({exc})"
    info["dali"] = _version("nvidia.dali")
    degraded = degraded_fast_paths()
    info["fast paths"] = ("all available" if not degraded else f"{len(degraded)} degraded: "
                          + "; ".join(f"{what}: {why}" for what, why in degraded.items()))
    try:
        from rest_fast.data.select import choose_decoder
        from rest_fast.data.workers import cpus_available, default_num_workers

        choice = choose_decoder("auto")
        info["decoder (auto)"] = f"{choice.name}: {choice.reason}"
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        info["decoding workers (default)"] = (f"{default_num_workers()} per rank ({cpus_available()} CPUs available "
                                              f"/ {ranks} local rank(s), one CPU left per rank)")
    except Exception as exc:  # noqa: BLE001 - information, never a failure
        info["decoder (auto)"] = f"unknown ({type(exc).__name__}: {exc})"
    return info


def format_info(info: dict[str, object]) -> str:
    width = max(len(k) for k in info)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in info.items())
