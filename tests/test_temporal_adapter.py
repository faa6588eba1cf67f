"""rest_fast.nn.TemporalAdapter on ViT token layouts (Triton kernels interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_verbose

from rest_fast.nn import TemporalAdapter
from rest_fast.ops import temporal_dwconv3d_ref


def _tokens(b, t, side, c, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b * t, 1 + side * side, c, generator=g).to(dtype)


def _expected(adapter: TemporalAdapter, tokens: torch.Tensor) -> torch.Tensor:
    """Float64 reference: CLS copied, patches = x + conv(x) + bias on the [B, T, H, W, C] grid."""
    bt, n, c = tokens.shape
    t = adapter.num_frames
    side = int(round((n - 1) ** 0.5))
    x = tokens.double()[:, 1:].reshape(bt // t, t, side, side, c)
    y = temporal_dwconv3d_ref(x, adapter.weight.double(), adapter.bias.double(), residual=True)
    return torch.cat([tokens.double()[:, :1], y.reshape(bt, n - 1, c)], dim=1)


def test_shapes_cls_and_values():
    torch.manual_seed(0)
    ad = TemporalAdapter(dim=12, num_frames=3)
    with torch.no_grad():  # a non-trivial kernel so the check has teeth
        ad.weight.normal_(0, 0.3)
        ad.bias.normal_(0, 0.3)
    tok = _tokens(2, 3, 4, 12)
    out = ad(tok)
    assert out.shape == tok.shape and out.dtype == tok.dtype
    assert torch.equal(out[:, 0], tok[:, 0])
    assert_close_verbose(out, _expected(ad, tok), torch.float32, "adapter out")


def test_init_is_near_identity():
    torch.manual_seed(0)
    ad = TemporalAdapter(dim=16, num_frames=4)
    assert ad.weight.shape == (16, 3, 3, 3) and ad.bias.shape == (16,)
    assert 5e-4 < float(ad.weight.detach().std()) < 2e-3 and torch.equal(ad.bias, torch.zeros(16))
    tok = _tokens(1, 4, 3, 16, seed=1)
    out = ad(tok)
    rel = float((out - tok).detach().norm() / tok.norm())
    assert 0 < rel < 1e-2, rel  # close to identity, but the conv path is live
    exact = TemporalAdapter(dim=16, num_frames=4, init_std=0.0)
    assert torch.equal(exact(tok), tok)


def test_gradients_reach_all_parameters_and_tokens():
    torch.manual_seed(0)
    ad = TemporalAdapter(dim=8, num_frames=2, kernel_size=(3, 1, 3))
    tok = _tokens(2, 2, 3, 8, seed=2).requires_grad_()
    g = torch.randn(tok.shape, generator=torch.Generator().manual_seed(3))
    ad(tok).backward(g)
    # Reference gradients through the float64 reference graph.
    ref_params = [ad.weight.detach().double().requires_grad_(), ad.bias.detach().double().requires_grad_()]
    tok64 = tok.detach().double().requires_grad_()
    bt, n, c = tok.shape
    x = tok64[:, 1:].reshape(bt // 2, 2, 3, 3, c)
    y = temporal_dwconv3d_ref(x, *ref_params, residual=True)
    out64 = torch.cat([tok64[:, :1], y.reshape(bt, n - 1, c)], dim=1)
    gt, gw, gb = torch.autograd.grad(out64, [tok64, *ref_params], g.double())
    assert_close_verbose(tok.grad, gt, torch.float32, "d tokens")
    assert torch.equal(tok.grad[:, 0], g[:, 0])  # CLS passes straight through
    assert_close_verbose(ad.weight.grad, gw, torch.float32, "d weight")
    assert_close_verbose(ad.bias.grad, gb, torch.float32, "d bias")
    assert float(ad.weight.grad.abs().min()) > 0  # every tap learns


def test_low_precision_tokens_with_fp32_params():
    """bf16 tokens (autocast-style) with fp32 parameters: params are cast on the fly, grads stay fp32."""
    ad = TemporalAdapter(dim=8, num_frames=2, kernel_size=(3, 3, 3), init_std=0.05)
    tok = _tokens(1, 2, 3, 8, seed=4, dtype=torch.bfloat16).requires_grad_()
    out = ad(tok)
    assert out.dtype == torch.bfloat16
    assert_close_verbose(out, _expected(ad, tok.detach()), torch.bfloat16, "bf16 adapter out")
    out.float().sum().backward()
    assert ad.weight.grad.dtype == torch.float32 and tok.grad.dtype == torch.bfloat16


def test_errors_and_repr():
    ad = TemporalAdapter(dim=8, num_frames=2)
    with pytest.raises(ValueError, match="not divisible by num_frames=2"):
        ad(torch.randn(3, 10, 8))
    with pytest.raises(ValueError, match="expected a square grid"):
        ad(torch.randn(2, 1 + 6, 8))
    with pytest.raises(ValueError, match="C=4 but the adapter was built with dim=8"):
        ad(torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match=r"tokens must be \[B\*T, 1\+H\*W, C\]"):
        ad(torch.randn(2, 10))
    with pytest.raises(ValueError, match="kernel_size must be three odd sizes"):
        TemporalAdapter(dim=8, num_frames=2, kernel_size=(2, 3, 3))
    r = repr(ad)
    assert "dim=8" in r and "num_frames=2" in r and "kernel_size=(3, 3, 3)" in r and "init_std=0.001" in r
