"""SDPA masks of the patched BLIP attention: masks that mask nothing are dropped (SDPA may then take the flash
kernel), and HF's float32-minimum additive masks stay finite in bf16/fp16 (a fully masked row must not turn into
-inf everywhere: HF's eager attention gives it uniform weights)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rest_fast.models import tiny_blip
from rest_fast.models.blip_attention import _sdpa_mask, set_blip_attention

F32_MIN = torch.finfo(torch.float32).min


def test_masks_that_mask_nothing_are_dropped():
    assert _sdpa_mask(None, torch.float32, check_empty=True) is None
    assert _sdpa_mask(torch.zeros(2, 1, 1, 5), torch.bfloat16, check_empty=True) is None
    assert _sdpa_mask(torch.ones(2, 1, 1, 5, dtype=torch.bool), torch.float32, check_empty=True) is None
    some = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    some[1, 0, 0, 4] = False
    assert _sdpa_mask(some, torch.float32, check_empty=True) is some
    # not looked for where the caller knows the mask masks something (no read, no sync): converted as is
    kept = _sdpa_mask(torch.zeros(2, 1, 3, 3), torch.float16, check_empty=False)
    assert kept is not None and kept.dtype == torch.float16 and not bool(kept.any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_additive_mask_stays_finite(dtype):
    m = torch.zeros(1, 1, 3, 4)
    m[0, 0, 0, :] = F32_MIN  # a fully masked row
    m[0, 0, 1, 2:] = F32_MIN
    m[0, 0, 2, 3] = float("-inf")
    assert torch.isinf(m.to(torch.bfloat16)[0, 0, 0]).all()  # what a plain cast does
    out = _sdpa_mask(m, dtype, check_empty=True)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert torch.equal(out == torch.finfo(dtype).min, m < 0) and not bool(out[m == 0].any())


def test_prepared_once_per_mask_and_again_after_an_in_place_change():
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, 0, 1:] = F32_MIN
    a = _sdpa_mask(m, torch.bfloat16, check_empty=True)
    assert _sdpa_mask(m, torch.bfloat16, check_empty=True) is a  # every layer of one forward shares it
    assert _sdpa_mask(m, torch.float16, check_empty=True) is not a
    m.zero_()  # in place: the version counter moves, the mask is looked at again
    assert _sdpa_mask(m, torch.bfloat16, check_empty=True) is None


def _attention_pair(cross: bool):
    blip, _ = tiny_blip(seed=3)
    layer = blip.text_decoder.bert.encoder.layer[0]
    eager = (layer.crossattention if cross else layer.attention).self
    patched = copy.deepcopy(eager)
    set_blip_attention(patched, "sdpa")
    return eager.eval(), patched.eval()


def test_cross_attention_with_a_zero_mask_runs_without_one(monkeypatch):
    eager, patched = _attention_pair(cross=True)
    g = torch.Generator().manual_seed(0)
    h, enc = torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, eager.key.in_features, generator=g)
    zero = torch.zeros(2, 1, 1, 7)  # what HF builds from an all-ones image mask
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = patched(h, encoder_hidden_states=enc, encoder_attention_mask=zero)[0]
        ref = eager(h, encoder_hidden_states=enc, encoder_attention_mask=zero)[0]
    assert seen == [None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_fully_masked_row_matches_eager():
    eager, patched = _attention_pair(cross=False)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4, 32, generator=g)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :, 1:] = F32_MIN  # row 0 attends key 0 only
    mask[1, :, 0, :] = F32_MIN  # item 1, query 0: nothing (a padded row); HF's eager gives it uniform weights
    with torch.no_grad():
        ref = eager(h, attention_mask=mask)[0]
        out = patched.to(torch.bfloat16)(h.bfloat16(), attention_mask=mask)[0]
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
