"""FrozenCLIP on tiny random-init models built offline (open_clip and HF backends).

References are computed here from the wrapped model's own towers in float64, so each test checks the wrapper's
plumbing (chunking, mean over T, normalisation, dtype casts) rather than the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rest_fast.clip import OPENAI_MEAN, OPENAI_STD, FrozenCLIP, default_dtype, tiny_clip

S = 32


@pytest.fixture(scope="module")
def clip() -> FrozenCLIP:
    return tiny_clip(seed=0)


@pytest.fixture(scope="module")
def hf_clip() -> FrozenCLIP:
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=S,
            patch_size=8,
        ),
        projection_dim=24,
    )
    torch.manual_seed(1)
    return FrozenCLIP(CLIPModel(cfg), tokenizer=open_clip.get_tokenizer("ViT-B-16"), device="cpu")


def _videos(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, S, S, generator=g)


def _ref_video_features(clip: FrozenCLIP, videos: torch.Tensor) -> torch.Tensor:
    """float64 reference: normalise each frame embedding, mean over T, normalise."""
    model = copy.deepcopy(clip.model).double()
    b, t = videos.shape[:2]
    frames = videos.reshape(b * t, 3, S, S).double()
    with torch.no_grad():
        emb = clip._adapter.image(model, frames)
    emb = F.normalize(emb, dim=-1).view(b, t, -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def _ref_text_features(clip: FrozenCLIP, texts: list[str]) -> torch.Tensor:
    model = copy.deepcopy(clip.model).double()
    with torch.no_grad():
        emb = clip._adapter.text(model, clip._adapter.tokenize(texts))
    return F.normalize(emb, dim=-1)


# ---------------------------------------------------------------------------------------------- interface
def test_preprocessing_attributes(clip):
    assert clip.mean == OPENAI_MEAN and clip.std == OPENAI_STD
    assert clip.image_size == (S, S)
    assert clip.context_length == 32
    assert clip.backend == "open_clip"
    assert clip.dim == 32
    assert default_dtype("cpu") == torch.float32


def test_frozen_and_eval(clip):
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not any(m.training for m in clip.modules())
    out = clip.encode_frames(_videos(1, 2).requires_grad_(True))
    assert not out.requires_grad


# ---------------------------------------------------------------------------------------------- video features
@pytest.mark.parametrize("b,t", [(1, 1), (3, 4), (5, 8)])
def test_encode_frames_matches_float64_reference(clip, b, t):
    v = _videos(b, t, seed=b * 10 + t)
    out = clip.encode_frames(v, batch_size=2)
    assert out.shape == (b, clip.dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(b), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), _ref_video_features(clip, v), atol=2e-5, rtol=2e-5)


def test_single_frame_video_is_the_image_feature(clip):
    v = _videos(4, 1, seed=3)
    torch.testing.assert_close(clip.encode_frames(v), clip.encode_images(v[:, 0]), atol=1e-6, rtol=1e-6)


def test_mean_over_time_ignores_frame_order(clip):
    v = _videos(2, 6, seed=4)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    torch.testing.assert_close(clip.encode_frames(v[:, perm]), clip.encode_frames(v), atol=1e-5, rtol=1e-5)


def test_batching_and_non_contiguous_inputs(clip):
    wide = _videos(7, 10, seed=5)
    v = wide[:, ::2]  # strided along T: non-contiguous
    assert not v.is_contiguous()
    ref = clip.encode_frames(v.contiguous(), batch_size=64)
    for bs in (1, 3, 7):
        torch.testing.assert_close(clip.encode_frames(v, batch_size=bs), ref, atol=1e-5, rtol=1e-5)
    imgs = wide[:, 0, :, ::1, :]
    torch.testing.assert_close(clip.encode_images(imgs, batch_size=2), clip.encode_images(imgs.contiguous()))


def test_empty_batch(clip):
    assert clip.encode_frames(torch.zeros(0, 4, 3, S, S)).shape == (0, clip.dim)
    assert clip.encode_text([]).shape == (0, clip.dim)


def test_bf16_weights_close_to_fp32():
    v = _videos(3, 2, seed=6)
    fp32 = tiny_clip(seed=0)
    bf16 = tiny_clip(seed=0, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    a, b = fp32.encode_frames(v), bf16.encode_frames(v)
    assert b.dtype == torch.float32
    assert (a * b).sum(-1).min() > 0.99  # cosine similarity of the two runs
    ta, tb = fp32.encode_text(["a person is dancing"]), bf16.encode_text(["a person is dancing"])
    assert (ta * tb).sum() > 0.99


# ---------------------------------------------------------------------------------------------- text features
def test_encode_text_matches_reference_and_batching(clip):
    texts = [
        "a man is playing guitar",
        "someone is",
        "a video of a dog catching a frisbee in a park",
        "",
        "x",
    ]
    out = clip.encode_text(texts, batch_size=2)
    assert out.shape == (5, clip.dim)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), _ref_text_features(clip, texts), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(clip.encode_text(texts, batch_size=1), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_long_text_is_truncated(clip):
    out = clip.encode_text(["word " * 200])
    assert out.shape == (1, clip.dim) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- determinism
def test_tiny_clip_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny_clip(seed=0), FrozenCLIP.tiny(seed=0), tiny_clip(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), na
    v = _videos(2, 3, seed=7)
    assert torch.equal(a.encode_frames(v), b.encode_frames(v))
    assert torch.equal(a.encode_frames(v), a.encode_frames(v))
    assert not torch.allclose(a.encode_frames(v), c.encode_frames(v))


# ---------------------------------------------------------------------------------------------- HF backend
def test_hf_backend_matches_reference(hf_clip):
    assert hf_clip.backend == "hf" and hf_clip.image_size == (S, S)
    v = _videos(3, 2, seed=8)
    out = hf_clip.encode_frames(v, batch_size=2)
    assert out.shape == (3, 24)
    torch.testing.assert_close(out.double(), _ref_video_features(hf_clip, v), atol=2e-5, rtol=2e-5)
    texts = ["a man", "a woman is riding a horse along the beach"]
    t = hf_clip.encode_text(texts)
    torch.testing.assert_close(t.double(), _ref_text_features(hf_clip, texts), atol=2e-5, rtol=2e-5)


def test_hf_backend_text_independent_of_padding(hf_clip):
    # The open_clip tokenizer pads with zeros and passes no attention mask; the causal tower pools at EOS,
    # so a short text must embed the same alone and next to a long one.
    alone = hf_clip.encode_text(["a man"])
    padded = hf_clip.encode_text(["a man", "a woman is riding a horse along the beach at sunset"])
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)


def _hf_tokenizer_from_open_clip_bpe(folder):
    """Write the OpenAI BPE that open_clip ships in Hugging Face's vocab/merges format (offline)."""
    import json

    import open_clip
    from transformers import CLIPTokenizerFast

    oc = open_clip.get_tokenizer("ViT-B-16")
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in oc.encoder.items()}))
    merges = sorted(oc.bpe_ranks, key=oc.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return oc, CLIPTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_hf_backend_with_a_real_hf_tokenizer(hf_clip, tmp_path):
    # The HF tokenizer branch (padding=True + attention mask) must agree with the open_clip tokenizer branch.
    oc, hf_tok = _hf_tokenizer_from_open_clip_bpe(tmp_path)
    texts = ["a man is playing an acoustic guitar on stage!", "yo-yo", "Hello, World"]
    assert hf_tok(texts)["input_ids"][1] == oc(texts, context_length=8)[1][:5].tolist()
    with_hf = FrozenCLIP(hf_clip.model, tokenizer=hf_tok, device="cpu")
    torch.testing.assert_close(with_hf.encode_text(texts), hf_clip.encode_text(texts), atol=1e-5, rtol=1e-5)


def test_load_hf_clip_from_a_local_directory(hf_clip, tmp_path):
    # The by-name loading path (CLIPModel/AutoTokenizer.from_pretrained) on a saved tiny model, offline.
    _, hf_tok = _hf_tokenizer_from_open_clip_bpe(tmp_path)
    save = tmp_path / "tiny-hf-clip"
    hf_clip.model.save_pretrained(save)
    hf_tok.save_pretrained(save)
    loaded = FrozenCLIP(str(save), device="cpu")
    assert loaded.backend == "hf" and loaded.image_size == (S, S) and loaded.mean == OPENAI_MEAN
    v, texts = _videos(2, 3, seed=10), ["a dog runs", "two people dance"]
    torch.testing.assert_close(loaded.encode_frames(v), hf_clip.encode_frames(v), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loaded.encode_text(texts), hf_clip.encode_text(texts), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pretrained"):
        FrozenCLIP(str(save), pretrained="openai", device="cpu")


@pytest.mark.slow
def test_open_clip_by_name_with_random_weights():
    # The by-name open_clip path without a download: ViT-B-16 architecture, random init.
    clip = FrozenCLIP("ViT-B-16", pretrained="random", device="cpu", batch_size=2)
    assert clip.image_size == (224, 224) and clip.mean == OPENAI_MEAN and clip.context_length == 77
    assert clip.encode_frames(torch.randn(1, 2, 3, 224, 224)).shape == (1, 512)
    assert clip.encode_text(["a person is skiing"]).shape == (1, 512)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(clip):
    with pytest.raises(ValueError, match="videos"):
        clip.encode_frames(torch.zeros(2, 3, S, S))
    with pytest.raises(ValueError, match="3 channels"):
        clip.encode_frames(torch.zeros(1, 2, 4, S, S))
    with pytest.raises(ValueError, match="image_size"):
        clip.encode_frames(torch.zeros(1, 2, 3, S + 1, S))
    with pytest.raises(TypeError, match="float"):
        clip.encode_frames(torch.zeros(1, 2, 3, S, S, dtype=torch.uint8))
    with pytest.raises(ValueError, match="T >= 1"):
        clip.encode_frames(torch.zeros(1, 0, 3, S, S))
    with pytest.raises(ValueError, match="batch_size"):
        clip.encode_frames(_videos(1, 1), batch_size=0)
    with pytest.raises(TypeError, match="list of str"):
        clip.encode_text("a single string")
    with pytest.raises(ValueError, match="images"):
        clip.encode_images(torch.zeros(1, 1, 3, S, S))


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="unknown CLIP name"):
        FrozenCLIP("not-a-clip-model", device="cpu")
    with pytest.raises(ValueError, match="pretrained"):
        FrozenCLIP("openai/clip-vit-base-patch16", pretrained="openai", device="cpu")
    with pytest.raises(ValueError, match="tokenizer"):
        FrozenCLIP(torch.nn.Linear(2, 2), device="cpu")
    with pytest.raises(TypeError, match="unsupported model"):
        FrozenCLIP(torch.nn.Linear(2, 2), tokenizer=lambda x: x, device="cpu")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_clip(image_size=30, patch_size=8)


@pytest.mark.gpu
def test_cuda_low_precision_close_to_cpu():
    v = _videos(4, 3, seed=9)
    cpu = tiny_clip(seed=0)
    gpu = tiny_clip(seed=0, device="cuda")
    assert gpu.dtype in (torch.bfloat16, torch.float16)
    out = gpu.encode_frames(v)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert (out.cpu() * cpu.encode_frames(v)).sum(-1).min() > 0.99
