"""Fused attention for HF BLIP: ``torch.nn.functional.scaled_dot_product_attention`` in the ViT and the text model.

transformers 5.x runs BLIP's attention as eager ``matmul → softmax → matmul`` only (no SDPA path for BLIP), which
materialises a ``[B, heads, L, L]`` score tensor per layer and its softmax for backward: at S=224, T=8, batch 64 that is
the largest activation of the ViT. :func:`set_blip_attention` swaps the ``forward`` of every ``BlipAttention`` (ViT) and
``BlipTextSelfAttention`` (text self- and cross-attention) *instance* for one that calls SDPA on the same projections.

* Parameters and state-dict keys are untouched (only a bound ``forward`` is set on the instance; ``"eager"`` removes it
  and HF's class method is back).
* Same math: scale ``1/√d``, HF's additive (or boolean) attention mask, attention dropout with the module's ``p`` in
  training. SDPA returns no attention probabilities: the patched forwards return ``None`` in their place (BLIP's
  layers only forward them when asked for ``output_attentions``, which the trainer never asks for).
* The text forward keeps HF's cache protocol (self-attention cache update, cross-attention keys computed once), so HF
  ``generate`` on a patched model still works and gives the same tokens.
"""

from __future__ import annotations

import math
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["set_blip_attention", "blip_attention_impl"]

_TAG = "_rest_fast_attn"


def _vision_forward(self, hidden_states: torch.Tensor, **kwargs):
    """``BlipAttention.forward`` through SDPA: ``[B, L, d] → ([B, L, d], None)``."""
    B, L, D = hidden_states.shape
    H = self.num_heads
    qkv = self.qkv(hidden_states).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # [3, B, H, L, dh]
    p = self.dropout.p if self.training else 0.0
    ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p, scale=self.scale)
    return self.projection(ctx.transpose(1, 2).reshape(B, L, D)), None


def _text_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  encoder_hidden_states: torch.Tensor | None = None,
                  encoder_attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
    """``BlipTextSelfAttention.forward`` through SDPA: ``[B, L, d] → ([B, L, heads·dh], None)``.

    ``attention_mask``: HF's 4-D mask (additive float, or boolean with True = attend), broadcast over heads.
    """
    from transformers.cache_utils import EncoderDecoderCache

    if cache is None:
        cache = past_key_values  # the pre-rename keyword
    dh = self.attention_head_size
    shape = (*hidden_states.shape[:-1], -1, dh)
    q = self.query(hidden_states).view(shape).transpose(1, 2)
    cross = encoder_hidden_states is not None
    mask = encoder_attention_mask if cross else attention_mask
    store, reuse = None, False
    if cache is not None:
        if isinstance(cache, EncoderDecoderCache):
            reuse = bool(cache.is_updated.get(self.layer_idx))
            store = cache.cross_attention_cache if cross else cache.self_attention_cache
        else:
            store = cache
    if cross and store is not None and reuse:
        k, v = store.layers[self.layer_idx].keys, store.layers[self.layer_idx].values
    else:
        src = encoder_hidden_states if cross else hidden_states
        kv_shape = (*src.shape[:-1], -1, dh)
        k = self.key(src).view(kv_shape).transpose(1, 2)
        v = self.value(src).view(kv_shape).transpose(1, 2)
        if store is not None:
            k, v = store.update(k, v, self.layer_idx, kwargs=kwargs)
            if cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
    mask = _sdpa_mask(mask, q.dtype, check_empty=cross or q.shape[-2] == 1)
    p = self.dropout.p if self.training else 0.0
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0 / math.sqrt(dh))
    ctx = ctx.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
    return ctx, None


# The masks prepared for SDPA, by source mask: HF builds one mask per forward and hands the same tensor to every
# layer, so the check and the conversion below run once per forward, not once per layer.
_PREPARED: dict[int, tuple] = {}


def _sdpa_mask(mask: torch.Tensor | None, dtype: torch.dtype, *, check_empty: bool) -> torch.Tensor | None:
    """The ``attn_mask`` SDPA gets for HF's ``mask`` when the queries are in ``dtype``.

    * ``None`` when the mask masks nothing (all zeros additive, all True boolean): with a mask SDPA cannot use the
      flash kernel. HF hands such masks to cross-attention (every image token is valid) and to one-token decoding
      steps. Seeing it reads the mask (a host sync on CUDA), so it is only looked for where ``check_empty``: a
      self-attention mask over several query rows in a decoder is causal and always masks something.
    * a boolean mask as it is;
    * an additive mask in ``dtype`` (SDPA wants the query's dtype, bf16 under autocast), clamped to ``dtype``'s
      finite range first: HF fills masked slots with float32's minimum, which rounds to ``-inf`` in bf16 and fp16,
      and a query row with every key at ``-inf`` softmaxes to NaN (a fully padded row). Finite, such a row gets
      uniform weights, as in HF's fp32 eager attention.
    """
    if mask is None:
        return None
    # inference tensors have no version counter: they are prepared afresh each time
    tag = None if mask.is_inference() else (mask._version, dtype, check_empty)
    hit = _PREPARED.get(id(mask))
    if tag is not None and hit is not None and hit[0]() is mask and hit[1] == tag:
        return hit[2]
    if mask.dtype == torch.bool:
        out = None if check_empty and bool(mask.all()) else mask
    elif check_empty and not bool(mask.any()):
        out = None
    else:
        out = mask.clamp_min(torch.finfo(dtype).min).to(dtype)
    if tag is not None:
        if len(_PREPARED) >= 8:  # a handful of live masks at a time (self and cross, one forward)
            _PREPARED.clear()
        _PREPARED[id(mask)] = (weakref.ref(mask), tag, out)
    return out


def _targets(blip: nn.Module):
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    for m in blip.modules():
        if isinstance(m, BlipAttention):
            yield m, _vision_forward
        elif isinstance(m, BlipTextSelfAttention):
            yield m, _text_forward


def set_blip_attention(blip: nn.Module, impl: str) -> int:
    """Switch every BLIP attention module inside ``blip`` to ``impl`` (``"sdpa"`` or ``"eager"``); returns the count.

    Idempotent; works on a ``BlipForConditionalGeneration`` or any module containing BLIP attention modules.
    """
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention impl must be 'sdpa' or 'eager', got {impl!r}")
    n = 0
    for m, fwd in _targets(blip):
        if impl == "sdpa":
            m.forward = types.MethodType(fwd, m)
            setattr(m, _TAG, "sdpa")
        else:
            m.__dict__.pop("forward", None)
            m.__dict__.pop(_TAG, None)
        n += 1
    return n


def blip_attention_impl(blip: nn.Module) -> str | None:
    """``"sdpa"`` / ``"eager"`` when every BLIP attention module agrees, ``"mixed"`` otherwise, ``None`` if none."""
    seen = {getattr(m, _TAG, "eager") for m, _ in _targets(blip)}
    if not seen:
        return None
    return seen.pop() if len(seen) == 1 else "mixed"
