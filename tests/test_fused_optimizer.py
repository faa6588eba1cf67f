"""The optimiser's ``fused`` flag: fused AdamW exactly when every trainable parameter is a CUDA float tensor, and
finetune moves the model to its device *before* building the optimiser (else the flag sees CPU parameters)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from eval_fixtures import write_clip
from torch import nn

import rest_fast.run.optim as optim
from rest_fast.run.optim import build_optimizer, use_fused_adamw


def _p(device: str, floating: bool = True):
    """A parameter as the flag sees it (device and dtype only): fabricated, there is no CUDA here."""
    return SimpleNamespace(device=torch.device(device), is_floating_point=lambda: floating)


def test_fused_flag_needs_every_parameter_on_cuda_and_floating():
    assert use_fused_adamw([_p("cuda:0"), _p("cuda:1")])
    assert not use_fused_adamw([_p("cuda:0"), _p("cpu")])
    assert not use_fused_adamw([_p("cuda:0"), _p("cuda:0", floating=False)])
    assert not use_fused_adamw([])
    assert not use_fused_adamw(nn.Linear(3, 2).parameters())


def test_build_optimizer_passes_the_flag(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    assert not build_optimizer(model, 1e-3, 0.1, (0.9, 0.98)).defaults["fused"]  # CPU parameters: foreach path
    monkeypatch.setattr(optim, "use_fused_adamw", lambda params: True)  # as if the parameters were on CUDA
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98))
    assert opt.defaults["fused"] is True  # torch's fused AdamW also runs on CPU, so the optimiser can be built
    assert not build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), fused=False).defaults["fused"]


class _StubGAR(nn.Module):
    """What finetune needs of a GAR model (train/eval/to/parameters/loss), recording when it was moved."""

    def __init__(self, events: list):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.events = events

    def to(self, *args, **kwargs):
        self.events.append("model.to")
        return super().to(*args, **kwargs)

    def loss(self, clips, texts, *, prompt, label_smoothing):
        return SimpleNamespace(loss=(self.w.sum() - clips.float().mean()) ** 2)


def test_finetune_moves_the_model_before_building_the_optimiser(tmp_path, monkeypatch):
    from rest_fast.eval.finetune import finetune

    events: list = []
    real = optim.build_optimizer

    def spy(model, *args, **kwargs):
        events.append("build_optimizer")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(optim, "build_optimizer", spy)
    videos = [(str(write_clip(tmp_path / f"a{j}.mp4", "growing", seed=j, frames=4, size=32)), 0) for j in range(2)]
    recs, _ = finetune(_StubGAR(events), videos, ["growing"], mean=(0.5,) * 3, std=(0.5,) * 3, num_frames=2,
                       image_size=16, epochs=1, batch_size=2, augment=False, progress=False, device="cpu")
    assert len(recs) == 1 and recs[0]["steps"] == 1
    assert "model.to" in events and "build_optimizer" in events
    assert events.index("model.to") < events.index("build_optimizer")
