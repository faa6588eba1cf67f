"""Kernels launch on their tensors' GPU (Triton launches on the *current* device), and NCCL is bound to the rank's
GPU. No GPU here: ``torch.cuda.device`` and ``init_process_group`` are stood in for by recorders, and the launchers
are run interpreted on CPU to show each one enters the guard with its first tensor's device."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from rest_fast.ops import _device
from rest_fast.ops.dwconv3d import dwconv3d_bwd, dwconv3d_fwd, temporal_dwconv3d_ref
from rest_fast.ops.rerank import rerank_captions_ref, rerank_captions_triton
from rest_fast.ops.topk import topk_similarity_ref, topk_similarity_triton
from rest_fast.train import distributed


def test_launch_device_makes_the_tensor_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(dev):
        entered.append(dev)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with _device.launch_device(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _device.launch_device(torch.zeros(2)):  # CPU: nothing to switch
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.fixture
def guards(monkeypatch):
    """The devices the launchers' guard was entered with, in order (the guard itself is kept)."""
    seen = []
    real = _device.launch_device

    def record(t):
        seen.append(t.device)
        return real(t)

    monkeypatch.setattr(_device, "launch_device", record)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return seen


def test_every_launcher_runs_under_its_input_device(guards):
    g = torch.Generator().manual_seed(0)
    v, c = torch.randn(5, 8, generator=g), torch.randn(30, 8, generator=g)
    cand = torch.randint(0, 30, (5, 11), generator=g, dtype=torch.int32)
    s, i = rerank_captions_triton(v, c, cand, 3)
    rs, ri = rerank_captions_ref(v, c, cand, 3)
    assert torch.equal(i, ri) and torch.allclose(s, rs, atol=1e-5)
    assert guards == [torch.device("cpu")]

    q, keys = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    s, i = topk_similarity_triton(q, keys, 4)
    rs, ri = topk_similarity_ref(q, keys, 4)
    assert torch.allclose(s, rs, atol=1e-5)
    assert guards == [torch.device("cpu")] * 2

    x, w = torch.randn(1, 3, 4, 4, 5, generator=g), torch.randn(5, 3, 3, 3, generator=g)
    assert torch.allclose(dwconv3d_fwd(x, w), temporal_dwconv3d_ref(x, w), atol=1e-5)
    dwconv3d_bwd(torch.randn_like(x), x, w)  # its input gradient is a nested forward launch
    assert guards == [torch.device("cpu")] * 5


def test_nccl_process_group_is_bound_to_the_rank_gpu():
    opts = distributed.process_group_options(torch.device("cuda", 1), 60)
    assert opts == {"backend": "nccl", "timeout": timedelta(seconds=60), "device_id": torch.device("cuda", 1)}
    assert distributed.process_group_options(torch.device("cpu"), 5) == {"backend": "gloo",
                                                                        "timeout": timedelta(seconds=5)}
    with pytest.raises(ValueError, match="nccl_timeout"):
        distributed.process_group_options(torch.device("cpu"), 0)


def test_setup_passes_the_device_id(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stand-ins: no GPU here
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", dev)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    env = distributed.setup("auto", timeout_s=30)
    assert env.device == torch.device("cuda", 1)
    assert calls == [("set_device", torch.device("cuda", 1)),
                     ("init", {"backend": "nccl", "timeout": timedelta(seconds=30),
                               "device_id": torch.device("cuda", 1)})]


@pytest.mark.gpu
def test_kernels_run_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the compiled kernels run there (no fallback warning)."""
    import warnings

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    q, keys = torch.randn(64, 32, device=dev, generator=g), torch.randn(500, 32, device=dev, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        s, _ = topk_similarity_triton(q, keys, 5)
    rs, _ = topk_similarity_ref(q.cpu(), keys.cpu(), 5)
    assert s.device == dev and torch.allclose(s.cpu(), rs, atol=1e-4)
