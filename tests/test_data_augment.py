"""Augmentations: colour ops vs torchvision, parameter draws, one draw for all frames, eval crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rest_fast.data import augment as A

tvf = pytest.importorskip("torchvision.transforms.v2.functional")


def _img(seed=0, t=3, h=13, w=17):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(t, 3, h, w, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("f", [0.6, 1.0, 1.4])
def test_colour_ops_match_torchvision(f):
    # torchvision's luma uses 0.2989 for red, ours the ITU-R 601 0.299: differences stay below 1e-4.
    x = _img()
    torch.testing.assert_close(A.adjust_brightness(x.clone(), f), tvf.adjust_brightness(x, f), atol=1e-6, rtol=0)
    torch.testing.assert_close(A.adjust_contrast(x.clone(), f), tvf.adjust_contrast(x, f), atol=1e-4, rtol=0)
    torch.testing.assert_close(A.adjust_saturation(x.clone(), f), tvf.adjust_saturation(x, f), atol=1e-4, rtol=0)
    torch.testing.assert_close(A.grayscale(x), tvf.rgb_to_grayscale(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shift", [-0.1, -0.03, 0.0, 0.07, 0.1, 0.5])
def test_hue_matches_torchvision(shift):
    x = _img(1)
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5], dtype=x.dtype)  # grey: hue undefined
    x[0, :, 0, 1] = 0.0
    torch.testing.assert_close(A.adjust_hue(x, shift), tvf.adjust_hue(x, shift), atol=1e-6, rtol=0)


def test_draw_train_params_ranges():
    rng = np.random.default_rng(0)
    flips, jit, gray = 0, 0, 0
    n = 2000
    for _ in range(n):
        h, w = int(rng.integers(20, 80)), int(rng.integers(20, 80))
        p = A.draw_train_params(rng, h, w)
        x, y, cw, ch = p.crop
        base = min(h, w)
        sizes = [max(1, int(base * s)) for s in A.SCALES]
        assert cw in [min(s, w) for s in sizes] and ch in [min(s, h) for s in sizes]
        assert 0 <= x <= w - cw and 0 <= y <= h - ch
        assert sorted(p.order) == [0, 1, 2, 3]
        flips += p.flip
        gray += p.gray
        if p.jitter is not None:
            jit += 1
            b, c, s, hue = p.jitter
            assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.8 <= s <= 1.2 and -0.1 <= hue <= 0.1
    assert abs(flips / n - 0.5) < 0.05 and abs(jit / n - 0.8) < 0.05 and abs(gray / n - 0.2) < 0.05


def test_same_draw_for_all_frames():
    """Identical frames stay identical after a train transform: one draw per clip."""
    frame = torch.randint(0, 256, (1, 30, 41, 3), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).contiguous()
    rng = np.random.default_rng(3)
    for _ in range(10):
        out = A.apply(clip, A.draw_train_params(rng, 30, 41), 16)
        assert out.shape == (6, 16, 16, 3) and out.dtype == torch.uint8
        assert all(torch.equal(out[0], out[k]) for k in range(1, 6))


def test_apply_flip_gray_and_eval_crop():
    x = torch.randint(0, 256, (2, 10, 16, 3), dtype=torch.uint8)
    p = A.eval_params(10, 16)
    assert p.crop == (3, 0, 10, 10)
    out = A.apply(x, p, 10)  # no resize: a pure crop
    assert torch.equal(out, x[:, :, 3:13])
    flip = A.apply(x, A.ClipParams(crop=p.crop, flip=True), 10)
    assert torch.equal(flip, x[:, :, 3:13].flip(2))
    g = A.apply(x, A.ClipParams(crop=p.crop, gray=True), 10)
    assert torch.equal(g[..., 0], g[..., 1]) and torch.equal(g[..., 1], g[..., 2])
    ref = (x[:, :, 3:13].double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)).round()
    assert (g[..., 0].double() - ref).abs().max() <= 1


def test_apply_resize_matches_interpolate_reference():
    x = torch.randint(0, 256, (3, 37, 29, 3), dtype=torch.uint8)
    out = A.apply(x, A.ClipParams(crop=(2, 5, 25, 30)), 16)
    ref = torch.nn.functional.interpolate(x[:, 5:35, 2:27].permute(0, 3, 1, 2).double(), size=(16, 16),
                                          mode="bilinear", antialias=True, align_corners=False)
    assert (out.permute(0, 3, 1, 2).double() - ref).abs().max() <= 0.51


def test_apply_errors():
    x = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="crop"):
        A.apply(x, A.ClipParams(crop=(4, 0, 8, 8)), 8)
    with pytest.raises(ValueError, match="frames"):
        A.apply(x.float(), A.eval_params(8, 8), 8)
    with pytest.raises(ValueError, match="size"):
        A.apply(x, A.eval_params(8, 8), 0)


@pytest.mark.parametrize("b, t, s", [(1, 1, 5), (7, 3, 13), (16, 2, 9)])
def test_batched_colour_equals_per_clip(b, t, s):
    """apply_colour_batch == apply_colour per clip, with the same parameter draws (all branches: flip,
    jitter in every order, grayscale, none), on a non-contiguous batch."""
    rng = np.random.default_rng(b * 100 + s)
    params = [A.draw_train_params(rng, 40, 50) for _ in range(b)]
    if b > 1:
        params[0] = A.eval_params(40, 50)  # a clip with nothing to do
    wide = torch.randint(0, 256, (b, t, s, s + 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(b))
    clips = wide[:, :, :, 2:s + 2]  # non-contiguous
    ref = torch.stack([A.apply_colour(clips[k], params[k]) for k in range(b)])
    out = A.apply_colour_batch(clips, params)
    assert out.dtype == torch.uint8 and out.shape == clips.shape and out.is_contiguous()
    assert torch.equal(out, ref)


def test_batched_colour_launches_do_not_grow_with_the_batch():
    """The number of torch ops per batch is bounded (one pass per jitter position), independent of B."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def count(b, batched):
        rng = np.random.default_rng(0)
        params = [A.draw_train_params(rng, 20, 20) for _ in range(b)]
        params = [A.ClipParams(p.crop, True, (1.2, 0.8, 1.1, 0.05), p.order, k % 2 == 0) for k, p in enumerate(params)]
        clips = torch.randint(0, 256, (b, 2, 8, 8, 3), dtype=torch.uint8)
        with Count() as c:
            if batched:
                A.apply_colour_batch(clips, params)
            else:
                for k in range(b):
                    A.apply_colour(clips[k], params[k])
        return c.n

    small, large = count(32, True), count(64, True)
    assert large == small  # same ops for 32 and 64 clips (every branch taken in both)
    per_clip = count(64, False)
    assert per_clip > 8 * large  # the per-clip loop grows with B
    print(f"torch ops per batch of 64: batched {large}, per-clip {per_clip}")


@pytest.mark.gpu
def test_batched_colour_on_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    params = [A.draw_train_params(rng, 60, 80) for _ in range(24)]
    clips = torch.randint(0, 256, (24, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = A.apply_colour_batch(clips, params)
    out = A.apply_colour_batch(clips.cuda(), params).cpu()
    d = (out.int() - ref.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3  # fp32 rounding of CUDA's fused ops
