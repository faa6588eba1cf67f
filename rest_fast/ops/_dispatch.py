"""The one dispatch rule every fused op follows (see :mod:`rest_fast.ops`), and its loud fallbacks.

CUDA tensors run the compiled Triton kernels. They end up on the pure-torch reference only for a reason,
and each reason warns once per op (``RuntimeWarning``): the kernels failed to import, a kernel failed
to compile or launch (the op then stays on the reference for the process), or ``TRITON_INTERPRET=1`` is
set (the interpreter would copy every CUDA tensor to the host and back). CPU tensors run the interpreted
kernels under ``TRITON_INTERPRET=1`` (how the tests exercise the real kernels) and the reference
otherwise. :func:`op_paths` says which path each op takes; ``rest-fast info`` prints it.

Strict mode (``REST_FAST_STRICT=1``, read at call time): every one of those fallbacks raises
:class:`StrictFallbackError` instead of warning, and so does a CPU call under ``TRITON_INTERPRET=1`` whose
kernels failed to import. The GPU tests and the benches run strict, so a kernel test cannot pass by
comparing the reference with itself. :func:`launch_count` counts the Triton launcher calls that returned,
per op, so a bench row labelled as a fused op can check that the fused path ran.
"""

from __future__ import annotations

import functools
import importlib
import os
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

# Why a kernel module could not be imported (Triton missing or unusable), by module name.
KERNEL_IMPORT_ERRORS: dict[str, str] = {}
# Why an op's compiled kernels failed on CUDA (compile or launch error), by op name: the op then serves
# CUDA tensors with its reference for the rest of the process.
KERNEL_RUN_ERRORS: dict[str, str] = {}
# op name -> (kernel module, what its CPU path is when the interpreter is off)
OPS: dict[str, tuple[str, str]] = {}
_WARNED: set[tuple[str, str]] = set()
# op name -> Triton launcher calls that returned (compiled on CUDA, interpreted on CPU) in this process.
LAUNCHES: Counter[str] = Counter()


class StrictFallbackError(RuntimeError):
    """Raised under ``REST_FAST_STRICT=1`` where an op would otherwise fall back to its reference."""


def strict() -> bool:
    """True when ``REST_FAST_STRICT=1``: fallbacks raise :class:`StrictFallbackError` instead of warning."""
    return os.environ.get("REST_FAST_STRICT", "0") == "1"


def launch_count(op: str) -> int:
    """How many times ``op``'s Triton launcher returned in this process (read before and after a call)."""
    return LAUNCHES[op]


def register_op(name: str, kernels: str, cpu_path: str | Callable[[], str] = "pure-torch reference") -> None:
    """Declare a fused op for :func:`op_paths` (called by each op module). ``cpu_path`` is the CPU path's
    description, or a function giving it when it depends on what loaded (the native extension)."""
    OPS[name] = (kernels, cpu_path)


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run (interpreted) on CPU tensors.

    Read at call time so a test can switch a single call to the reference path. Triton itself reads
    the variable when a kernel module is imported, so set it before importing :mod:`rest_fast.kernels`.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path serves these tensors: CUDA unless interpreted, CPU only under the interpreter."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return not triton_interpret()
    if devices == {"cpu"}:
        return triton_interpret()
    return False


@functools.cache
def load_kernels(name: str) -> ModuleType | None:
    """Import ``rest_fast.kernels.<name>`` once; ``None`` when Triton is unusable (the reason is kept in
    :data:`KERNEL_IMPORT_ERRORS`), so the op falls back to its reference instead of failing at import."""
    try:
        return importlib.import_module(f"rest_fast.kernels.{name}")
    except Exception as e:  # noqa: BLE001 - any import failure means "no Triton path"
        KERNEL_IMPORT_ERRORS[name] = repr(e)
        return None


def kernels_unavailable(name: str) -> RuntimeError:
    return RuntimeError(f"Triton kernels rest_fast.kernels.{name} unavailable: {KERNEL_IMPORT_ERRORS.get(name)}")


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that CUDA tensors are served by the pure-torch reference (strict: raise)."""
    if strict():
        raise StrictFallbackError(f"rest_fast.ops.{op}: REST_FAST_STRICT=1 and the op would fall back to "
                                  f"the pure-torch reference: {reason}")
    if (op, reason) in _WARNED:
        return
    _WARNED.add((op, reason))
    warnings.warn(f"rest_fast.ops.{op}: CUDA tensors run on the slow pure-torch reference: {reason}",
                  RuntimeWarning, stacklevel=3)


def _cuda_reason(op: str, kernels: str) -> str | None:
    """Why CUDA tensors cannot take the compiled path of ``op`` (``None``: they can)."""
    if triton_interpret():
        return "TRITON_INTERPRET=1 is set (unset it to run the compiled kernels)"
    if load_kernels(kernels) is None:
        return f"the Triton kernels failed to import ({KERNEL_IMPORT_ERRORS.get(kernels)})"
    if op in KERNEL_RUN_ERRORS:
        return f"a Triton kernel failed earlier in this process ({KERNEL_RUN_ERRORS[op]})"
    return None


def triton_path(op: str, kernels: str, *tensors: torch.Tensor | None) -> bool:
    """The dispatch decision of ``op`` for these tensors; warns once when CUDA tensors fall back."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cpu"}:
        if not triton_interpret():
            return False
        if load_kernels(kernels) is None:
            if strict():  # the interpreted kernels were asked for and cannot run
                warn_fallback(op, f"the Triton kernels failed to import ({KERNEL_IMPORT_ERRORS.get(kernels)})")
            return False
        return True
    if devices != {"cuda"}:
        return False
    reason = _cuda_reason(op, kernels)
    if reason is not None:
        warn_fallback(op, reason)
        return False
    return True


def _raised_in_triton(e: BaseException) -> bool:
    if type(e).__module__.split(".")[0] == "triton":
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and f"{os.sep}triton{os.sep}" in frames[-1].filename


def run_or_fallback(op: str, fast: Callable[..., Any], reference: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> Any:
    """Run the Triton launcher; on CUDA, an error raised inside Triton (compile, ptxas, launch) sends this
    and every later call of ``op`` to the reference, with one warning naming the error (strict mode:
    :class:`StrictFallbackError` from the error). Errors raised elsewhere (bad input, out of memory)
    propagate. A launcher call that returns counts in :data:`LAUNCHES`."""
    try:
        out = fast(*args, **kwargs)
    except Exception as e:
        on_cuda = any(getattr(getattr(a, "device", None), "type", None) == "cuda" for a in args)
        if not (on_cuda and _raised_in_triton(e)):
            raise
        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if strict():
            raise StrictFallbackError(f"rest_fast.ops.{op}: REST_FAST_STRICT=1 and a Triton kernel failed "
                                      f"({error})") from e
        KERNEL_RUN_ERRORS[op] = error
        warn_fallback(op, f"a Triton kernel failed ({KERNEL_RUN_ERRORS[op]})")
        return reference(*args, **kwargs)
    LAUNCHES[op] += 1
    return out


def interpreter_safe(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Inputs the Triton interpreter can take: a copy of each tensor whose storage starts at the same
    address as another input's storage of a different size.

    The interpreter (triton 3.6–3.8) maps tensors to host storages keyed by the storage's start address,
    so two views of one numpy array made by separate ``torch.from_numpy`` calls (``x[:37]``, ``x[:50]``)
    collide and the larger one fails with "Trying to resize storage that is not resizable".
    Read-only inputs only: a copy is invisible to the caller. No-op for non-CPU tensors.
    """
    sizes: dict[int, set[int]] = {}
    for t in tensors:
        if t is not None and t.device.type == "cpu":
            st = t.untyped_storage()
            sizes.setdefault(st.data_ptr(), set()).add(st.nbytes())
    out = []
    for t in tensors:
        if t is not None and t.device.type == "cpu" and len(sizes[t.untyped_storage().data_ptr()]) > 1:
            t = t.clone()
        out.append(t)
    return tuple(out)


def op_paths() -> dict[str, str]:
    """``{op: "cuda: <path> · cpu: <path>"}`` for every registered op, as dispatch would decide now."""
    cuda_ok = torch.cuda.is_available()
    out = {}
    for name, (kernels, cpu_path) in sorted(OPS.items()):
        reason = _cuda_reason(name, kernels)
        if not cuda_ok:
            cuda = "no CUDA device" + ("" if reason is None else f" (would use the reference: {reason})")
        else:
            cuda = "Triton (compiled)" if reason is None else f"reference ({reason})"
        if triton_interpret():
            cpu = ("Triton (interpreted)" if load_kernels(kernels) is not None
                   else f"{cpu_path} (kernels failed to import: {KERNEL_IMPORT_ERRORS.get(kernels)})")
        else:
            cpu = cpu_path() if callable(cpu_path) else cpu_path
        out[name] = f"cuda: {cuda} · cpu: {cpu}"
    return out


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, (n - 1).bit_length())
