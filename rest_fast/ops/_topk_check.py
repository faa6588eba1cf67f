"""The input contract of :func:`rest_fast.ops.topk_similarity`, shared by its paths.

Below both :mod:`rest_fast.ops.topk` (dispatch, reference, Triton path) and :mod:`rest_fast.ops.topk_cpu`
(native CPU path) so neither imports the other for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_topk_inputs", "TOPK_DTYPES"]

TOPK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_topk_inputs(queries: Tensor, keys: Tensor, k: int, exclude: Tensor | None,
                      dtypes: tuple[torch.dtype, ...] = TOPK_DTYPES) -> Tensor | None:
    """Validate the contract; return ``exclude`` as int64 (or None). Raises naming the argument."""
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D ([rows, d]), got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries has d={queries.shape[1]} but keys has d={keys.shape[1]}")
    if queries.device != keys.device:
        raise ValueError(f"keys is on {keys.device} but queries is on {queries.device}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    M, N = queries.shape[0], keys.shape[0]
    if exclude is not None:
        if not isinstance(exclude, Tensor):
            raise TypeError(f"exclude must be a torch.Tensor or None, got {type(exclude).__name__}")
        if exclude.shape != (M,):
            raise ValueError(f"exclude must be [M] = [{M}], got shape {tuple(exclude.shape)}")
        if exclude.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"exclude must be int64 (or int32), got {exclude.dtype}")
        if exclude.device != queries.device:
            raise ValueError(f"exclude is on {exclude.device} but queries is on {queries.device}")
        exclude = exclude.to(torch.int64)
        if M and (int(exclude.min()) < -1 or int(exclude.max()) >= N):
            raise ValueError(f"exclude values must be -1 (none) or key indices in [0, {N}), "
                             f"got range [{int(exclude.min())}, {int(exclude.max())}]")
    eligible = N - (int((exclude >= 0).any()) if (exclude is not None and M) else 0)
    if k > eligible:
        raise ValueError(f"k={k} exceeds the number of eligible keys per query ({eligible}: N={N}"
                         f"{' minus the excluded key' if eligible < N else ''})")
    for name, t in (("queries", queries), ("keys", keys)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
    return exclude
