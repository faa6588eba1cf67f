"""Fused caption re-ranking: the top-k *distinct* candidate captions per video by video-text similarity.

Public entry point :func:`rerank_captions`; reference :func:`rerank_captions_ref` (the CPU path when the
Triton interpreter is off, the test oracle and the benchmark baseline); Triton launcher
:func:`rerank_captions_triton`.

Used every REST round with ``k = 3`` and ``L ≈ 8,000`` candidates per video (the captions of the video's
neighbours, with many repeats). The Triton kernel gathers candidate caption rows, dots them with the video
feature and keeps a running top-k of distinct ids in registers: ``N·L·d`` gathered elements read once,
``N·k`` written, against the torch route that materialises ``[n, L, d]`` gathered features and ``[n, L]``
scores and sorts them.

Ordering and ties: scores descending; equal scores by caption id ascending (the packed-key order of
:mod:`rest_fast.ops.topk`). Duplicated ids in a row count once. Rows with fewer than ``k`` distinct valid
candidates are padded with score ``-inf`` and id ``-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rest_fast.ops._device import on_input_device
from rest_fast.ops._dispatch import (
    interpreter_safe,
    kernels_unavailable,
    load_kernels,
    next_pow2,
    register_op,
    run_or_fallback,
    triton_path,
)
from rest_fast.ops.topk import _KEY_MIN, pack_keys, unpack_indices, unpack_scores

__all__ = ["rerank_captions", "rerank_captions_ref", "rerank_captions_triton", "MAX_TRITON_K"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_K = 32  # the kernel unrolls k passes per merge; larger k uses the reference
# Bytes of gathered candidate features per block of the reference (~8 B per element: the gather in the input dtype
# plus its float32 copy). On CPU a small block stays in cache: at L = 132 / 4,000 candidates and d = 512 (2 cores),
# 8 MiB ran 2x faster per video than 256 MiB and held ~100-300 MB less (bench/results, rerank_ref_block). On CUDA a
# block is a few kernel launches, so it stays large (the reference there is the fallback and the test oracle).
REF_BLOCK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


def _check_inputs(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor, k: int,
                  dtypes: tuple[torch.dtype, ...] = _DTYPES, *, check: bool = True) -> None:
    """Types, shapes, dtypes and devices always (metadata only); with ``check`` also the id range and
    finiteness, which read every element and sync with the host."""
    for name, t in (("video_feats", video_feats), ("caption_feats", caption_feats), ("candidates", candidates)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.device != video_feats.device:
            raise ValueError(f"{name} is on {t.device} but video_feats is on {video_feats.device}")
    for name, t in (("video_feats", video_feats), ("caption_feats", caption_feats)):
        if t.dtype not in dtypes:
            raise ValueError(f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if video_feats.shape[1] != caption_feats.shape[1]:
        raise ValueError(f"video_feats has d={video_feats.shape[1]} but caption_feats has d={caption_feats.shape[1]}")
    if candidates.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"candidates must be int32 (or int64), got {candidates.dtype}")
    if candidates.shape[0] != video_feats.shape[0]:
        raise ValueError(f"candidates must be [N, L] with N={video_feats.shape[0]}, got {tuple(candidates.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not check:
        return
    C = caption_feats.shape[0]
    if candidates.numel():
        lo, hi = int(candidates.min()), int(candidates.max())
        if lo < -1 or hi >= C:
            raise ValueError(f"candidates must hold caption ids in [0, {C}) or -1 (empty), got range [{lo}, {hi}]")
    if caption_feats.numel() and not bool(torch.isfinite(caption_feats).all()):
        raise ValueError("caption_feats contains NaN or inf")
    if video_feats.numel() and not bool(torch.isfinite(video_feats).all()):
        raise ValueError("video_feats contains NaN or inf")


def _distinct_topk(keys: Tensor, k: int) -> Tensor:
    """Top-``k`` distinct packed keys per row, descending, padded with the smallest key."""
    n, L = keys.shape
    out = torch.full((n, k), _KEY_MIN, dtype=torch.int64, device=keys.device)
    if L == 0:
        return out
    if k <= 8:
        # k passes of "largest key below the last one taken": duplicates share a key, so they go together.
        for t in range(k):
            cur = keys.max(1).values
            out[:, t] = cur
            keys = torch.where(keys >= cur[:, None], _KEY_MIN, keys)
        return out
    srt = torch.sort(keys, dim=1, descending=True).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    srt = torch.where(dup, _KEY_MIN, srt)
    kk = min(k, L)
    out[:, :kk] = torch.topk(srt, kk, dim=1, sorted=True).values
    return out


def rerank_captions_ref(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor, k: int, *,
                        block: int | None = None, check: bool = True) -> tuple[Tensor, Tensor]:
    """Reference for :func:`rerank_captions` (torch gather + batched dot + distinct top-k, any device).

    Computes in ``torch.promote_types(dtype, float32)``, ``block`` videos at a time (default: as many as
    keep the gathered ``[block, L, d]`` features near :data:`REF_BLOCK_BYTES` of the device: 8 MiB on CPU, 256 MiB
    on CUDA). Accepts float64. ``check``: as in :func:`rerank_captions`.
    """
    _check_inputs(video_feats, caption_feats, candidates, k, _DTYPES + (torch.float64,), check=check)
    N, L = candidates.shape
    dev = video_feats.device
    if block is None:
        budget = REF_BLOCK_BYTES.get(dev.type, REF_BLOCK_BYTES["cuda"])
        block = max(1, min(1024, budget // max(1, L * caption_feats.shape[1] * 8)))
    ct = torch.promote_types(torch.promote_types(video_feats.dtype, caption_feats.dtype), torch.float32)
    out_s = torch.empty(N, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(N, k, dtype=torch.int32, device=dev)
    if caption_feats.shape[0] == 0:  # no captions: every slot is empty (ids were checked to be -1)
        out_s.fill_(float("-inf"))
        out_i.fill_(-1)
        return out_s, out_i
    for n0 in range(0, N, block):
        cand = candidates[n0:n0 + block].long()
        valid = cand >= 0
        g = caption_feats[cand.clamp_min(0)].to(ct)  # [b, L, d]
        v = video_feats[n0:n0 + block].to(ct)
        s = torch.bmm(g, v[:, :, None]).squeeze(2).float()  # [b, L]
        keys = torch.where(valid, pack_keys(s, cand.clamp_min(0)), _KEY_MIN)
        best = _distinct_topk(keys, k)
        empty = best == _KEY_MIN
        out_s[n0:n0 + block] = torch.where(empty, float("-inf"), unpack_scores(best))
        out_i[n0:n0 + block] = torch.where(empty, -1, unpack_indices(best)).to(torch.int32)
    return out_s, out_i


def _kernels():
    return load_kernels("rerank")


def _tiles(device_type: str, L: int, D: int, dtype: torch.dtype = torch.float16) -> dict:
    """Chunk sizes of the re-rank kernel: ``BL`` candidates × ``BD`` feature elements per step.

    CUDA: a ``64 × 128`` gathered chunk for 16-bit features; ``64 × 64`` for fp32, whose ``64 × 128``
    chunk spilled on sm_80 (``tests/test_kernels_aot.py``).
    """
    if device_type == "cuda":
        bd = 64 if dtype == torch.float32 else 128
        return dict(BL=64, BD=min(bd, max(16, next_pow2(D))), num_warps=4)
    # Interpreter: cost per op, so few large chunks.
    return dict(BL=min(1024, max(16, next_pow2(L))), BD=min(256, max(16, next_pow2(D))), num_warps=4)


def _rerank_launch(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor, out_s: Tensor, out_i: Tensor,
                   t: dict) -> tuple[tuple, tuple, dict]:
    """``(grid, args, kwargs)`` of one re-rank launch (shared with :mod:`rest_fast.ops.aot`)."""
    N, L = candidates.shape
    k = out_s.shape[1]
    args = (video_feats, caption_feats, candidates, out_s, out_i, L, video_feats.shape[1], caption_feats.shape[0],
            video_feats.stride(0), video_feats.stride(1), caption_feats.stride(0), caption_feats.stride(1),
            candidates.stride(0), candidates.stride(1))
    kwargs = dict(K=k, KP=max(2, next_pow2(k)), BL=t["BL"], BD=t["BD"], num_warps=t["num_warps"])
    return (N,), args, kwargs


@on_input_device
def rerank_captions_triton(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor,
                           k: int, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """Triton launcher for :func:`rerank_captions` (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``k ≤ 32``."""
    _check_inputs(video_feats, caption_feats, candidates, k, check=check)
    if k > MAX_TRITON_K:
        raise ValueError(f"k={k} exceeds the Triton kernel's limit {MAX_TRITON_K}; use rerank_captions_ref")
    kern = _kernels()
    if kern is None:
        raise kernels_unavailable("rerank")
    N, L = candidates.shape
    D = video_feats.shape[1]
    dev = video_feats.device
    out_s = torch.empty(N, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(N, k, dtype=torch.int32, device=dev)
    if N == 0:
        return out_s, out_i
    dt = torch.promote_types(video_feats.dtype, caption_feats.dtype)
    grid, args, kwargs = _rerank_launch(video_feats, caption_feats, candidates, out_s, out_i,
                                        _tiles(dev.type, L, D, dt))
    kern.rerank_kernel[grid](*args, **kwargs)
    return out_s, out_i


register_op("rerank_captions", "rerank")


def _dispatch(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor, k: int,
              check: bool = True) -> tuple[Tensor, Tensor]:
    # float64 and k > MAX_TRITON_K are served by the reference on every path (by design, no warning).
    low = video_feats.dtype != torch.float64 and caption_feats.dtype != torch.float64
    if low and k <= MAX_TRITON_K and triton_path("rerank_captions", "rerank", video_feats, caption_feats, candidates):
        v, c, cand = interpreter_safe(video_feats, caption_feats, candidates)
        return run_or_fallback("rerank_captions", rerank_captions_triton, rerank_captions_ref, v, c, cand, k,
                               check=check)
    return rerank_captions_ref(video_feats, caption_feats, candidates, k, check=check)


@torch.library.custom_op("rest_fast::rerank_captions", mutates_args=(), device_types="cuda")
def _rerank_op(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor, k: int,
               check: bool = True) -> tuple[Tensor, Tensor]:
    return _dispatch(video_feats, caption_feats, candidates, k, check)


@_rerank_op.register_kernel("cpu")
def _rerank_op_cpu(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor,
                   k: int, check: bool = True) -> tuple[Tensor, Tensor]:
    return _dispatch(video_feats, caption_feats, candidates, k, check)


@_rerank_op.register_fake
def _rerank_op_fake(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor,
                    k: int, check: bool = True) -> tuple[Tensor, Tensor]:
    N = candidates.shape[0]
    return video_feats.new_empty(N, k, dtype=torch.float32), video_feats.new_empty(N, k, dtype=torch.int32)


def rerank_captions(video_feats: Tensor, caption_feats: Tensor, candidates: Tensor,
                    k: int, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """Top-``k`` distinct candidate captions per video, by dot product.

    Args:
        video_feats: ``[N, d]`` float32 / float16 / bfloat16.
        caption_feats: ``[C, d]`` same family, same device.
        candidates: int32 ``[N, L]`` caption ids per video, ``-1`` = empty slot; ids may repeat.
        k: captions to keep per video (REST uses 3).
        check: validate the values (every id in ``[-1, C)``, features finite): a full scan of ``caption_feats``
            and host syncs on every call. ``False`` skips them for a caller that validated once for many calls
            (the trainer's retrieval update, one call per block); shapes, dtypes and devices are always checked.
            With ``check=False`` an out-of-range id is undefined behaviour (an out-of-bounds read on CUDA).

    Returns:
        ``(scores, ids)``: float32 ``[N, k]`` descending and int32 ``[N, k]``; equal scores by id ascending;
        ``-inf`` / ``-1`` padding when a video has fewer than ``k`` distinct candidates.

    Dispatch: CUDA → Triton (``k ≤ 32``); CPU with ``TRITON_INTERPRET=1`` → Triton interpreted; else (or for
    larger ``k``) the reference :func:`rerank_captions_ref`. Runs as the custom op
    ``torch.ops.rest_fast.rerank_captions`` (a single opaque node under ``torch.compile``).
    """
    if not all(isinstance(t, Tensor) for t in (video_feats, caption_feats, candidates)):
        _check_inputs(video_feats, caption_feats, candidates, k)  # raises the TypeError naming the argument
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be a positive int, got {k!r}")
    # No autograd: re-ranking selects ids; nothing is differentiated through it.
    return _rerank_op(video_feats.detach(), caption_feats.detach(), candidates, k, bool(check))
