"""GARModel: adapter wiring, encode, loss (Eq. 2), save / load, tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rest_fast.models import GARModel, tiny_blip, tiny_tokenizer

# Triton fixes interpreter-vs-compiled mode when it is first imported. Import it (and the adapter kernels) now, at
# collection, while conftest's TRITON_INTERPRET=1 holds: the fixture below switches tests to the reference path,
# and a first import under that setting would break interpreted kernels for the rest of the session.
try:
    import rest_fast.kernels.dwconv3d  # noqa: F401
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _reference_adapter(monkeypatch):
    # The adapters' torch reference path (the interpreted Triton kernel is covered by one test below).
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _encode_reference(gar: GARModel, videos: torch.Tensor) -> torch.Tensor:
    """Layer by layer, without hooks: adapter (if any) before each chosen ViT layer, post-LN, mean over T."""
    B, T = videos.shape[:2]
    vm = gar.blip.vision_model
    x = vm.embeddings(videos.reshape(B * T, *videos.shape[2:]))
    adapters = dict(zip(gar.adapter_layers, gar.temporal_adapters))
    for i, layer in enumerate(vm.encoder.layers):
        if i in adapters:
            a = adapters[i]
            saved, a.num_frames = a.num_frames, T
            try:
                x = a(x)
            finally:
                a.num_frames = saved
        x = type(layer).forward(layer, x)  # bypasses __call__, hence GARModel's pre-hooks
    x = vm.post_layernorm(x)
    return x.view(B, T, *x.shape[1:]).mean(1)


def test_tokenizer_covers_lowercase_english():
    tok = tiny_tokenizer()
    for text in ["a video of a man playing guitar", "someone is xylophoning quietly, 42 times!",
                 "zebras jumped over the fence"]:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.pad_token_id == 0 and tok.bos_token_id == len(tok) - 1


def test_state_dict_keys_unchanged_and_adapters_separate():
    blip, tok = tiny_blip(seed=0)
    keys = set(blip.state_dict())
    gar = GARModel(blip, tok, num_frames=4, adapter_layers=[1])
    assert set(gar.blip.state_dict()) == keys
    extra = set(gar.state_dict()) - {f"blip.{k}" for k in keys}
    assert extra == {"temporal_adapters.0.weight", "temporal_adapters.0.bias"}
    assert gar.adapter_layers == [1]
    assert GARModel(blip, tok, adapter_layers=[]).temporal_adapters is not None
    with pytest.raises(ValueError, match="adapter_layers"):
        GARModel(blip, tok, adapter_layers=[5])
    with pytest.raises(ValueError, match="adapter_layers"):
        GARModel(blip, tok, adapter_layers="some")


@pytest.mark.parametrize("T,layers", [(3, "all"), (2, [1]), (1, [0])])
def test_encode_matches_layerwise_reference(T, layers):
    blip, tok = tiny_blip(seed=1)
    gar = GARModel(blip, tok, num_frames=T, adapter_layers=layers, adapter_init_std=0.05)
    with torch.no_grad():
        for a in gar.temporal_adapters:
            a.bias.normal_(0, 0.05)
    videos = torch.randn(2, T, 3, 32, 32, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        out = gar.encode(videos)
        ref = _encode_reference(gar, videos)
    assert out.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if T > 1:  # the adapters mix frames: a clip is not the mean of its frames encoded one by one
        with torch.no_grad():
            per_frame = torch.stack([gar.encode(videos[:, t]) for t in range(T)], 1).mean(1)
        assert (out - per_frame).abs().max() > 1e-3


def test_encode_zero_adapters_is_frame_mean_of_blip():
    blip, tok = tiny_blip(seed=2)
    gar = GARModel(blip, tok, num_frames=4, adapter_layers="all", adapter_init_std=0.0)
    videos = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = gar.encode(videos)
        per_frame = blip.vision_model(pixel_values=videos.flatten(0, 1)).last_hidden_state
    torch.testing.assert_close(out, per_frame.view(2, 4, 17, 32).mean(1), rtol=1e-5, atol=1e-6)
    # Images [B, 3, S, S] are one-frame clips.
    with torch.no_grad():
        torch.testing.assert_close(gar.encode(videos[:, 0]), per_frame.view(2, 4, 17, 32)[:, 0], rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="videos"):
        gar.encode(torch.randn(2, 4, 1, 32, 32))


@pytest.mark.parametrize("size", [16, 48])
def test_encode_other_frame_size_interpolates_position_embeddings(size):
    # The paper trains at S=224 on the 384-px BLIP-base: the ViT's position embeddings must be interpolated,
    # not sliced (smaller frames) or rejected (larger frames).
    blip, tok = tiny_blip(seed=2)  # image_size 32, patch 8
    gar = GARModel(blip, tok, num_frames=2, adapter_layers="all", adapter_init_std=0.0)
    videos = torch.randn(1, 2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = gar.encode(videos)
        ref = blip.vision_model(pixel_values=videos.flatten(0, 1), interpolate_pos_encoding=True).last_hidden_state
    n_tokens = 1 + (size // 8) ** 2
    assert out.shape == (1, n_tokens, 32)
    torch.testing.assert_close(out, ref.view(1, 2, n_tokens, 32).mean(1), rtol=1e-5, atol=1e-6)


def test_encode_with_interpreted_adapter_kernel(monkeypatch):
    """One small clip through the Triton kernel (interpreted on CPU) matches the reference path."""
    blip, tok = tiny_blip(seed=3)
    gar = GARModel(blip, tok, num_frames=2, adapter_layers=[1], adapter_init_std=0.05)
    videos = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = gar.encode(videos)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        out = gar.encode(videos)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _loss_reference(blip, tok, pixels, captions, prompt, smoothing, max_length=40):
    """HF's full forward (all positions, full vocabulary), then CE on caption tokens, in float64."""
    texts = [f"{prompt} {c}".lower() for c in captions]
    enc = tok(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids = enc.input_ids.clone()
    ids[:, 0] = blip.config.text_config.bos_token_id
    logits = blip(pixel_values=pixels, input_ids=ids, attention_mask=enc.attention_mask).logits.double()
    n_prompt = len(tok(prompt).input_ids) - 1
    out = []
    for b in range(len(captions)):
        n = int(enc.attention_mask[b].sum())
        pos = torch.arange(n_prompt - 1, n - 1)  # logits at pos predict token pos + 1
        ce = F.cross_entropy(logits[b, pos], ids[b, pos + 1], label_smoothing=smoothing)
        out.append(ce)
    return torch.stack(out)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_loss_matches_reference_and_backprops(smoothing):
    blip, tok = tiny_blip(seed=4)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[0], adapter_init_std=0.0)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    caps = ["A man is playing guitar", "someone cooks", "two kids jumping into the pool at the park"]
    out = gar.loss(pixels[:, None], caps, label_smoothing=smoothing)
    with torch.no_grad():
        ref = _loss_reference(blip, tok, pixels, caps, "a video of", smoothing)
    torch.testing.assert_close(out.per_sample.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.per_sample.mean())
    out.loss.backward()
    assert gar.temporal_adapters[0].weight.grad is not None
    assert gar.temporal_adapters[0].weight.grad.abs().sum() > 0
    assert blip.text_decoder.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # forward() is the loss; a different prompt changes which tokens are scored.
    with torch.no_grad():
        other = gar(pixels[:, None], caps, prompt="a person is", label_smoothing=smoothing)
        ref2 = _loss_reference(blip, tok, pixels, caps, "a person is", smoothing)
    torch.testing.assert_close(other.per_sample.double(), ref2, rtol=1e-5, atol=1e-5)


def test_loss_errors():
    blip, tok = tiny_blip(seed=5)
    gar = GARModel(blip, tok, num_frames=1, adapter_layers=[])
    px = torch.randn(2, 1, 3, 32, 32)
    with pytest.raises(ValueError, match="captions"):
        gar.loss(px, ["one caption"])
    with pytest.raises(ValueError, match="max_length"):
        gar.loss(px, ["a b", "c d"], max_length=4)
    with pytest.raises(ValueError, match="label_smoothing"):
        gar.loss(px, ["a b", "c d"], label_smoothing=1.5)


def test_save_load_roundtrip(tmp_path):
    blip, tok = tiny_blip(seed=6, save_dir=tmp_path / "hf")
    # A plain HF directory: fresh adapters, defaults T=8 / "all".
    loaded = GARModel.from_pretrained(tmp_path / "hf")
    assert loaded.num_frames == 8 and loaded.adapter_layers == [0, 1]
    for k, v in blip.state_dict().items():
        torch.testing.assert_close(loaded.blip.state_dict()[k], v, rtol=0, atol=0)

    gar = GARModel(blip, tok, num_frames=3, adapter_layers=[1], adapter_init_std=0.05)
    gar.save_pretrained(tmp_path / "gar")
    back = GARModel.from_pretrained(tmp_path / "gar")
    assert back.num_frames == 3 and back.adapter_layers == [1]
    for k, v in gar.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    videos = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = gar.generate(videos, num_beams=2, max_length=10)
    b = back.generate(videos, num_beams=2, max_length=10)
    assert torch.equal(a.token_ids, b.token_ids) and a.texts == b.texts
    assert back.tokenizer("a video of").input_ids == tok("a video of").input_ids
    with pytest.raises(ValueError, match="adapter"):
        GARModel.from_pretrained(tmp_path / "gar", adapter_layers=[0])


def test_deepcopy_carries_its_own_adapters():
    import copy

    blip, tok = tiny_blip(seed=7)
    gar = GARModel(blip, tok, num_frames=2, adapter_layers="all", adapter_init_std=0.0)
    videos = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(gar)
    with torch.no_grad():
        before = gar.encode(videos)
        for a in twin.temporal_adapters:
            a.weight.normal_(0, 0.1)
        torch.testing.assert_close(gar.encode(videos), before, rtol=0, atol=0)  # the original is unaffected
        assert (twin.encode(videos) - before).abs().max() > 1e-3  # the copy runs its own adapters
