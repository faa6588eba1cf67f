"""Depth-wise 3D convolution over channels-last video tokens: the temporal adapter's hot op.

Public entry point :func:`temporal_dwconv3d`; float reference :func:`temporal_dwconv3d_ref` (the CPU
kernel when the Triton interpreter is off, the test oracle, the benchmark baseline).

Layers (see ``STYLE.md``):

* ``rest_fast.kernels.dwconv3d`` — the ``@triton.jit`` kernels: the forward (which, run on ``dy`` with
  the mirrored kernel, is also ``dx``) and the ``dw``/``db`` partial-sum kernel.
* :func:`dwconv3d_fwd`, :func:`dwconv3d_bwd` — launchers: allocate outputs, pick tiles, compute the grid,
  reduce the ``dw``/``db`` partial sums. Callable directly (tests run them on CPU tensors under
  ``TRITON_INTERPRET=1``).
* ``torch.ops.rest_fast.temporal_dwconv3d`` / ``temporal_dwconv3d_backward`` — custom ops (CUDA: Triton;
  CPU: Triton interpreted when ``TRITON_INTERPRET=1``, else the reference), with fake kernels and
  autograd, so ``torch.compile(fullgraph=True)`` keeps them as single opaque nodes.

Backward traffic: ``dx`` reads ``dy`` and writes ``dx``; ``dw``/``db`` read ``dy`` and ``x`` — one pass more
over ``dy`` than a fused kernel, chosen because fusing put both the one-hot ``dw`` update and a cross-warp
reduction per tap into the inner loop (measured in PTX/SASS for sm_90: several times the instructions).

Determinism: ``dw``/``db`` are reduced without atomics — each program writes its partial sums to a
``[programs, taps + 1, C]`` buffer that is then summed in a fixed order — and that kernel's tile
configuration is a fixed function of ``(C, taps, device)``, never autotuned (timing noise would otherwise change
the partition and so the rounding). Two runs on the same device give bit-identical ``dw``/``db``. The
forward kernel is autotuned: every output element sums its taps in the same order whatever the tile, so
its result does not depend on the chosen configuration.

Double backward is not supported (the backward op has no autograd formula).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from rest_fast.ops._device import on_input_device
from rest_fast.ops._dispatch import (
    interpreter_safe,
    load_kernels,
    next_pow2,
    register_op,
    run_or_fallback,
    triton_interpret,
    triton_path,
)

__all__ = [
    "temporal_dwconv3d",
    "temporal_dwconv3d_ref",
    "temporal_dwconv3d_backward_ref",
    "dwconv3d_fwd",
    "dwconv3d_bwd",
    "triton_available",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_K = 7
_MAX_BLOCK_C = 128  # widest channel tile of the forward kernel; its weights are padded to a multiple of it


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Raise a clear error naming the argument when the inputs break the shape/dtype/device contract."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() != 5:
        raise ValueError(f"x must be [B, T, H, W, C] (5-D, channels-last), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be [C, kt, kh, kw] (4-D), got shape {tuple(weight.shape)}")
    C = x.shape[-1]
    if weight.shape[0] != C:
        raise ValueError(f"weight has {weight.shape[0]} channels but x has C={C} (weight must be [C, kt, kh, kw])")
    ks = tuple(weight.shape[1:])
    if any(k % 2 == 0 or not 1 <= k <= _MAX_K for k in ks):
        raise ValueError(f"weight kernel sizes (kt, kh, kw) must be odd and in 1..{_MAX_K}, got {ks}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must be [C] = [{C}], got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}; cast them to one dtype")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x dtype must be one of float16, bfloat16, float32, float64; got {x.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------
# reference (pure torch)
# ----------------------------------------------------------------------------------------------------


def temporal_dwconv3d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                          residual: bool = False) -> Tensor:
    """Float reference of :func:`temporal_dwconv3d` via ``F.conv3d(groups=C)``.

    x: ``[B, T, H, W, C]``; weight: ``[C, kt, kh, kw]`` (odd sizes); bias: ``[C]`` or None.
    Computes in ``promote_types(dtype, float32)`` (float64 stays float64), zero "same" padding, stride 1;
    returns ``[B, T, H, W, C]`` contiguous in ``x.dtype``. Differentiable.
    """
    _check_inputs(x, weight, bias)
    cd = _compute_dtype(x.dtype)
    C, kt, kh, kw = weight.shape
    if x.numel() == 0:  # C == 0 or an empty clip: F.conv3d rejects groups=0; the kernels return empty
        y = x.to(cd) * (weight.to(cd).sum() if weight.numel() else 0)  # keeps autograd connected
        return y.to(x.dtype).contiguous()
    xc = x.to(cd)
    y = F.conv3d(xc.permute(0, 4, 1, 2, 3), weight.to(cd).unsqueeze(1),
                 None if bias is None else bias.to(cd), padding=(kt // 2, kh // 2, kw // 2), groups=C)
    y = y.permute(0, 2, 3, 4, 1)
    if residual:
        y = y + xc
    return y.to(x.dtype).contiguous()


def temporal_dwconv3d_backward_ref(dy: Tensor, x: Tensor, weight: Tensor, *,
                                   residual: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit gradients of :func:`temporal_dwconv3d_ref`: ``(dx, dw, db)``.

    ``dx`` is the depth-wise convolution of ``dy`` with the kernel mirrored along all three axes (plus
    ``dy`` when ``residual``); ``dw`` the correlation of ``dy`` with ``x``; ``db`` the sum of ``dy``.
    Shapes: dx like x (contiguous), dw like weight (contiguous), db ``[C]``; dtypes follow x.
    """
    cd = _compute_dtype(x.dtype)
    C, kt, kh, kw = weight.shape
    if x.numel() == 0:  # nothing to sum: zero gradients (what the kernels return)
        return (torch.zeros(x.shape, dtype=x.dtype, device=x.device), torch.zeros_like(weight).contiguous(),
                torch.zeros(C, dtype=weight.dtype, device=weight.device))
    dx = temporal_dwconv3d_ref(dy.to(cd), weight.to(cd).flip(1, 2, 3), residual=residual).to(x.dtype)
    g = dy.to(cd).permute(0, 4, 1, 2, 3)
    dw = torch.nn.grad.conv3d_weight(x.to(cd).permute(0, 4, 1, 2, 3), (C, 1, kt, kh, kw), g,
                                     padding=(kt // 2, kh // 2, kw // 2), groups=C)
    dw = dw.reshape(C, kt, kh, kw).to(weight.dtype).contiguous()
    db = g.sum(dim=(0, 2, 3, 4)).to(weight.dtype)
    return dx.contiguous(), dw, db


# ----------------------------------------------------------------------------------------------------
# launchers (Triton)
# ----------------------------------------------------------------------------------------------------


def _kernels():
    return load_kernels("dwconv3d")


def triton_available() -> bool:
    """Whether the Triton kernels import; if not, ``KERNEL_IMPORT_ERRORS`` says why and the reference serves."""
    return _kernels() is not None


def _needs_int64(*tensors: Tensor) -> bool:
    """True when some element offset may not fit in int32."""
    lim = 2**31 - 1
    for t in tensors:
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if span > lim or t.numel() > lim:
            return True
    return False


def _fwd_configs():
    import triton

    cfgs = []
    for bp in (16, 32, 64, 128):
        for bc in (32, 64, 128):
            for nw in (2, 4, 8):
                # 4..16 elements per thread: more makes ptxas spill (all 27 tap loads are in flight).
                if 1024 <= bp * bc <= 8192 and 4 <= bp * bc // (32 * nw) <= 16:
                    cfgs.append(triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=nw, num_stages=1))
    return cfgs


def _prune_fwd(configs, named_args, **kwargs):
    # A channel tile much wider than C only burns masked lanes.
    cap = max(32, next_pow2(int(named_args["C"])))
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= cap]
    return kept or configs[:1]


@functools.lru_cache(maxsize=1)
def _fwd_autotuned():
    import triton

    # Keyed on C and the kernel size (the shapes that change the best tile); Triton adds the dtypes.
    return triton.autotune(configs=_fwd_configs(), key=["C", "KT", "KH", "KW", "HAS_BIAS"],
                           prune_configs_by={"early_config_prune": _prune_fwd})(_kernels().dwconv3d_fwd_kernel)


def _interp_block_c(C: int) -> int:
    # The interpreter costs per op, not per element: large tiles, few programs.
    return min(64, max(16, next_pow2(C)))


def _padded_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The forward kernel's weight layout: ``[kt, kh, kw, C_pad]`` in the accumulation dtype.

    A tap's weights are contiguous along C (vector loads), need no conversion inside the tap loop and,
    zero-padded to a multiple of the widest channel tile, no load mask. A tiny copy: taps·C elements.
    """
    C, KT, KH, KW = weight.shape
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    c_pad = -(-C // _MAX_BLOCK_C) * _MAX_BLOCK_C
    wt = torch.zeros((KT, KH, KW, c_pad), dtype=acc_dtype, device=weight.device)
    wt[..., :C] = weight.permute(1, 2, 3, 0)
    return wt


def _fwd_launch(x: Tensor, wt: Tensor, bias: Tensor | None, y: Tensor, *, residual: bool,
                flip: bool) -> tuple[tuple, dict]:
    """``(args, flags)`` of a forward-kernel launch, without tiles (shared with :mod:`rest_fast.ops.aot`)."""
    B, T, H, W, C = x.shape
    KT, KH, KW = wt.shape[:3]
    w_strides = (wt.stride(3), wt.stride(0), wt.stride(1), wt.stride(2))
    args = (x, wt, bias if bias is not None else wt, y, B * T * H * W, T, H, W, C, *x.stride(), *w_strides)
    flags = dict(KT=KT, KH=KH, KW=KW, HAS_BIAS=bias is not None, RESIDUAL=residual, FLIP=flip,
                 ACC_FP64=x.dtype == torch.float64, OFF64=_needs_int64(x, y))
    return args, flags


@on_input_device
def dwconv3d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, residual: bool = False,
                 flip: bool = False, block_p: int | None = None, block_c: int | None = None,
                 num_warps: int = 4) -> Tensor:
    """Launch the Triton forward: ``y = conv(x, weight) (+ bias) (+ x)``, ``[B, T, H, W, C]`` contiguous.

    ``flip=True`` mirrors the kernel (then ``dwconv3d_fwd(dy, w, flip=True)`` is the input gradient).
    Tiles: given ``block_p``/``block_c`` win; else autotuned on CUDA, fixed large tiles under the
    interpreter. Inputs must already satisfy the contract of :func:`temporal_dwconv3d`.
    """
    k = _kernels()
    B, T, H, W, C = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    N = B * T * H * W
    if N == 0 or C == 0:
        return y
    args, flags = _fwd_launch(x, _padded_weight(weight, x.dtype), bias, y, residual=residual, flip=flip)
    if block_p is None and block_c is None and x.device.type == "cuda" and not triton_interpret():
        import triton

        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))
        _fwd_autotuned()[grid](*args, **flags)
        return y
    if block_c is None:
        block_c = _interp_block_c(C) if x.device.type != "cuda" else min(64, max(32, next_pow2(C)))
    if block_c > _MAX_BLOCK_C:
        raise ValueError(f"block_c={block_c} exceeds the weight padding {_MAX_BLOCK_C}")
    if block_p is None:
        block_p = 256 if x.device.type != "cuda" else max(16, 4096 // block_c)
    grid = (-(-N // block_p), -(-C // block_c))
    k.dwconv3d_fwd_kernel[grid](*args, **flags, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    return y


def _bwd_w_config(C: int, taps_p2: int, device: torch.device | str,
                  sms: int | None = None) -> tuple[int, int, int, int]:
    """``(BLOCK_P, BLOCK_C, programs along rows, num_warps)`` of the dw/db kernel: a fixed function of the
    shape and device, never autotuned (see the module docstring on determinism). ``sms`` (streaming
    multiprocessors) is read from the device when not given."""
    device = torch.device(device)
    if device.type != "cuda":
        # Interpreter: big blocks (it pays per op), two row programs so tests cover the cross-program sum.
        return 64, _interp_block_c(C), 2, 4
    # The [TAPS_P2, BLOCK_P, BLOCK_C] fp32 accumulator and the matching x block live in registers: ~32
    # accumulator elements per thread (3x3x3 at C=768: [32, 2, 64] over 4 warps, 95 registers). 64 per
    # thread compiled clean for 3x3x3 but ptxas spilled for other kernel sizes (1x1x1 at C=37: 936 B;
    # 5x3x1 fp16: 12 B), so the launcher keeps to 32 (tests/test_kernels_aot.py checks sm_90/sm_80).
    # Not yet timed on a GPU; `bench/dwconv.py --sweep` times the alternatives.
    num_warps = 4
    per_cta = 32 * 32 * num_warps
    # The widest power of two not above C (16..64): a tile much wider than C idles lanes (C = 37 in a
    # 64-wide tile: 27 of 64).
    block_c = min(64, max(16, 1 << max(0, C.bit_length() - 1)))
    while taps_p2 * block_c > per_cta and block_c > 16:
        block_c //= 2
    block_p = max(1, per_cta // (taps_p2 * block_c))
    # Enough programs to fill every SM several times (small tail), few enough that the partial-sum
    # buffer stays a few MB: about 8 programs per SM in total.
    if sms is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    progs = max(1, (8 * sms) // -(-C // block_c))
    return block_p, block_c, progs, num_warps


def _bwd_w_launch(dy: Tensor, x: Tensor, part: Tensor, ksize: tuple[int, int, int], block_p: int, block_c: int,
                  per_prog: int, num_warps: int) -> tuple[tuple, tuple, dict]:
    """``(grid, args, kwargs)`` of a dw/db-kernel launch (shared with :mod:`rest_fast.ops.aot`)."""
    B, T, H, W, C = x.shape
    KT, KH, KW = ksize
    grid = (part.shape[0], -(-C // block_c))
    args = (dy, x, part, B * T * H * W, T, H, W, C, per_prog, *dy.stride(), *x.stride())
    kwargs = dict(KT=KT, KH=KH, KW=KW, ACC_FP64=part.dtype == torch.float64, OFF64=_needs_int64(dy, x),
                  TAPS_P2=next_pow2(KT * KH * KW), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    return grid, args, kwargs


def _bwd_w_programs(N: int, block_p: int, programs: int) -> tuple[int, int]:
    """``(programs, row blocks per program)`` for ``N`` rows: every program walks the same block count."""
    n_blocks = -(-N // block_p)
    per_prog = -(-n_blocks // min(programs, n_blocks))
    return -(-n_blocks // per_prog), per_prog


@on_input_device
def dwconv3d_bwd(dy: Tensor, x: Tensor, weight: Tensor, *, residual: bool = False, need_dx: bool = True,
                 need_dw: bool = True, block_p: int | None = None, block_c: int | None = None,
                 programs: int | None = None, num_warps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the Triton backward; returns ``(dx, dw, db)``.

    dy, x: ``[B, T, H, W, C]`` (any strides); weight ``[C, kt, kh, kw]``. ``dx`` ``[B, T, H, W, C]``
    contiguous in x's dtype (``[0]`` when ``need_dx=False``): the forward kernel run on ``dy`` with the
    mirrored kernel (``+ dy`` when ``residual``). ``dw`` ``[C, kt, kh, kw]`` and ``db`` ``[C]`` in
    weight's dtype (both ``[0]`` when ``need_dw=False``): the dw/db kernel's per-program partial sums
    ``[programs, taps + 1, C]`` (fp32, fp64 for fp64 inputs) summed over programs in a fixed order.
    ``block_p``/``block_c``/``programs``/``num_warps`` override the dw/db kernel's fixed configuration.
    """
    k = _kernels()
    B, T, H, W, C = x.shape
    KT, KH, KW = weight.shape[1:]
    taps = KT * KH * KW
    N = B * T * H * W
    dx = dwconv3d_fwd(dy, weight, residual=residual, flip=True) if need_dx else x.new_empty((0,))
    if not need_dw:
        return dx, weight.new_empty((0,)), weight.new_empty((0,))
    if N == 0 or C == 0:
        return dx, torch.zeros_like(weight, memory_format=torch.contiguous_format), weight.new_zeros((C,))
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    taps_p2 = next_pow2(taps)
    bp, bc, progs, nw = _bwd_w_config(C, taps_p2, x.device)
    bp, bc, progs, nw = block_p or bp, block_c or bc, programs or progs, num_warps or nw
    progs, per_prog = _bwd_w_programs(N, bp, progs)
    part = torch.empty((progs, taps + 1, C), dtype=acc_dtype, device=x.device)
    grid, args, kwargs = _bwd_w_launch(dy, x, part, (KT, KH, KW), bp, bc, per_prog, nw)
    k.dwconv3d_bwd_w_kernel[grid](*args, **kwargs)
    # Fixed-order reduction of the per-program partials (torch's sum is deterministic, no atomics).
    red = part.sum(dim=0)
    dw = red[:taps].t().reshape(C, KT, KH, KW).to(weight.dtype).contiguous()
    db = red[taps].to(weight.dtype, copy=True)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------


register_op("temporal_dwconv3d", "dwconv3d")


def _triton_ok(*tensors: Tensor) -> bool:
    return triton_path("temporal_dwconv3d", "dwconv3d", *tensors)


def _fwd_impl(x: Tensor, weight: Tensor, bias: Tensor | None, residual: bool) -> Tensor:
    if _triton_ok(x, weight):
        x, weight, bias = interpreter_safe(x, weight, bias)
        return run_or_fallback("temporal_dwconv3d", dwconv3d_fwd, temporal_dwconv3d_ref, x, weight, bias,
                               residual=residual)
    return temporal_dwconv3d_ref(x, weight, bias, residual=residual)


@torch.library.custom_op("rest_fast::temporal_dwconv3d", mutates_args=(), device_types="cuda")
def _temporal_dwconv3d_op(x: Tensor, weight: Tensor, bias: Tensor | None, residual: bool) -> Tensor:
    return _fwd_impl(x, weight, bias, residual)


@_temporal_dwconv3d_op.register_kernel("cpu")
def _temporal_dwconv3d_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, residual: bool) -> Tensor:
    # Interpreted Triton when TRITON_INTERPRET=1 (how tests exercise the real kernels), else the reference.
    return _fwd_impl(x, weight, bias, residual)


@_temporal_dwconv3d_op.register_fake
def _temporal_dwconv3d_fake(x: Tensor, weight: Tensor, bias: Tensor | None, residual: bool) -> Tensor:
    return x.new_empty(x.shape)


def _bwd_ref(dy, x, weight, residual=False, need_dx=True, need_dw=True):
    dx, dw, db = temporal_dwconv3d_backward_ref(dy, x, weight, residual=residual)
    if not need_dx:
        dx = x.new_empty((0,))
    if not need_dw:
        dw, db = weight.new_empty((0,)), weight.new_empty((0,))
    return dx, dw, db


def _bwd_impl(dy, x, weight, residual, need_dx, need_dw):
    if _triton_ok(dy, x, weight):
        dy, x, weight = interpreter_safe(dy, x, weight)
        return run_or_fallback("temporal_dwconv3d", dwconv3d_bwd, _bwd_ref, dy, x, weight, residual=residual,
                               need_dx=need_dx, need_dw=need_dw)
    return _bwd_ref(dy, x, weight, residual, need_dx, need_dw)


@torch.library.custom_op("rest_fast::temporal_dwconv3d_backward", mutates_args=(), device_types="cuda")
def _temporal_dwconv3d_backward_op(dy: Tensor, x: Tensor, weight: Tensor, residual: bool, need_dx: bool,
                                   need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dy, x, weight, residual, need_dx, need_dw)


@_temporal_dwconv3d_backward_op.register_kernel("cpu")
def _temporal_dwconv3d_backward_cpu(dy: Tensor, x: Tensor, weight: Tensor, residual: bool, need_dx: bool,
                                    need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dy, x, weight, residual, need_dx, need_dw)


@_temporal_dwconv3d_backward_op.register_fake
def _temporal_dwconv3d_backward_fake(dy: Tensor, x: Tensor, weight: Tensor, residual: bool, need_dx: bool,
                                     need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dw = weight.new_empty(weight.shape) if need_dw else weight.new_empty((0,))
    db = weight.new_empty((weight.shape[0],)) if need_dw else weight.new_empty((0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.residual = residual


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    dx, dw, db = torch.ops.rest_fast.temporal_dwconv3d_backward(dy, x, weight, ctx.residual, need_dx, need_dw)
    return (dx if need_dx else None, dw if ctx.needs_input_grad[1] else None,
            db if ctx.has_bias and ctx.needs_input_grad[2] else None, None)


_temporal_dwconv3d_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------


def temporal_dwconv3d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, residual: bool = False) -> Tensor:
    """Depth-wise 3D convolution of a channels-last video, "same" zero padding, stride 1.

    Args:
        x: ``[B, T, H, W, C]``, float16 / bfloat16 / float32 (float64 accepted, accumulated in float64).
            Any strides: the kernels read ``x`` through its strides, so views (a slice of a wider tensor,
            the patch tokens of ``[B*T, 1+H*W, C]`` viewed as ``[B, T, H, W, C]``, a permuted NCDHW
            tensor) cost no copy. Loads are vectorised along ``C`` only when ``x.stride(-1) == 1``;
            with a strided ``C`` (e.g. an NCDHW tensor permuted to channels-last) every load is a
            gather, several times slower, but still correct and copy-free.
        weight: ``[C, kt, kh, kw]``, odd kernel sizes in 1..7 (``(3, 3, 3)`` for the adapter), x's dtype.
        bias: ``[C]`` or None, x's dtype.
        residual: return ``x + conv(x)`` computed in the same pass (one read of ``x``).

    Returns:
        ``[B, T, H, W, C]`` in ``x.dtype``, always contiguous (channels-last). Accumulation is fp32
        (fp64 for fp64 inputs) whatever the input dtype.

    Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them through the Triton interpreter
    when ``TRITON_INTERPRET=1`` and :func:`temporal_dwconv3d_ref` otherwise; other devices use the
    reference. Differentiable in x, weight and bias (deterministic ``dw``/``db``); compiles with
    ``torch.compile(fullgraph=True)`` as one opaque op.
    """
    _check_inputs(x, weight, bias)
    if x.device.type in ("cuda", "cpu"):
        return torch.ops.rest_fast.temporal_dwconv3d(x, weight, bias, residual)
    return temporal_dwconv3d_ref(x, weight, bias, residual=residual)
