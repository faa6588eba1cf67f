"""Temporal adapter for a frozen image ViT: ``Z' = Z + a(Z)``, a depth-wise 3D conv over the patch grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rest_fast.ops.dwconv3d import temporal_dwconv3d

__all__ = ["TemporalAdapter"]


class TemporalAdapter(nn.Module):
    """Residual depth-wise ``kt×kh×kw`` convolution over ViT patch tokens of a clip (REST / GAR Eq. 1).

    Input and output: tokens ``[B*T, 1 + H*W, C]`` with the frames of each clip consecutive
    (``T = num_frames``) and a square patch grid (``H = W = sqrt(H*W)``). The CLS token (index 0) is
    returned untouched; the patch tokens, viewed without a copy as ``[B, T, H, W, C]``, become
    ``x + conv(x) + bias`` computed by :func:`rest_fast.ops.temporal_dwconv3d` in one fused pass.

    Initialisation: ``weight ~ N(0, init_std²)`` with ``init_std = 1e-3`` by default, ``bias = 0``.
    The adapter is inserted into a *pretrained* captioner, so at step 0 it must be ≈ identity: the
    residual branch has RMS ≈ ``init_std·sqrt(kt·kh·kw)`` ≈ 0.5 % of the token RMS for 3×3×3 (about
    one bf16 ulp), so the pretrained BLIP behaves as before. Zero weights would also train (in a
    depth-wise conv ``dw`` = correlation of ``dy`` with ``x`` does not depend on ``w``); the small
    non-zero draw is chosen so that a mis-wired adapter (wrong token layout, wrong frame order) already
    changes the output at init — and is caught by tests — instead of hiding behind an exact no-op.
    Pass ``init_std=0.0`` for an exact identity at init.

    Under autocast / mixed precision the fp32 parameters are cast to the tokens' dtype on the fly (the
    op wants one dtype); gradients flow back to the fp32 master copies.
    """

    def __init__(self, dim: int, num_frames: int, kernel_size: tuple[int, int, int] = (3, 3, 3), *,
                 init_std: float = 1e-3) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        kernel_size = tuple(int(k) for k in kernel_size)
        if len(kernel_size) != 3 or any(k % 2 == 0 or not 1 <= k <= 7 for k in kernel_size):
            raise ValueError(f"kernel_size must be three odd sizes in 1..7, got {kernel_size}")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.dim = dim
        self.num_frames = num_frames
        self.kernel_size = kernel_size
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(dim, *kernel_size))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init_std > 0:
                nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
            else:
                self.weight.zero_()
            self.bias.zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens ``[B*T, 1 + H*W, C]`` → same shape and dtype (CLS untouched, patches adapted)."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be [B*T, 1+H*W, C] (3-D), got shape {tuple(tokens.shape)}")
        bt, n, c = tokens.shape
        if c != self.dim:
            raise ValueError(f"tokens have C={c} but the adapter was built with dim={self.dim}")
        if bt % self.num_frames:
            raise ValueError(f"tokens' first dim B*T={bt} is not divisible by num_frames={self.num_frames}")
        hw = n - 1
        side = math.isqrt(hw) if hw > 0 else 0
        if hw < 1 or side * side != hw:
            raise ValueError(f"tokens carry {hw} patch tokens after CLS; expected a square grid H*W (H == W)")
        t = self.num_frames
        # A view for the usual token layouts (reshape copies only if it must): the kernel reads the
        # patch tokens through their strides.
        patches = tokens[:, 1:].reshape(bt // t, t, side, side, c)
        w, b = self.weight, self.bias
        if w.dtype != tokens.dtype:
            w, b = w.to(tokens.dtype), b.to(tokens.dtype)
        out = temporal_dwconv3d(patches, w, b, residual=True)
        return torch.cat([tokens[:, :1], out.view(bt, hw, c)], dim=1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_frames={self.num_frames}, kernel_size={self.kernel_size}, "
                f"init_std={self.init_std:g}, residual=True")
