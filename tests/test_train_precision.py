"""``precision: bf16 | fp16 | fp32`` with ``amp`` as its alias, and fp16's gradient scaler (what a CPU can test).

The scaler runs enabled on the CPU here (GradScaler supports it): an injected inf gradient skips exactly that
optimiser step (weights and AdamW state untouched), halves the scale and is counted in the step records.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from rest_fast.run.config import ConfigError, TrainConfig, apply_overrides, load_run_config, resolve_config
from rest_fast.run.precision import StepScaler, autocast_dtype, check_device_precision
from rest_fast.train.distributed import DistEnv, precision
from rest_fast.train.self_train import self_train_epoch


@pytest.mark.parametrize(("given", "want"), [
    ({}, ("bf16", True)),
    ({"amp": "false"}, ("fp32", False)),
    ({"amp": "true"}, ("bf16", True)),
    ({"precision": "fp16"}, ("fp16", True)),
    ({"precision": "FP32"}, ("fp32", False)),
    ({"precision": "fp16", "amp": "true"}, ("fp16", True)),  # amp=true: mixed precision, fp16 is one
    ({"precision": "fp32", "amp": "false"}, ("fp32", False)),
])
def test_amp_is_an_alias_of_precision(given, want):
    cfg = resolve_config(overrides=given)
    assert (cfg.precision, cfg.amp) == want


def test_alias_across_layers_and_saved_configs(tmp_path):
    cfg = resolve_config(overrides={"precision": "fp16"})
    assert apply_overrides(cfg, {"amp": True}).precision == "fp16"  # --amp on a fp16 run keeps fp16
    assert apply_overrides(cfg, {"amp": False}).precision == "fp32"
    assert apply_overrides(resolve_config(overrides={"amp": "false"}), {"precision": "bf16"}).amp is True
    assert (TrainConfig(amp=False).precision, TrainConfig(precision="fp32").amp) == ("fp32", False)
    saved = tmp_path / "config.yaml"  # a run's saved config holds both keys, agreeing: it loads back
    saved.write_text(cfg.to_yaml())
    assert load_run_config(saved).precision == "fp16"
    old = tmp_path / "old.yaml"  # a config written before `precision` existed: amp alone decides
    old.write_text("amp: false\n")
    assert load_run_config(old).precision == "fp32"


@pytest.mark.parametrize(("given", "match"), [
    ({"amp": "false", "precision": "bf16"}, "amp=false contradicts precision=bf16"),
    ({"amp": "true", "precision": "fp32"}, "amp=true contradicts precision=fp32"),
    ({"precision": "fp8"}, "precision must be one of bf16, fp16, fp32"),
    ({"accum_steps": "0"}, "accum_steps must be >= 1"),
    ({"save_every_minutes": "-1"}, "save_every_minutes must be >= 0"),
])
def test_config_errors_are_one_line(given, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve_config(overrides=given)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="amp=false contradicts precision=fp16"):
        TrainConfig(amp=False, precision="fp16")


def test_cli_contradiction_is_one_line_exit_2(capsys):
    from rest_fast.cli import main

    assert main(["train", "--no-amp", "precision=bf16", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "contradicts" in err
    assert main(["train", "--precision", "fp16", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "precision: fp16" in out and "amp: true" in out


def test_precision_decisions_per_device():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    half = precision(cuda, "fp16")
    assert half.autocast and half.autocast_dtype == torch.float16 and half.clip_dtype == torch.float16
    bf = precision(cuda, "bf16")
    assert bf.autocast and bf.autocast_dtype == torch.bfloat16 and bf.clip_dtype is None
    assert precision(cuda, True) == bf and precision(cuda, False) == precision(cuda, "fp32")
    assert not precision(cuda, "fp32").autocast and precision(cuda, "fp32").clip_dtype == torch.float32
    assert all(not precision(cpu, p).autocast for p in ("bf16", "fp16", "fp32"))  # the CPU computes in fp32
    assert [autocast_dtype(p) for p in (True, False, "bf16", "fp16", "fp32")] == [
        torch.bfloat16, None, torch.bfloat16, torch.float16, None]
    check_device_precision(cpu, "bf16")  # no CUDA card to ask: nothing to refuse
    assert not StepScaler("fp16", cpu).enabled and not StepScaler("bf16", cuda).enabled  # fp16 on CUDA only


class _Linear(torch.nn.Module):
    """A loss module with the trainer's signature; ``poison`` holds the steps whose gradient becomes inf."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 6))
        self.calls = 0
        self.poison: set[int] = set()
        self.w.register_hook(self._maybe_inf)

    def _maybe_inf(self, grad):
        step, self.calls = self.calls, self.calls + 1
        return torch.full_like(grad, float("inf")) if step in self.poison else grad

    def forward(self, videos, captions):
        return ((videos.flatten(1) @ self.w) ** 2).mean()


class _Cache:
    def sample(self, idx, seed):
        return np.zeros(len(idx), np.int32)

    def texts(self, ids):
        return ["x"] * len(ids)


def test_fp16_scaler_skips_a_step_with_an_inf_gradient_and_counts_it():
    torch.manual_seed(0)
    module = _Linear()
    module.poison = {2}  # the third optimiser step's gradient is inf
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = StepScaler("fp16", "cpu", enabled=True, init_scale=1024.0)
    weights = []

    class _Batches:  # records the weights before each step
        def __iter__(self):
            for k in range(5):
                weights.append(module.w.detach().clone())
                yield torch.arange(2), torch.randn(2, 6, generator=torch.Generator().manual_seed(k))

    logs: list[dict] = []
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    stats = self_train_epoch(module, opt, sched, _Batches(), _Cache(), epoch=0, seed=0, env=env, amp="fp16",
                             grad_clip=1.0, log_every=1, on_log=logs.append, scaler=scaler)
    weights.append(module.w.detach().clone())
    assert stats["steps"] == 5  # the schedule counts every optimiser step, skipped or not
    moved = [not torch.equal(a, b) for a, b in zip(weights, weights[1:])]
    assert moved == [True, True, False, True, True]  # step 3 skipped: the weights did not move
    assert [r["skipped_steps"] for r in logs] == [0, 0, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in logs)
    assert scaler.scaler.get_scale() == 512.0  # halved once
    assert int(opt.state[module.w]["step"]) == 4  # AdamW saw 4 steps, not 5
    # the scaler's state goes into a checkpoint loaded with weights_only=True
    buf = io.BytesIO()
    torch.save(scaler.state_dict(), buf)
    again = StepScaler("fp16", "cpu", enabled=True)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert again.scaler.get_scale() == 512.0 and int(again.skipped) == 1


def test_scaler_off_is_a_plain_step():
    module = _Linear()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    scaler = StepScaler("bf16", "cpu")
    loss = scaler.scale(module(torch.ones(1, 6), ["x"]))
    loss.backward()
    before = module.w.detach().clone()
    scaler.step(opt, [module.w], 0.0)
    torch.testing.assert_close(module.w.detach(), before - 0.1 * module.w.grad)
    assert scaler.state_dict() == {"scaler": {}, "skipped": 0}


def test_fp16_overflowed_loss_is_skipped_not_fatal():
    """An fp16 forward that overflows (inf loss) is a skipped step; its loss stays out of the logged mean."""
    module = _Linear()
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = StepScaler("fp16", "cpu", enabled=True, init_scale=8.0)
    big = torch.zeros(2, 6)
    big[:, 0] = 1e30  # (x·w)² overflows
    batches = [(torch.arange(2), torch.ones(2, 6)), (torch.arange(2), big), (torch.arange(2), torch.ones(2, 6))]
    logs: list[dict] = []
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    stats = self_train_epoch(module, opt, sched, batches, _Cache(), epoch=0, seed=0, env=env, amp="fp16",
                             log_every=3, on_log=logs.append, scaler=scaler)
    assert logs[0]["skipped_steps"] == 1 and np.isfinite(stats["loss"])
    with pytest.raises(FloatingPointError):  # without the scaler an inf loss still stops the run
        self_train_epoch(module, opt, sched, batches, _Cache(), epoch=0, seed=0, env=env, amp="fp32", log_every=3)


def test_fp16_reaches_the_captioner_and_the_autocast_contexts(tmp_path):
    """precision=fp16: load_models' decision (fp16 autocast dtype) is what GARModel and the trainer's contexts use
    on CUDA (checked on the context objects: no GPU here)."""
    import warnings

    from rest_fast.models import GARModel
    from rest_fast.models.tiny import tiny_blip
    from rest_fast.train.distributed import autocast

    cuda = torch.device("cuda", 0)
    blip, tok = tiny_blip(seed=0)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the context is built, not entered
        assert gar._autocast(cuda).fast_dtype == torch.bfloat16  # default
        gar.autocast_dtype = precision(cuda, "fp16").autocast_dtype
        assert gar._autocast(cuda).fast_dtype == torch.float16
        assert autocast(cuda, "fp16").fast_dtype == torch.float16 and autocast(cuda, True).fast_dtype == torch.bfloat16
        off = autocast(cuda, "fp32")
        assert not (off.device == "cuda" and off._enabled)
