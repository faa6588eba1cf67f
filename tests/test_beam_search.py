"""Our decoder (rest_fast.generation + BlipTextDecoder) against HF BLIP ``generate``: token-identical ids.

Tiny random BLIPs in fp32 on CPU. Their weights are drawn with std 0.2 (``tiny_blip``) so logits are well
separated and argmax / top-k never hinge on rounding noise; HF's BLIP text attention is eager matmul + softmax, like
ours. An EOS bias makes rows finish at different steps (asserted).
"""

from __future__ import annotations

import pytest
import torch

from rest_fast.generation import StaticKVCache, beam_search
from rest_fast.models import GARModel, tiny_blip
from rest_fast.models.blip_decoder import BlipTextDecoder

# Triton fixes interpreter-vs-compiled mode when it is first imported. Import it (and the adapter kernels) now, at
# collection, while conftest's TRITON_INTERPRET=1 holds: the fixture below switches tests to the reference path,
# and a first import under that setting would break interpreted kernels for the rest of the session.
try:
    import rest_fast.kernels.dwconv3d  # noqa: F401
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _reference_adapter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(seed: int, eos_bias: float):
    blip, tok = tiny_blip(seed=seed)
    with torch.no_grad():  # the LM-head bias is tied (decoder.bias is predictions.bias)
        blip.text_decoder.cls.predictions.bias[tok.sep_token_id] += eos_bias
    return blip, tok


def _hf(blip, tok, pixels, prompt, **kw):
    ids = tok([prompt] * pixels.shape[0], return_tensors="pt").input_ids
    with torch.no_grad():
        return blip.generate(pixels, input_ids=ids, **kw)


def _gen_lengths(ids: torch.Tensor, prompt_len: int, eos: int) -> list[int]:
    """Generated length of each row (up to and including the first EOS)."""
    out = []
    for row in ids[:, prompt_len:].tolist():
        out.append(row.index(eos) + 1 if eos in row else len(row))
    return out


# -- the KV cache ------------------------------------------------------------------------------------------------
def test_kv_cache_write_get_reorder():
    torch.manual_seed(0)
    c = StaticKVCache(layers=2, capacity=6, heads=3, max_len=5, head_dim=4)
    c.rows = 2
    k0, v0 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    for layer in range(2):
        c.write(layer, 0, k0 + layer, v0 - layer)
    c.reorder(torch.tensor([1, 1, 0, 1, 0, 0]))  # grow to beams
    k, v = c.get(1)
    assert k.shape == (6, 3, 2, 4)
    torch.testing.assert_close(k, (k0 + 1)[[1, 1, 0, 1, 0, 0]], rtol=0, atol=0)
    torch.testing.assert_close(v, (v0 - 1)[[1, 1, 0, 1, 0, 0]], rtol=0, atol=0)
    k1 = torch.randn(6, 3, 1, 4)
    c.write(0, 2, k1, k1)
    c.write(1, 2, torch.stack([k1, -k1], 1))  # k and v in one tensor
    torch.testing.assert_close(c.get(1)[1][:, :, 2:], -k1, rtol=0, atol=0)
    c.reorder(torch.tensor([5, 0, 2]))  # reorder and drop rows
    k, _ = c.get(0)
    assert k.shape == (3, 3, 3, 4)
    torch.testing.assert_close(k[:, :, :2], k0[[0, 1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(k[:, :, 2:], k1[[5, 0, 2]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_len"):
        c.write(0, 4, torch.randn(3, 3, 2, 4), torch.randn(3, 3, 2, 4))
    with pytest.raises(ValueError, match="capacity"):
        c.reorder(torch.zeros(7, dtype=torch.int64))


# -- the decoder forward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_decoder_forward_matches_hf_logits(attn_impl):
    """Prefill + incremental steps with shared cross K/V give HF's full-sequence logits (odd sizes, 2 beams)."""
    blip, tok = tiny_blip(seed=3)
    torch.manual_seed(0)
    B, g, N, L = 3, 2, 7, 9
    enc = torch.randn(B, N, blip.config.text_config.encoder_hidden_size)
    ids = torch.randint(5, len(tok) - 1, (B * g, L))
    dec = BlipTextDecoder(blip.text_decoder, attn_impl=attn_impl)
    with torch.no_grad():
        ref = blip.text_decoder(input_ids=ids, encoder_hidden_states=enc.repeat_interleave(g, 0)).logits
        cache = StaticKVCache(len(dec.layers), B * g, dec.heads, L, dec.head_dim)
        cross = dec.cross_kv(enc)
        p = 4
        full = dec.forward(ids[:, :p], 0, cache, cross, last_only=False)
        torch.testing.assert_close(full, ref[:, :p], rtol=1e-5, atol=1e-5)
        for t in range(p, L):
            step = dec.forward(ids[:, t:t + 1], t, cache, cross)
            torch.testing.assert_close(step, ref[:, t], rtol=1e-5, atol=1e-5)


# -- exactness against HF generate -----------------------------------------------------------------------------
CASES = [
    # seed, num_beams, max_length, min_length, repetition_penalty, length_penalty, num_return, prompt, attention
    (0, 1, 14, 5, 1.0, 1.0, 1, "a video of", "sdpa"),
    (1, 1, 16, 0, 1.3, 1.0, 1, "a person is", "eager"),
    (2, 3, 14, 5, 1.0, 1.0, 1, "a video of", "sdpa"),
    (3, 3, 16, 7, 1.2, 0.6, 2, "someone is", "sdpa"),
    (4, 3, 12, 0, 0.8, 1.0, 3, "a video of", "eager"),
    (5, 5, 15, 5, 1.0, 2.0, 1, "a video of", "sdpa"),
    (6, 5, 13, 6, 1.5, -0.5, 2, "a person is", "sdpa"),
    (7, 2, 20, 5, 1.0, 1.0, 2, "a video of", "eager"),
]


@pytest.mark.parametrize("seed,num_beams,max_length,min_length,rep,lp,nret,prompt,attn", CASES)
def test_generate_matches_hf(seed, num_beams, max_length, min_length, rep, lp, nret, prompt, attn):
    blip, tok = _model(seed, eos_bias=2.5)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[], attn_impl=attn)
    torch.manual_seed(100 + seed)
    B = 7
    pixels = torch.randn(B, 3, 32, 32)
    kw = dict(num_beams=num_beams, max_length=max_length, min_length=min_length, repetition_penalty=rep,
              length_penalty=lp, num_return_sequences=nret)
    ref = _hf(blip, tok, pixels, prompt, **kw)
    ours = gar.generate(pixels[:, None], prompt=prompt, **kw)
    assert ours.token_ids.shape == ref.shape
    assert torch.equal(ours.token_ids, ref)
    P = len(gar.prompt_ids(prompt))
    lengths = _gen_lengths(ref, P, tok.sep_token_id)
    assert len(set(lengths)) > 1, f"rows should finish at different steps: {lengths}"
    assert len(ours.texts) == B * nret and ours.scores.shape == (B * nret,)
    assert torch.isfinite(ours.scores).all()


def test_generate_matches_hf_beam_scores():
    """Beam scores equal HF's ``sequences_scores`` (same arithmetic up to rounding)."""
    blip, tok = _model(11, eos_bias=2.0)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[])
    torch.manual_seed(0)
    pixels = torch.randn(5, 3, 32, 32)
    ids = tok(["a video of"] * 5, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = blip.generate(pixels, input_ids=ids, num_beams=4, max_length=14, min_length=5,
                            num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    ours = gar.generate(pixels, num_beams=4, max_length=14, min_length=5, num_return_sequences=2)
    assert torch.equal(ours.token_ids, ref.sequences)
    torch.testing.assert_close(ours.scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)


def test_generate_all_rows_stop_early_and_no_eos():
    """Both ends: a strong EOS bias (every row stops at min_length) and none (every row runs to max_length)."""
    for bias, nb in ((8.0, 3), (8.0, 1), (-5.0, 3)):
        blip, tok = _model(12, eos_bias=bias)
        gar = GARModel(blip, tok, num_frames=1, adapter_layers=[])
        pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        ref = _hf(blip, tok, pixels, "a video of", num_beams=nb, max_length=12, min_length=6)
        ours = gar.generate(pixels, num_beams=nb, max_length=12, min_length=6)
        assert torch.equal(ours.token_ids, ref)


def test_decode_matches_hf_on_video_states():
    """T=8 clips with (non-zero) adapters: our decoder on the encoded states == HF's text decoder on them."""
    blip, tok = _model(13, eos_bias=2.5)
    gar = GARModel(blip, tok, num_frames=8, adapter_layers=[0], adapter_init_std=0.05)
    videos = torch.randn(3, 8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    image = gar.encode(videos)
    ours = gar.decode(image, num_beams=3, max_length=15, min_length=5)
    ids = gar.prompt_ids("a video of")[None].expand(3, -1).contiguous()
    with torch.no_grad():
        ref = blip.text_decoder.generate(
            input_ids=ids, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
            encoder_hidden_states=image, encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
            num_beams=3, max_length=15, min_length=5)
    assert torch.equal(ours.token_ids, ref)


def test_texts_drop_prompt_and_generate_frames():
    blip, tok = _model(14, eos_bias=2.0)
    gar = GARModel(blip, tok, num_frames=4, adapter_layers="all", adapter_init_std=0.0)
    frames = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    outs = gar.generate_frames(frames, prompts=("a video of", "a person is"), num_beams=3, max_length=12)
    assert len(outs) == 2
    for prompt, out in zip(("a video of", "a person is"), outs):
        # Adapters at zero init + T=1: the plain BLIP result.
        ref = _hf(blip, tok, frames, prompt, num_beams=3, max_length=12, min_length=5)
        assert torch.equal(out.token_ids, ref)
        P = len(gar.prompt_ids(prompt))
        assert out.texts == [t.strip() for t in tok.batch_decode(ref[:, P:], skip_special_tokens=True)]


def test_beam_search_argument_errors():
    blip, tok = tiny_blip(seed=0)
    dec = BlipTextDecoder(blip.text_decoder)
    enc = torch.randn(2, 5, 32)
    ids = torch.tensor([[tok.bos_token_id, 18, 113, 92]] * 2)
    with pytest.raises(ValueError, match="max_length"):
        beam_search(dec.session(enc, 8), ids, max_length=4, eos_token_id=3)
    with pytest.raises(ValueError, match="num_return_sequences"):
        beam_search(dec.session(enc, 8), ids, num_beams=2, num_return_sequences=3, max_length=8, eos_token_id=3)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(dec.session(enc, 8), ids, num_beams=0, max_length=8, eos_token_id=3)
    with pytest.raises(ValueError, match="int64"):
        beam_search(dec.session(enc, 8), ids.int(), max_length=8, eos_token_id=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dec.session(enc, 1000)


def test_decode_under_bf16_autocast_runs():
    """Dtype plumbing of the mixed-precision path (bf16 linears, fp32 softmax / layer norms, bf16 KV cache), on CPU
    autocast as a stand-in for CUDA: shapes, finite scores, a valid token range; ids need not match fp32."""
    blip, tok = _model(15, eos_bias=2.0)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for nb in (1, 3):
            out = gar.generate(pixels, num_beams=nb, max_length=12, num_return_sequences=1)
            assert out.token_ids.shape[0] == 3 and out.token_ids.shape[1] <= 12
            assert int(out.token_ids.min()) >= 0 and int(out.token_ids.max()) < len(tok)
            assert torch.isfinite(out.scores).all() and len(out.texts) == 3


@pytest.mark.gpu
def test_generate_matches_hf_cuda_fp32():
    blip, tok = _model(16, eos_bias=2.5)
    blip = blip.cuda()
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[], autocast=False)
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    for nb in (1, 3, 5):
        ref = _hf(blip, tok, pixels, "a video of", num_beams=nb, max_length=15, min_length=5)
        assert torch.equal(gar.generate(pixels, num_beams=nb, max_length=15).token_ids, ref)


@pytest.mark.gpu
def test_generate_cuda_bf16_runs():
    blip, tok = _model(17, eos_bias=2.5)
    gar = GARModel(blip.cuda(), tok, num_frames=4, adapter_layers="all").cuda()
    videos = torch.randn(5, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    out = gar.generate(videos, num_beams=3, max_length=15, num_return_sequences=2)
    assert out.token_ids.shape[0] == 10 and torch.isfinite(out.scores).all()
    loss = gar.loss(videos, ["a man is cooking"] * 5)
    loss.loss.backward()
    assert torch.isfinite(loss.per_sample).all()


@pytest.mark.slow
def test_compiled_decoder_matches_hf():
    """The optional torch.compile path (minutes of inductor compilation on 2 CPU cores) keeps HF's tokens."""
    blip, tok = _model(18, eos_bias=2.5)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[], compile_decoder=True)
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for nb in (3, 1):
        ref = _hf(blip, tok, pixels, "a video of", num_beams=nb, max_length=14, min_length=5)
        assert torch.equal(gar.generate(pixels, num_beams=nb, max_length=14).token_ids, ref)
