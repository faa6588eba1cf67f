"""rest_fast.ops.temporal_dwconv3d: Triton kernels (interpreted on CPU) vs the float64 reference.

conftest.py sets TRITON_INTERPRET=1 before imports, so CPU tensors run the real kernels. Shapes are small
(the interpreter costs per op, not per element) but chosen so that rows (B*T*H*W) and channels are not
multiples of the tiles, T=1 and C=1 occur, and borders dominate.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_verbose

import rest_fast.ops.dwconv3d as dwmod
from rest_fast.ops import temporal_dwconv3d, temporal_dwconv3d_ref
from rest_fast.ops.dwconv3d import dwconv3d_bwd, dwconv3d_fwd, temporal_dwconv3d_backward_ref

pytestmark = pytest.mark.skipif(not dwmod.triton_available(), reason="triton not importable")


def _inputs(shape, ks, dtype, *, bias=True, seed=0, scale_w=0.3):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn((C, *ks), generator=g) * scale_w).to(dtype)
    b = torch.randn(C, generator=g).to(dtype) if bias else None
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


def _expected(x, w, b, dy, residual):
    """Output and (dx, dw, db) of the float64 reference through autograd (independent of the fast path)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y = temporal_dwconv3d_ref(x64, w64, b64, residual=residual)
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], dy.double())
    return y.detach(), grads


def _check_fwd_bwd(x, w, b, dy, residual, dtype):
    """Public op forward + autograd backward vs the float64 reference."""
    xr = x.detach().requires_grad_()  # detach keeps x's strides
    wr = w.detach().clone().requires_grad_()
    br = None if b is None else b.detach().clone().requires_grad_()
    y = temporal_dwconv3d(xr, wr, br, residual=residual)
    y_ref, g_ref = _expected(x, w, b, dy, residual)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close_verbose(y, y_ref, dtype, "y")
    grads = torch.autograd.grad(y, [t for t in (xr, wr, br) if t is not None], dy)
    for name, got, exp in zip(("dx", "dw", "db"), grads, g_ref):
        assert got.dtype == dtype
        assert_close_verbose(got, exp, dtype, name)


# (shape [B,T,H,W,C], kernel (kt,kh,kw), bias, residual)
CASES = [
    ((2, 3, 5, 6, 20), (3, 3, 3), True, False),   # rows=180, C=20: neither a multiple of the tiles
    ((2, 1, 4, 4, 8), (3, 3, 3), True, True),     # T=1: every temporal tap off the clip
    ((1, 4, 3, 5, 1), (3, 3, 3), False, True),    # C=1
    ((1, 2, 3, 3, 5), (1, 1, 1), True, False),    # 1x1x1: per-channel scale
    ((1, 3, 4, 5, 3), (5, 5, 5), False, False),   # 5x5x5: kernel wider than T, H, W
    ((1, 4, 3, 7, 6), (3, 1, 1), True, True),     # purely temporal
    ((1, 2, 5, 4, 9), (1, 3, 5), False, False),   # mixed spatial sizes
]


@pytest.mark.parametrize("shape,ks,bias,residual", CASES)
def test_fwd_bwd_fp32_shapes(shape, ks, bias, residual):
    x, w, b, dy = _inputs(shape, ks, torch.float32, bias=bias)
    _check_fwd_bwd(x, w, b, dy, residual, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_fwd_bwd_dtypes(dtype, residual):
    x, w, b, dy = _inputs((2, 3, 4, 5, 12), (3, 3, 3), dtype, seed=1)
    _check_fwd_bwd(x, w, b, dy, residual, dtype)


def test_fwd_bwd_random_shapes():
    g = torch.Generator().manual_seed(123)
    for i in range(3):
        shape = tuple(int(v) for v in torch.randint(1, 6, (4,), generator=g)) + (int(torch.randint(1, 40, (1,), generator=g)),)
        ks = tuple(int(v) for v in 2 * torch.randint(0, 3, (3,), generator=g) + 1)
        x, w, b, dy = _inputs(shape, ks, torch.float32, seed=10 + i)
        _check_fwd_bwd(x, w, b, dy, i % 2 == 1, torch.float32)


def test_launchers_small_tiles_many_programs():
    """Tiles much smaller than the problem: several row blocks, channel blocks and backward programs,
    each with a ragged last tile."""
    x, w, b, dy = _inputs((1, 2, 3, 4, 37), (3, 3, 3), torch.float32, seed=2)
    y = dwconv3d_fwd(x, w, b, residual=True, block_p=16, block_c=32)
    assert_close_verbose(y, temporal_dwconv3d_ref(x.double(), w.double(), b.double(), residual=True),
                         torch.float32, "y")
    # 24 rows in blocks of 8 over 2 programs: the second program's last block is entirely masked.
    dx, dw, db = dwconv3d_bwd(dy, x, w, residual=True, block_p=8, block_c=32, programs=2)
    rx, rw, rb = temporal_dwconv3d_backward_ref(dy.double(), x.double(), w.double(), residual=True)
    assert_close_verbose(dx, rx, torch.float32, "dx")
    assert_close_verbose(dw, rw, torch.float32, "dw")
    assert_close_verbose(db, rb, torch.float32, "db")


def test_backward_ref_matches_autograd():
    """The explicit backward reference (the CPU kernel without the interpreter) equals autograd of the
    forward reference."""
    x, w, b, dy = _inputs((1, 3, 4, 3, 5), (3, 1, 3), torch.float64, seed=3)
    _, (ex, ew, eb) = _expected(x, w, b, dy, True)
    rx, rw, rb = temporal_dwconv3d_backward_ref(dy, x, w, residual=True)
    torch.testing.assert_close(rx, ex)
    torch.testing.assert_close(rw, ew)
    torch.testing.assert_close(rb, eb)


# -------------------------------------------------------------------------------------------------
# strides
# -------------------------------------------------------------------------------------------------


def test_non_contiguous_inputs():
    """x sliced from a wider tensor (row stride > C), x as a permuted NCDHW tensor (stride(-1) != 1), and
    an expanded dy (zero strides, what ``y.sum().backward()`` produces)."""
    g = torch.Generator().manual_seed(4)
    C = 7
    wide = torch.randn(2, 3, 4, 5, C + 9, generator=g)
    x1 = wide[..., 3:3 + C]
    x2 = torch.randn(2, C, 3, 4, 5, generator=g).permute(0, 2, 3, 4, 1)
    w = torch.randn(C, 3, 3, 3, generator=g) * 0.3
    b = torch.randn(C, generator=g)
    for x in (x1, x2):
        assert not x.is_contiguous()
        dy = torch.randn(x.shape, generator=g).transpose(2, 3).contiguous().transpose(2, 3)  # strided dy
        _check_fwd_bwd(x, w, b, dy, True, torch.float32)
        xr = x.detach().requires_grad_()
        assert xr.stride() == x.stride()
        wr = w.clone().requires_grad_()
        temporal_dwconv3d(xr, wr, b, residual=True).sum().backward()
        _, (ex, ew, _) = _expected(x, w, b, torch.ones(x.shape), True)
        assert_close_verbose(xr.grad, ex, torch.float32, "dx (expanded dy)")
        assert_close_verbose(wr.grad, ew, torch.float32, "dw (expanded dy)")


def test_int64_offsets_path(monkeypatch):
    """The int64 address path (taken for tensors past 2**31 elements) gives the same result."""
    x, w, b, dy = _inputs((1, 2, 3, 4, 6), (3, 3, 3), torch.float32, seed=5)
    y32 = dwconv3d_fwd(x, w, b, residual=True)
    g32 = dwconv3d_bwd(dy, x, w, residual=True)
    monkeypatch.setattr(dwmod, "_needs_int64", lambda *t: True)
    torch.testing.assert_close(dwconv3d_fwd(x, w, b, residual=True), y32, rtol=0, atol=0)
    for a, e in zip(dwconv3d_bwd(dy, x, w, residual=True), g32):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------
# backward variants, determinism
# -------------------------------------------------------------------------------------------------


def test_partial_requires_grad():
    """Frozen weight → only the dx launch; frozen input → only the dw/db launch. Both must agree with the
    reference, and the skipped outputs come back empty."""
    x, w, b, dy = _inputs((1, 3, 4, 4, 10), (3, 3, 3), torch.float32, seed=6)
    _, (ex, ew, eb) = _expected(x, w, b, dy, True)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(temporal_dwconv3d(xr, w, b, residual=True), xr, dy)
    assert_close_verbose(gx, ex, torch.float32, "dx (frozen weight)")
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    gw, gb = torch.autograd.grad(temporal_dwconv3d(x, wr, br, residual=True), (wr, br), dy)
    assert_close_verbose(gw, ew, torch.float32, "dw (frozen input)")
    assert_close_verbose(gb, eb, torch.float32, "db (frozen input)")
    dx, dw, db = dwconv3d_bwd(dy, x, w, residual=True, need_dx=False)
    assert dx.numel() == 0 and dw.shape == w.shape and db.shape == (10,)
    dx, dw, db = dwconv3d_bwd(dy, x, w, residual=True, need_dw=False)
    assert dx.shape == x.shape and dw.numel() == 0 and db.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_deterministic(dtype):
    """dw/db come from per-program partials reduced in a fixed order: bit-identical run to run."""
    x, w, _, dy = _inputs((2, 3, 4, 4, 12), (3, 3, 3), dtype, seed=7)
    first = dwconv3d_bwd(dy, x, w, residual=False, programs=3)
    second = dwconv3d_bwd(dy, x, w, residual=False, programs=3)
    for a, e in zip(first, second):
        assert torch.equal(a, e)


def test_empty_batch():
    x = torch.randn(0, 2, 3, 3, 4, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = temporal_dwconv3d(x, w, residual=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


# -------------------------------------------------------------------------------------------------
# dispatch, registration, compile
# -------------------------------------------------------------------------------------------------


def test_dispatch_reference_without_interpreter(monkeypatch):
    """TRITON_INTERPRET=0 on CPU → the reference serves (the launchers must not be called)."""
    x, w, b, dy = _inputs((1, 2, 3, 3, 4), (3, 3, 3), torch.float32, seed=8)
    y_triton = temporal_dwconv3d(x, w, b, residual=True)

    def boom(*a, **k):
        raise AssertionError("Triton launcher called with TRITON_INTERPRET=0 on CPU")

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dwmod, "dwconv3d_fwd", boom)
    monkeypatch.setattr(dwmod, "dwconv3d_bwd", boom)
    xr = x.clone().requires_grad_()
    y = temporal_dwconv3d(xr, w, b, residual=True)
    torch.testing.assert_close(y, temporal_dwconv3d_ref(x, w, b, residual=True), rtol=0, atol=0)
    assert_close_verbose(y, y_triton.double(), torch.float32, "ref vs triton")
    y.backward(dy)
    assert xr.grad is not None


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_gradcheck_fp64(interpret, monkeypatch):
    """float64 gradcheck through the custom op: Triton (fp64 accumulation) under the interpreter, and the
    reference CPU kernels without it."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: temporal_dwconv3d(x, w, b, residual=True)
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=interpret == "1")


def test_opcheck_forward_and_backward():
    g = torch.Generator().manual_seed(10)
    # A 3x1x3 kernel: 9 taps keep the interpreted op calls (opcheck makes many) cheap.
    x = torch.randn(1, 2, 3, 3, 5, generator=g, requires_grad=True)
    w = torch.randn(5, 3, 1, 3, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    dy = torch.randn(1, 2, 3, 3, 5, generator=g)
    torch.library.opcheck(torch.ops.rest_fast.temporal_dwconv3d, (x, w, b, True))
    torch.library.opcheck(torch.ops.rest_fast.temporal_dwconv3d, (x, w, None, False))
    fx, fw = x.detach(), w.detach()
    for need_dx, need_dw in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.rest_fast.temporal_dwconv3d_backward, (dy, fx, fw, True, need_dx, need_dw))


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_torch_compile_fullgraph(interpret, monkeypatch):
    """The op is one opaque node in a fullgraph inductor compile; the fake kernels give the right metadata.
    Works with the interpreter on as well (the op body runs at runtime, outside the compiled graph)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    torch._dynamo.reset()

    def f(x, w, b):
        return temporal_dwconv3d(x * 2, w, b, residual=True).sin().sum()

    x, w, b, _ = _inputs((1, 2, 3, 3, 4), (3, 3, 3), torch.float32, seed=11)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    out = torch.compile(f, fullgraph=True)(*args)
    got = torch.autograd.grad(out, args)
    ref_args = [t.double().requires_grad_() for t in (x, w, b)]
    ref = temporal_dwconv3d_ref(ref_args[0] * 2, *ref_args[1:], residual=True).sin().sum()
    exp = torch.autograd.grad(ref, ref_args)
    assert_close_verbose(out, ref, torch.float32, "compiled out")
    for name, a, e in zip(("dx", "dw", "db"), got, exp):
        assert_close_verbose(a, e, torch.float32, f"compiled {name}")


# -------------------------------------------------------------------------------------------------
# errors
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape,w_shape,b_shape,match,exc",
    [
        ((2, 3, 4, 4), (4, 3, 3, 3), None, r"x must be \[B, T, H, W, C\]", ValueError),
        ((1, 2, 3, 3, 4), (4, 3, 3), None, r"weight must be \[C, kt, kh, kw\]", ValueError),
        ((1, 2, 3, 3, 4), (5, 3, 3, 3), None, r"weight has 5 channels but x has C=4", ValueError),
        ((1, 2, 3, 3, 4), (4, 2, 3, 3), None, r"must be odd and in 1..7, got \(2, 3, 3\)", ValueError),
        ((1, 2, 3, 3, 4), (4, 3, 9, 3), None, r"must be odd and in 1..7, got \(3, 9, 3\)", ValueError),
        ((1, 2, 3, 3, 4), (4, 3, 3, 3), (3,), r"bias must be \[C\] = \[4\]", ValueError),
    ],
)
def test_shape_errors(x_shape, w_shape, b_shape, match, exc):
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    b = None if b_shape is None else torch.randn(b_shape)
    with pytest.raises(exc, match=match):
        temporal_dwconv3d(x, w, b)
    with pytest.raises(exc, match=match):
        temporal_dwconv3d_ref(x, w, b)


def test_dtype_and_device_errors():
    x = torch.randn(1, 2, 3, 3, 4)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match=r"weight dtype torch.float16 differs from x dtype torch.float32"):
        temporal_dwconv3d(x, w.half())
    with pytest.raises(TypeError, match=r"bias dtype torch.float64 differs"):
        temporal_dwconv3d(x, w, torch.randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        temporal_dwconv3d(x, w.to("meta"))
    with pytest.raises(TypeError, match=r"x dtype must be one of"):
        temporal_dwconv3d(x.to(torch.int32), w.to(torch.int32))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        temporal_dwconv3d(x.numpy(), w)


# ----------------------------------------------------------------------------------------------------
# results do not depend on the execution path (reference / interpreted Triton)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["C0", "C0_bias", "float64", "numpy_views"])
def test_same_result_on_every_path(case, monkeypatch):
    g = torch.Generator().manual_seed(6)
    shape, C = (1, 3, 4, 5, 6), 6
    x, w, b = torch.randn(shape, generator=g), torch.randn(C, 3, 3, 3, generator=g), torch.randn(C, generator=g)
    if case.startswith("C0"):
        x, w, b = x[..., :0], w[:0], b[:0]
    if case != "C0_bias":
        b = None if case == "C0" else b
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    if case == "numpy_views":  # x and the weights are views of one numpy array, starting at the same address
        np = pytest.importorskip("numpy")
        buf = np.random.default_rng(0).standard_normal(x.numel() + 1000).astype(np.float32)
        x = torch.from_numpy(buf[:x.numel()]).view(shape)
        w = torch.from_numpy(buf[:C * 27]).view(C, 3, 3, 3)
    outs = []
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = temporal_dwconv3d(xi, wi, b, residual=True)
        gx, gw = torch.autograd.grad(y, (xi, wi), torch.ones_like(y), allow_unused=True)
        outs.append((y, gx, gw))
    for a, r in zip(outs[1], outs[0]):
        assert a.shape == r.shape and a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
