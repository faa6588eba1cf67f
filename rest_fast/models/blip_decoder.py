"""A lean incremental forward of BLIP's text decoder (``BlipTextLMHeadModel``) for :mod:`rest_fast.generation`.

Same weights and the same math as HF's module (post-LN BERT layers: causal self-attention, cross-attention to the
image tokens, GELU MLP; eager ``softmax(q kᵀ / √d) v`` attention like HF's BLIP text model), but organised for
decoding:

* Cross-attention keys/values are projected once per *video* (``[B, heads, N_img, d]``) and shared by its beams:
  the beams' queries of an item are attended together as one ``[beams, d]`` block, instead of HF's
  ``repeat_interleave`` of the image tokens per beam followed by per-beam projections and per-step cache reorders.
* Self-attention keys/values live in a preallocated :class:`~rest_fast.generation.kv_cache.StaticKVCache`, reordered
  by beam index with one ``index_select`` per step.
* The prompt is run once per item, then copied to its beams inside the cache.
* Query/key/value of self-attention are one fused matmul; everything else is plain ``F.linear`` /
  ``F.layer_norm`` calls (no per-step mask building, cache objects or output dataclasses).

Inference only (no dropout, no autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rest_fast.generation.kv_cache import StaticKVCache


class _Layer:
    __slots__ = ("qkv_w", "qkv_b", "so_w", "so_b", "so_ln", "cq_w", "cq_b", "ck_w", "ck_b", "cv_w", "cv_b",
                 "co_w", "co_b", "co_ln", "i_w", "i_b", "o_w", "o_b", "o_ln")


class BlipTextDecoder:
    """Decoding view of a ``BlipTextLMHeadModel``: weights referenced (q/k/v fused) at construction.

    ``attn_impl``: ``"sdpa"`` (default, faster) or ``"eager"`` (HF's attention arithmetic); see :meth:`_attend`.
    ``compile``: run the forward through one process-wide ``torch.compile(dynamic=True)`` (rows and cache length
    vary per step, so shapes are symbolic: one compilation serves every step and batch). Off by default: it gives
    the same tokens on CPU (checked) but no CPU speed-up at the tiny shape, and its GPU benefit is UNMEASURED here.

    Rebuild it after the weights change (``GARModel`` builds one per ``generate`` call; that costs one concat of
    the self-attention projections).
    """

    def __init__(self, lm, attn_impl: str = "sdpa", compile: bool = False) -> None:
        from transformers.activations import ACT2FN

        if attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {attn_impl!r}")
        self.attn_impl = attn_impl
        self.compile = compile

        cfg = lm.config
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.layer_norm_eps
        self.act = ACT2FN[cfg.hidden_act]
        bert = lm.bert
        emb = bert.embeddings
        self.word = emb.word_embeddings.weight
        self.pos = emb.position_embeddings.weight
        self.emb_ln = (emb.LayerNorm.weight, emb.LayerNorm.bias)
        self.layers: list[_Layer] = []
        for layer in bert.encoder.layer:
            L = _Layer()
            sa = layer.attention.self
            L.qkv_w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight], 0)
            L.qkv_b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias], 0)
            so = layer.attention.output
            L.so_w, L.so_b, L.so_ln = so.dense.weight, so.dense.bias, (so.LayerNorm.weight, so.LayerNorm.bias)
            ca = layer.crossattention.self
            L.cq_w, L.cq_b = ca.query.weight, ca.query.bias
            L.ck_w, L.ck_b, L.cv_w, L.cv_b = ca.key.weight, ca.key.bias, ca.value.weight, ca.value.bias
            co = layer.crossattention.output
            L.co_w, L.co_b, L.co_ln = co.dense.weight, co.dense.bias, (co.LayerNorm.weight, co.LayerNorm.bias)
            L.i_w, L.i_b = layer.intermediate.dense.weight, layer.intermediate.dense.bias
            L.o_w, L.o_b = layer.output.dense.weight, layer.output.dense.bias
            L.o_ln = (layer.output.LayerNorm.weight, layer.output.LayerNorm.bias)
            self.layers.append(L)
        head = lm.cls.predictions
        self.t_w, self.t_b = head.transform.dense.weight, head.transform.dense.bias
        self.t_act = head.transform.transform_act_fn
        self.t_ln = (head.transform.LayerNorm.weight, head.transform.LayerNorm.bias)
        self.out_w, self.out_b = head.decoder.weight, head.decoder.bias
        self.vocab_size = self.out_w.shape[0]
        self.max_positions = self.pos.shape[0]

    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(k, v)``, each ``[B, heads, N, head_dim]``, from ``encoder_states [B, N, d_enc]``."""
        B, N, _ = encoder_states.shape
        out = []
        for L in self.layers:
            k = F.linear(encoder_states, L.ck_w, L.ck_b).view(B, N, self.heads, self.head_dim).transpose(1, 2)
            v = F.linear(encoder_states, L.cv_w, L.cv_b).view(B, N, self.heads, self.head_dim).transpose(1, 2)
            out.append((k.contiguous(), v.contiguous()))
        return out

    def session(self, encoder_states: torch.Tensor, max_length: int) -> DecodeSession:
        """A :class:`rest_fast.generation.beam_search.Decoder` over ``encoder_states [B, N, d_enc]``."""
        if max_length > self.max_positions:
            raise ValueError(f"max_length ({max_length}) exceeds the decoder's max_position_embeddings "
                             f"({self.max_positions})")
        return DecodeSession(self, encoder_states, max_length)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        """``softmax(q kᵀ / √d) v`` over ``[..., Lq, d] × [..., Lk, d]``; ``masked [Lq, Lk]`` bool (True = hidden).

        ``"eager"`` is HF BLIP's arithmetic op for op; ``"sdpa"`` is PyTorch's fused kernel (reads the strided
        cache views directly, no ``[Lq, Lk]`` score tensor): the same math, rounded differently.
        """
        if self.attn_impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if masked is None else ~masked)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if masked is not None:
            s = s.masked_fill(masked, -float("inf"))
        return torch.matmul(s.softmax(-1), v)

    # -- the forward ---------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, pos0: int, cache: StaticKVCache,
                cross: list[tuple[torch.Tensor, torch.Tensor]], last_only: bool = True) -> torch.Tensor:
        """``tokens [N, P]`` at positions ``pos0..pos0+P-1`` → logits ``[N, V]`` (last position) or ``[N, P, V]``.

        ``N`` rows are ``B`` items (``cross`` has ``B`` rows) × ``N // B`` consecutive rows per item (beams).
        """
        if self.compile:
            return _compiled_forward()(self, tokens, pos0, cache, cross, last_only)
        return self._forward(tokens, pos0, cache, cross, last_only)

    def _forward(self, tokens: torch.Tensor, pos0: int, cache: StaticKVCache,
                 cross: list[tuple[torch.Tensor, torch.Tensor]], last_only: bool = True) -> torch.Tensor:
        N, P = tokens.shape
        D, H, dh = self.hidden, self.heads, self.head_dim
        B = cross[0][0].shape[0]
        g = N // B
        h = F.embedding(tokens, self.word) + self.pos[pos0:pos0 + P]
        h = F.layer_norm(h, (D,), *self.emb_ln, self.eps)
        causal = None
        if P > 1:  # True where a query may not look (keys after its own position)
            causal = torch.ones(P, pos0 + P, dtype=torch.bool, device=tokens.device).tril(pos0).logical_not()
        for li, L in enumerate(self.layers):
            # Self-attention against the cache.
            qkv = F.linear(h, L.qkv_w, L.qkv_b).view(N, P, 3, H, dh)
            q = qkv[:, :, 0].transpose(1, 2)
            cache.write(li, pos0, qkv[:, :, 1:].permute(0, 2, 3, 1, 4))  # k and v: [N, 2, H, P, dh]
            k, v = cache.get(li)
            a = self._attend(q, k, v, causal)  # [N, H, P, dh]
            a = a.transpose(1, 2).reshape(N, P, D)
            h = F.layer_norm(F.linear(a, L.so_w, L.so_b) + h, (D,), *L.so_ln, self.eps)
            # Cross-attention: the g rows of an item share its image keys/values.
            ck, cv = cross[li]
            q = F.linear(h, L.cq_w, L.cq_b).view(B, g * P, H, dh).transpose(1, 2)  # [B, H, g*P, dh]
            a = self._attend(q, ck, cv, None)  # [B, H, g*P, dh]
            a = a.transpose(1, 2).reshape(N, P, D)
            h = F.layer_norm(F.linear(a, L.co_w, L.co_b) + h, (D,), *L.co_ln, self.eps)
            # MLP.
            m = self.act(F.linear(h, L.i_w, L.i_b))
            h = F.layer_norm(F.linear(m, L.o_w, L.o_b) + h, (D,), *L.o_ln, self.eps)
        if last_only:
            h = h[:, -1]
        h = F.layer_norm(self.t_act(F.linear(h, self.t_w, self.t_b)), (D,), *self.t_ln, self.eps)
        return F.linear(h, self.out_w, self.out_b)


_COMPILED: dict[str, object] = {}


def _compiled_forward():
    """``BlipTextDecoder._forward`` compiled once per process (lazily: importing this module compiles nothing)."""
    if "forward" not in _COMPILED:
        _COMPILED["forward"] = torch.compile(BlipTextDecoder._forward, dynamic=True)
    return _COMPILED["forward"]


class DecodeSession:
    """One decoding run over a batch of encoder states (implements the search's ``Decoder`` protocol)."""

    def __init__(self, dec: BlipTextDecoder, encoder_states: torch.Tensor, max_length: int) -> None:
        self.dec = dec
        self.enc = encoder_states
        self.max_length = max_length
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache: StaticKVCache | None = None
        self.pos = 0
        self.num_beams = 1

    def start(self, input_ids: torch.Tensor, num_beams: int) -> torch.Tensor:
        B, P = input_ids.shape
        if B != self.enc.shape[0]:
            raise ValueError(f"input_ids has {B} rows but the encoder states {self.enc.shape[0]}")
        d = self.dec
        self.num_beams = num_beams
        self.cross = d.cross_kv(self.enc)
        self.cache = StaticKVCache(len(d.layers), B * num_beams, d.heads, self.max_length, d.head_dim,
                                   device=input_ids.device)
        self.cache.rows = B
        logits = d.forward(input_ids, 0, self.cache, self.cross)
        if num_beams > 1:  # copy the prompt's keys/values to every beam of its item
            self.cache.reorder(torch.arange(B, device=input_ids.device).repeat_interleave(num_beams))
        self.pos = P
        return logits

    def step(self, tokens: torch.Tensor, rows: torch.Tensor | None, items: torch.Tensor | None) -> torch.Tensor:
        if rows is not None:
            self.cache.reorder(rows)
        if items is not None:
            self.cross = [(k.index_select(0, items), v.index_select(0, items)) for k, v in self.cross]
        logits = self.dec.forward(tokens[:, None], self.pos, self.cache, self.cross)
        self.pos += 1
        return logits
