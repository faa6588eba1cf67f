"""The training step makes no device→host transfer: counted on CPU, so a regression cannot slip in silently.

On CUDA a host read of device data (``.item()``, ``float(t)``, ``bool(t.any())``, boolean-mask indexing, ``nonzero``)
stalls the CPU until the GPU catches up, and the next step cannot be queued meanwhile. On CPU nothing stalls, but the
same reads still go through the dispatcher as the ops that *would* sync (``aten._local_scalar_dense`` for every
scalar read, ``nonzero``/``masked_select``/bool-index for data-dependent shapes): a ``TorchDispatchMode`` counts them
for the forward, the backward and the optimiser step. The loop's intended host reads (every ``log_every`` steps and
at the end of the epoch) go through ``self_train._to_host``, counted separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rest_fast.cache import PyCaptionCache
from rest_fast.models import GARModel, tiny_blip
from rest_fast.train import self_train
from rest_fast.train.distributed import DistEnv

try:  # see test_gar_model.py: import the kernels while TRITON_INTERPRET=1 holds
    import rest_fast.kernels.dwconv3d  # noqa: F401
except ImportError:
    pass

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique2",
             "unique_consecutive", "unique_dim", "is_nonzero", "equal", "allclose", "repeat_interleave",
             "_assert_async"}


class SyncCounter(TorchDispatchMode):
    """Counts dispatched ops that read device data on the host (or whose output shape depends on data)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
            self.hits.append(str(func))
        elif name in ("index", "_index_put_impl_", "index_put", "index_put_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx or ()):
                self.hits.append(f"{func} (boolean mask)")
        return func(*args, **kwargs)


def test_counter_sees_the_syncs_it_must_forbid():
    x = torch.randn(5)
    with SyncCounter() as c:
        _ = x.sum().item()
        _ = bool((x > 0).any())
        _ = x[x > 0]
        _ = torch.isfinite(x).all().item()
    assert len(c.hits) == 4, c.hits


@pytest.fixture(autouse=True)
def _reference_adapter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _setup(log_every: int, steps: int):
    blip, tok = tiny_blip(seed=3)
    gar = GARModel(blip, tok, num_frames=2, adapter_layers=[0])
    module = self_train.CaptionLoss(gar, "a video of", 0.2)
    opt = self_train.build_optimizer(gar, 1e-4, 1e-3, (0.9, 0.98), fused=True)  # device-side step counters
    sched = self_train.build_scheduler(opt, 10, 2, 1e-4, 1e-6)
    cache = PyCaptionCache(8, 3)
    ids = cache.intern(["a man playing guitar", "someone cooks", "kids jump", "a dog runs", "red square"])
    rng = np.random.default_rng(0)
    cache.set(np.arange(8), np.stack([rng.permutation(5)[:3] for _ in range(8)]).astype(np.int32)[:, :3],
              np.zeros((8, 3), np.float32))
    assert len(ids) == 5
    g = torch.Generator().manual_seed(0)
    batches = [(torch.arange(2 * s, 2 * s + 2) % 8, torch.randn(2, 2, 3, 32, 32, generator=g)) for s in range(steps)]
    return module, opt, sched, cache, batches


def test_training_step_makes_no_host_sync(monkeypatch):
    module, opt, sched, cache, batches = _setup(log_every=3, steps=4)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    reads: list[list[float]] = []
    real = self_train._to_host

    def counted(t):
        out = real(t)
        reads.append(out)
        return out

    monkeypatch.setattr(self_train, "_to_host", counted)
    logs: list[dict] = []
    with SyncCounter() as c:
        stats = self_train.self_train_epoch(module, opt, sched, batches, cache, epoch=0, seed=0, env=env,
                                            grad_clip=1.0, log_every=3, on_log=logs.append)
    assert c.hits == [], f"host syncs inside the training step: {c.hits}"
    assert len(reads) == 2  # one window of 3 steps, then the epoch total: nothing per step
    assert reads[0][1] == 3 and reads[1][1] == 4
    assert stats["steps"] == 4 and np.isfinite(stats["loss"])
    assert len(logs) == 1 and logs[0]["step_in_epoch"] == 3
    assert abs(logs[0]["loss"] - reads[0][0] / 3) < 1e-12


def test_non_finite_loss_is_caught_at_the_log_step():
    module, opt, sched, cache, batches = _setup(log_every=2, steps=3)
    with torch.no_grad():
        module.model.blip.text_decoder.cls.predictions.bias[0] = float("nan")
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        self_train.self_train_epoch(module, opt, sched, batches, cache, epoch=0, seed=0, env=env, log_every=2)


def test_normalisation_constants_made_once_per_device():
    from rest_fast.data.loader import _norm_constants, normalize_clips

    u8 = torch.randint(0, 256, (2, 3, 4, 4, 3), dtype=torch.uint8)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    first = normalize_clips(u8, mean, std)
    hits = _norm_constants.cache_info().hits
    with SyncCounter() as c:
        again = normalize_clips(u8, list(mean), list(std))
    assert _norm_constants.cache_info().hits == hits + 1 and c.hits == []
    ref = (u8.permute(0, 1, 4, 2, 3).double() / 255 - torch.tensor(mean).double().view(1, 1, 3, 1, 1)) \
        / torch.tensor(std).double().view(1, 1, 3, 1, 1)
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_clip", [0.0, 1e9])
def test_logged_grad_norm_adds_no_sync_and_is_the_last_steps_norm(monkeypatch, grad_clip):
    """The step record's grad norm (issue 21 item 6) rides in the window's one host read, with or without clipping
    (without, it is computed on the log steps only), and is the total norm of the log step's gradients."""
    module, opt, sched, cache, batches = _setup(log_every=3, steps=3)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    reads: list[list[float]] = []
    real = self_train._to_host
    monkeypatch.setattr(self_train, "_to_host", lambda t: reads.append(real(t)) or reads[-1])
    logs: list[dict] = []
    with SyncCounter() as c:
        self_train.self_train_epoch(module, opt, sched, batches, cache, epoch=0, seed=0, env=env,
                                    grad_clip=grad_clip, log_every=3, on_log=logs.append)
    assert c.hits == [] and len(reads) == 2
    grads = [p.grad.double() for p in module.parameters() if p.grad is not None]  # the last (= log) step's
    expected = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert len(logs) == 1 and logs[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert logs[0]["clips_per_second"] > 0 and 0 <= logs[0]["data_wait_fraction"] <= 1
