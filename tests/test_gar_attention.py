"""BLIP attention through SDPA (instance patch) against HF's eager attention; ViT activation checkpointing; amp=false.

Tiny random BLIPs in fp32 on CPU (as in test_beam_search.py: std-0.2 weights, so beam search never hinges on
rounding noise). The eager reference is an unpatched deep copy of the same weights.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from rest_fast.models import GARModel, tiny_blip
from rest_fast.models.blip_attention import blip_attention_impl, set_blip_attention
from rest_fast.train.distributed import autocast, precision

try:  # see test_gar_model.py: import the kernels while TRITON_INTERPRET=1 holds
    import rest_fast.kernels.dwconv3d  # noqa: F401
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _reference_adapter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _pair(seed: int = 0, eos_bias: float = 0.0):
    blip, tok = tiny_blip(seed=seed)
    with torch.no_grad():
        blip.text_decoder.cls.predictions.bias[tok.sep_token_id] += eos_bias
    eager = copy.deepcopy(blip)
    return blip, eager, tok


def test_patch_keeps_state_dict_and_switches_back():
    blip, eager, tok = _pair()
    keys = list(blip.state_dict())
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[])
    assert blip_attention_impl(blip) == "sdpa" and blip_attention_impl(eager) == "eager"
    assert list(gar.blip.state_dict()) == keys
    assert set_blip_attention(blip, "eager") > 0 and blip_attention_impl(blip) == "eager"
    with pytest.raises(ValueError, match="sdpa"):
        set_blip_attention(blip, "flash")
    clone = copy.deepcopy(GARModel(blip, tok, num_frames=1, adapter_layers=[]))  # carries its own patched modules
    assert blip_attention_impl(clone.blip) == "sdpa"


def test_sdpa_logits_match_eager_with_padding():
    blip, eager, tok = _pair(seed=1)
    GARModel(blip, tok, num_frames=1, adapter_layers=[])
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    enc = tok(["a video of a man", "a video of someone cooking in a big kitchen", "a video"], padding="longest",
              return_tensors="pt")
    with torch.no_grad():
        out = blip(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        ref = eager(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        vis = blip.vision_model(pixel_values=pixels).last_hidden_state
        vis_ref = eager.vision_model(pixel_values=pixels).last_hidden_state
    assert enc.attention_mask.min() == 0  # padded rows are exercised
    torch.testing.assert_close(vis, vis_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-4)


def test_sdpa_loss_and_grads_match_eager():
    blip, eager, tok = _pair(seed=2)
    ours = GARModel(blip, tok, num_frames=2, adapter_layers=[0], adapter_init_std=0.05)
    torch.manual_seed(0)  # the adapters draw their init: give the eager twin the same one
    ref = GARModel(eager, tok, num_frames=2, adapter_layers=[0], attn_impl="eager")
    ref.temporal_adapters.load_state_dict(ours.temporal_adapters.state_dict())
    assert blip_attention_impl(eager) == "eager"
    clips = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    caps = ["a man playing guitar", "two kids jumping"]
    a = ours.loss(clips, caps).loss
    b = ref.loss(clips, caps).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.backward()
    b.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_beam_search_token_identical_to_unpatched_hf_generate(num_beams):
    blip, eager, tok = _pair(seed=3, eos_bias=2.5)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[])  # sdpa: HF modules and our decoder
    torch.manual_seed(7)
    pixels = torch.randn(5, 3, 32, 32)
    ids = tok(["a video of"] * 5, return_tensors="pt").input_ids
    kw = dict(num_beams=num_beams, max_length=14, min_length=5)
    with torch.no_grad():
        ref = eager.generate(pixels, input_ids=ids, **kw)
        hf_patched = blip.generate(pixels, input_ids=ids, **kw)  # HF's cache path through the patched forward
    ours = gar.generate(pixels[:, None], prompt="a video of", **kw)
    assert torch.equal(ours.token_ids, ref)
    assert torch.equal(hf_patched, ref)


def test_grad_checkpointing_same_loss_and_grads():
    blip, tok = tiny_blip(seed=4)
    plain = GARModel(blip, tok, num_frames=2, adapter_layers=[0, 1], adapter_init_std=0.05)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    plain.train()
    ckpt.train()
    clips = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    caps = ["a man playing guitar", "someone cooks"]
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += 1

    handle = ckpt.temporal_adapters[0].register_forward_pre_hook(count)
    losses = []
    for m in (plain, ckpt):
        torch.manual_seed(11)  # same dropout draws (checkpoint replays the RNG state in the recompute)
        loss = m.loss(clips, caps).loss
        loss.backward()
        losses.append(loss.detach())
    handle.remove()
    assert calls["n"] == 2  # the adapter ran in forward and again in the recompute: it is inside the checkpoint
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():  # eval / no-grad never checkpoints
        torch.testing.assert_close(plain.encode(clips), ckpt.encode(clips))


def test_amp_false_disables_bf16_on_cuda():
    cuda = torch.device("cuda", 0)
    on, off = precision(cuda, True), precision(cuda, False)
    assert on.autocast and on.clip_dtype is None  # CLIP's CUDA default (bf16)
    assert not off.autocast and off.clip_dtype == torch.float32
    assert precision(torch.device("cpu"), True).clip_dtype == torch.float32
    blip, tok = tiny_blip(seed=0)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[], autocast=off.autocast)
    assert isinstance(gar._autocast(cuda), nullcontext)
    ctx = autocast(cuda, False)
    assert not (isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx._enabled)
