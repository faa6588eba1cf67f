"""``rest-fast plan``: what a REST run costs before it starts — FLOPs, time, memory, disk — from the config alone.

Nothing is loaded but configuration: the captioner and CLIP architectures come from their configs (HF ``BlipConfig``
defaults for the BLIP hub ids, ``open_clip``'s bundled model configs for CLIP names, a local folder's
``config.json``), built offline, and every figure is counted from those dimensions and the data size.

What is COUNTED (exact for the architecture, checked against ``torch.utils.flop_counter.FlopCounterMode`` on tiny
configs in ``tests/test_plan.py``) and what is MODELLED (assumptions, stated in the output) is kept apart.

FLOPs (counted; matmul, convolution and attention only, as FlopCounterMode counts; a multiply-add is 2 FLOPs;
elementwise ops, norms, softmax and the loss are left out, < 1 %):

* ViT layer, per frame of ``n`` tokens (``n = (S/p)² + 1``), width ``d``, MLP width ``m``:
  ``2·n·(4d² + 2dm)`` for the qkv, output and MLP projections, plus ``4·n²·d`` for ``q·kᵀ`` and ``attn·v``.
  Patch embedding ``2·(S/p)²·3p²·d``. Temporal adapter (depth-wise 3×3×3 conv, counted as a convolution):
  ``2·(S/p)²·d·27`` per adapted layer.
* BLIP text-decoder layer, per caption of ``L`` tokens attending to ``n`` image tokens of width ``e``:
  ``2·L·(4d² + 2d² + 2dm)`` (self q/k/v/o, cross q/o, MLP) + ``2·n·2·e·d`` (cross k/v on the image tokens)
  + ``4·L²·d + 4·L·n·d`` (self and cross attention). LM head on the scored tokens only:
  ``2·s·(d² + d·V)`` (transform + vocabulary projection).
* Backward = 2 × forward (gradients of inputs and of weights), except the patch embedding: its input (pixels) needs
  no gradient, so its backward is 1 × forward.

Hand derivation for the default config (BLIP-base run at S=224: d=768, m=3072, 12 layers, n=197 tokens, 12
adapters; T=8, global batch 64 → 512 frames; captions padded to L=23 tokens, 19 scored; V=30524):

* ViT layer per frame: ``2·197·(4·768² + 2·768·3072) = 2.789 GFLOP`` + attention ``4·197²·768 = 0.119 GFLOP``
  → 12 layers 34.90 GFLOP; patch embedding ``2·196·768·768 = 0.231``; adapters ``12·2·196·768·27 = 0.098``:
  **35.23 GFLOP per frame forward** (the often-quoted 17.6 G of ViT-B/16 counts multiply-adds).
* Forward + backward: ``3·(34.90 + 0.098) + 2·0.231 = 105.45 GFLOP`` per frame, × 512 = **53.99 TFLOP**
  (the issue's independent "≈ 54 TFLOP").
* Text decoder per caption: 12 layers × (``2·23·(6·768² + 2·768·3072) = 0.380`` + cross k/v on the image
  ``2·197·2·768² = 0.465`` + attention ``4·23²·768 + 4·23·197·768 = 0.016``) = 10.32 GFLOP, LM head
  ``2·19·(768² + 768·30524) = 0.913``: 11.24 GFLOP forward, × 3 × 64 = 2.16 TFLOP.
* One global step: **≈ 56.1 TFLOP**. At 60 % of an H100's 989 TFLOP/s on 8 GPUs: 11.8 ms, 8 clips per GPU →
  ≈ 680 clips/s per GPU to keep up.

Memory (modelled, GiB = 2³⁰ bytes): fp32 master weights + fp32 gradients + AdamW's two fp32 states + the bf16
weight copies autocast keeps during the step (18 B per trainable parameter; DDP buckets are gradient views);
activations saved for backward under bf16 autocast with SDPA attention (no n² score matrix), per ViT layer per
token ``22d + 4m`` bytes (fp32 residual stream into the two LayerNorms, bf16 inputs of the four projections, q/k/v
and the attention output, the GELU input and output) + ``4d`` for an adapter's fp32 input; with
``grad_checkpointing`` only each layer's fp32 input (``4d`` per token) plus one layer recomputed. Caption features
fp16 on device in a table grown by ≤ 1.25×; each rank's neighbour-graph rows int32; video features fp16; the frozen
CLIP in bf16; a fixed allowance for the CUDA context and library workspaces.

Time (modelled): FLOPs at a stated fraction of the GPU's dense bf16 peak (``--mfu``; beam-search decoding at
``--decode-efficiency`` plus a fixed overhead per decoding step); re-ranking and neighbour search as bytes read at
half the HBM bandwidth. Data loading is assumed to keep up: ``clips_per_second_needed`` says at what rate.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rest_fast.run.config import TrainConfig, apply_overrides, load_yaml, parse_key_values

GIB = float(1 << 30)


# ------------------------------------------------------------------------------------------------------------------
# hardware
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    """Vendor datasheet figures (dense, no sparsity)."""

    name: str
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s
    memory_gib: float  # device memory
    hbm_bytes_per_s: float  # memory bandwidth


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM 80GB", 989.4e12, 80.0, 3.35e12),
    "h200": GPU("H200 SXM 141GB", 989.4e12, 141.0, 4.8e12),
    "a100": GPU("A100 SXM 80GB", 312.0e12, 80.0, 2.039e12),
    "l40s": GPU("L40S 48GB", 362.05e12, 48.0, 0.864e12),
}


# ------------------------------------------------------------------------------------------------------------------
# architectures, from configs only
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlipArch:
    """BLIP captioner dimensions (``BlipForConditionalGeneration``: ViT + BERT-like decoder with cross-attention)."""

    source: str
    v_hidden: int
    v_layers: int
    v_mlp: int
    v_heads: int
    patch: int
    native_image_size: int  # the checkpoint's size (position embeddings); frames of another size interpolate them
    t_hidden: int
    t_layers: int
    t_mlp: int
    t_heads: int
    vocab: int
    encoder_hidden: int
    max_positions: int
    tied_lm_head: bool = True


@dataclass(frozen=True)
class ClipArch:
    """CLIP dimensions (image tower + text tower + projections)."""

    source: str
    embed_dim: int
    v_width: int
    v_layers: int
    v_mlp: int
    v_heads: int
    patch: int
    image_size: int
    t_width: int
    t_layers: int
    t_mlp: int
    t_heads: int
    context: int
    vocab: int


# HF hub ids with their config values, so no download is needed (the values of their config.json).
_BLIP_HUB = {
    "salesforce/blip-image-captioning-base": dict(v_hidden=768, v_layers=12, v_mlp=3072, v_heads=12),
    "salesforce/blip-image-captioning-large": dict(v_hidden=1024, v_layers=24, v_mlp=4096, v_heads=16),
}
# HF CLIP ids → the equivalent open_clip architecture (same dimensions).
_CLIP_HF = {
    "openai/clip-vit-base-patch16": "ViT-B-16",
    "openai/clip-vit-base-patch32": "ViT-B-32",
    "openai/clip-vit-large-patch14": "ViT-L-14",
    "openai/clip-vit-large-patch14-336": "ViT-L-14-336",
}


def blip_arch_from_config(config, source: str) -> BlipArch:
    """Dimensions of a ``transformers.BlipConfig`` (or a built model's ``.config``)."""
    v, t = config.vision_config, config.text_config
    return BlipArch(
        source=source, v_hidden=v.hidden_size, v_layers=v.num_hidden_layers, v_mlp=v.intermediate_size,
        v_heads=v.num_attention_heads, patch=v.patch_size, native_image_size=v.image_size, t_hidden=t.hidden_size,
        t_layers=t.num_hidden_layers, t_mlp=t.intermediate_size, t_heads=t.num_attention_heads, vocab=t.vocab_size,
        encoder_hidden=t.encoder_hidden_size, max_positions=t.max_position_embeddings,
        tied_lm_head=bool(getattr(t, "tie_word_embeddings", True)),
    )


def blip_arch(name: str, image_size: int = 224) -> BlipArch:
    """The captioner's dimensions from its name: ``tiny`` (the demo's random BLIP), a local folder (its
    ``config.json``) or a known HF hub id; no weights, no network."""
    from transformers import BlipConfig

    path = Path(name)
    if name == "tiny":
        from rest_fast.models.tiny import tiny_blip
        from rest_fast.train.inputs import DEMO_WORDS

        model, _ = tiny_blip(None, vocab=DEMO_WORDS, image_size=image_size)  # tiny: built in milliseconds
        return blip_arch_from_config(model.config, "tiny")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"blip={name}: the folder has no config.json")
        cfg = BlipConfig.from_dict(json.loads((path / "config.json").read_text()))
        return blip_arch_from_config(cfg, str(path))
    vis = _BLIP_HUB.get(name.lower())
    if vis is None:
        raise ValueError(f"blip={name!r}: not a local folder and not a known hub id ({', '.join(_BLIP_HUB)}); "
                         "pass a folder holding its config.json")
    cfg = BlipConfig(vision_config=dict(hidden_size=vis["v_hidden"], num_hidden_layers=vis["v_layers"],
                                        intermediate_size=vis["v_mlp"], num_attention_heads=vis["v_heads"],
                                        image_size=384, patch_size=16),
                     text_config=dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, intermediate_size=3072,
                                      num_attention_heads=12, encoder_hidden_size=vis["v_hidden"],
                                      max_position_embeddings=512))
    return blip_arch_from_config(cfg, name)


def _clip_from_open_clip(cfg: dict, source: str) -> ClipArch:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if not isinstance(v.get("layers"), int) or "timm_model_name" in v or "hf_model_name" in t:
        raise ValueError(f"clip={source}: only plain ViT image towers and transformer text towers are modelled")
    vw, tw = int(v["width"]), int(t.get("width", 512))
    head_width = int(v.get("head_width", 64))
    return ClipArch(
        source=source, embed_dim=int(cfg["embed_dim"]), v_width=vw, v_layers=int(v["layers"]),
        v_mlp=int(vw * float(v.get("mlp_ratio", 4.0))), v_heads=max(1, vw // head_width), patch=int(v["patch_size"]),
        image_size=int(v["image_size"]) if not isinstance(v["image_size"], (list, tuple)) else int(v["image_size"][0]),
        t_width=tw, t_layers=int(t.get("layers", 12)), t_mlp=int(tw * float(t.get("mlp_ratio", 4.0))),
        t_heads=int(t.get("heads", 8)), context=int(t.get("context_length", 77)), vocab=int(t.get("vocab_size", 49408)),
    )


def clip_arch(name: str, image_size: int = 224) -> ClipArch:
    """The frozen CLIP's dimensions: ``tiny``, an open_clip model name, a known HF id or a local HF folder."""
    if name == "tiny":
        from rest_fast.clip import tiny_clip

        d = {k: p.default for k, p in inspect.signature(tiny_clip).parameters.items()}
        size = image_size if image_size % d["patch_size"] == 0 else d["image_size"]  # as the trainer picks it
        w = d["width"]
        return ClipArch("tiny", d["embed_dim"], w, d["layers"], 4 * w, d["heads"], d["patch_size"], size, w,
                        d["layers"], 4 * w, d["heads"], d["context_length"], 49408)
    path = Path(name)
    if path.is_dir():
        f = path / "config.json"
        if not f.is_file():
            raise ValueError(f"clip={name}: the folder has no config.json")
        c = json.loads(f.read_text())
        if "vision_config" not in c or "text_config" not in c:
            raise ValueError(f"clip={name}: config.json is not an HF CLIP config (no vision_config/text_config)")
        from transformers import CLIPConfig

        cc = CLIPConfig.from_dict(c)
        v, t = cc.vision_config, cc.text_config
        return ClipArch(str(path), cc.projection_dim, v.hidden_size, v.num_hidden_layers, v.intermediate_size,
                        v.num_attention_heads, v.patch_size, v.image_size, t.hidden_size, t.num_hidden_layers,
                        t.intermediate_size, t.num_attention_heads, t.max_position_embeddings, t.vocab_size)
    import open_clip

    oc_name = _CLIP_HF.get(name.lower(), name)
    cfg = open_clip.get_model_config(oc_name)
    if cfg is None:
        raise ValueError(f"clip={name!r}: not an open_clip model name, a known HF id ({', '.join(_CLIP_HF)}) "
                         "or a local folder with config.json")
    return _clip_from_open_clip(cfg, name)


# ------------------------------------------------------------------------------------------------------------------
# parameter counts
# ------------------------------------------------------------------------------------------------------------------
def _vit_layer_params(d: int, m: int) -> int:
    return 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d  # qkv/out (+bias), MLP (+bias), two LayerNorms


def blip_params(a: BlipArch) -> int:
    """Parameters of ``BlipForConditionalGeneration`` (LM head tied to the word embeddings, its bias separate)."""
    d, e, n_native = a.t_hidden, a.v_hidden, (a.native_image_size // a.patch) ** 2 + 1
    vision = 3 * a.patch**2 * e + e + e + n_native * e + a.v_layers * _vit_layer_params(e, a.v_mlp) + 2 * e
    layer = (3 * (d * d + d) + d * d + d + 2 * d  # self q/k/v, output dense + LayerNorm
             + d * d + d + 2 * (e * d + d) + d * d + d + 2 * d  # cross q, k/v (from the image width), output + LN
             + d * a.t_mlp + a.t_mlp + a.t_mlp * d + d + 2 * d)  # MLP + LayerNorm
    embeddings = a.vocab * d + a.max_positions * d + 2 * d
    head = d * d + d + 2 * d + a.vocab + (0 if a.tied_lm_head else a.vocab * d)
    return vision + embeddings + a.t_layers * layer + head


def adapter_params(a: BlipArch, n_adapters: int) -> int:
    return n_adapters * (a.v_hidden * 27 + a.v_hidden)


def clip_params(c: ClipArch) -> int:
    """Parameters of an open_clip ``CLIP`` (ViT image tower, causal text tower, projections, logit scale)."""
    g = (c.image_size // c.patch) ** 2 + 1
    vision = (3 * c.patch**2 * c.v_width + c.v_width + g * c.v_width + 2 * c.v_width
              + c.v_layers * _vit_layer_params(c.v_width, c.v_mlp) + 2 * c.v_width + c.v_width * c.embed_dim)
    text = (c.vocab * c.t_width + c.context * c.t_width + c.t_layers * _vit_layer_params(c.t_width, c.t_mlp)
            + 2 * c.t_width + c.t_width * c.embed_dim)
    return vision + text + 1


# ------------------------------------------------------------------------------------------------------------------
# FLOP counts (matmul / conv / attention; see the module docstring)
# ------------------------------------------------------------------------------------------------------------------
def vit_frame_flops(d: int, m: int, layers: int, patch: int, image_size: int, n_adapters: int = 0) -> dict[str, int]:
    """Forward FLOPs of one frame through a ViT: ``patch_embed``, ``layers`` (projections + attention), ``adapters``."""
    n_patch = (image_size // patch) ** 2
    n = n_patch + 1
    return {
        "patch_embed": 2 * n_patch * 3 * patch * patch * d,
        "layers": layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d),
        "adapters": n_adapters * 2 * n_patch * d * 27,
    }


def text_decoder_flops(a: BlipArch, captions: int, tokens: int, scored: int, image_tokens: int) -> int:
    """Forward FLOPs of the BLIP text decoder: ``captions`` sequences of ``tokens`` (padded) each attending to
    ``image_tokens`` encoder tokens, and the LM head on ``scored`` tokens in total."""
    d, m, e, L, n = a.t_hidden, a.t_mlp, a.encoder_hidden, tokens, image_tokens
    per_layer = 2 * L * (6 * d * d + 2 * d * m) + 2 * n * 2 * e * d + 4 * L * L * d + 4 * L * n * d
    return captions * a.t_layers * per_layer + 2 * scored * (d * d + d * a.vocab)


def train_step_flops(a: BlipArch, *, clips: int, frames: int, image_size: int, n_adapters: int, tokens: int,
                     scored_per_caption: int) -> dict[str, int]:
    """Model FLOPs of one optimisation step over ``clips`` clips of ``frames`` frames (forward + backward),
    by component. ``scored_per_caption``: caption tokens in the loss (LM head rows) per clip."""
    vf = vit_frame_flops(a.v_hidden, a.v_mlp, a.v_layers, a.patch, image_size, n_adapters)
    image_tokens = (image_size // a.patch) ** 2 + 1
    nf = clips * frames
    vit_fwd = nf * (vf["patch_embed"] + vf["layers"] + vf["adapters"])
    text_fwd = text_decoder_flops(a, clips, tokens, clips * scored_per_caption, image_tokens)
    vit_bwd = nf * (vf["patch_embed"] + 2 * (vf["layers"] + vf["adapters"]))  # pixels need no gradient
    return {"vit_forward": vit_fwd, "vit_backward": vit_bwd, "text_forward": text_fwd, "text_backward": 2 * text_fwd,
            "adapters": 3 * nf * vf["adapters"],
            "total": vit_fwd + vit_bwd + 3 * text_fwd,
            "vit_layers_forward": nf * (vf["layers"] + vf["adapters"])}


def decode_flops(a: BlipArch, *, prompt_tokens: int, beams: int, max_length: int, image_tokens: int) -> int:
    """Upper bound of beam-search FLOPs for one caption (every beam runs to ``max_length``), as our decoder does it:
    cross-attention keys/values once per item, the prompt once, then one token per beam per step (LM head on it)."""
    d, m, e, n, V = a.t_hidden, a.t_mlp, a.encoder_hidden, image_tokens, a.vocab
    cross_kv = a.t_layers * 2 * n * 2 * e * d
    p = prompt_tokens
    prompt = a.t_layers * (2 * p * (6 * d * d + 2 * d * m) + 4 * p * p * d + 4 * p * n * d) + 2 * (d * d + d * V)
    steps = max(0, max_length - p - 1)
    per_row = a.t_layers * (2 * (6 * d * d + 2 * d * m) + 4 * n * d) + 2 * (d * d + d * V)
    # step j's token attends to the prompt and the j + 1 tokens chosen so far (its own included)
    self_attn = a.t_layers * 4 * d * sum(p + 1 + j for j in range(steps))
    return cross_kv + prompt + beams * (steps * per_row + self_attn)


def clip_image_flops(c: ClipArch) -> int:
    """Forward FLOPs of one frame through the CLIP image tower (+ projection)."""
    f = vit_frame_flops(c.v_width, c.v_mlp, c.v_layers, c.patch, c.image_size)
    return f["patch_embed"] + f["layers"] + 2 * c.v_width * c.embed_dim


def clip_text_flops(c: ClipArch) -> int:
    """Forward FLOPs of one caption through the CLIP text tower (all ``context`` positions run) + projection."""
    n, w = c.context, c.t_width
    return c.t_layers * (2 * n * (4 * w * w + 2 * w * c.t_mlp) + 4 * n * n * w) + 2 * w * c.embed_dim


# ------------------------------------------------------------------------------------------------------------------
# activation memory (modelled; see the module docstring)
# ------------------------------------------------------------------------------------------------------------------
def vit_layer_bytes_per_token(d: int, m: int, adapter: bool) -> int:
    """Bytes saved for backward per token per ViT layer under bf16 autocast with SDPA attention."""
    return 22 * d + 4 * m + (4 * d if adapter else 0)


def activation_bytes(a: BlipArch, *, clips: int, frames: int, image_size: int, n_adapters: int, tokens: int,
                     scored_per_caption: int, checkpointing: bool) -> dict[str, float]:
    """Activation memory of one micro-batch on one GPU, by component (bytes)."""
    n = (image_size // a.patch) ** 2 + 1
    nf = clips * frames
    d = a.v_hidden
    full = vit_layer_bytes_per_token(d, a.v_mlp, True)
    per_layer = [vit_layer_bytes_per_token(d, a.v_mlp, i < n_adapters) for i in range(a.v_layers)]
    if checkpointing:
        vit = nf * n * (4 * d * a.v_layers + full)  # checkpointed layer inputs + one layer recomputed
    else:
        vit = nf * n * sum(per_layer)
    backward_working = nf * n * full  # gradients of one layer's activations in flight
    pixels = nf * 3 * image_size * image_size * (4 + 2) + nf * n * d * 4 * 2  # input + conv's bf16 copy; embeddings
    td, tm, heads = a.t_hidden, a.t_mlp, a.t_heads
    text = clips * a.t_layers * (tokens * (42 * td + 4 * tm + 6 * heads * (tokens + n)) + n * 8 * td)
    head = clips * scored_per_caption * (10 * a.vocab + 12 * td)
    return {"vit": vit, "vit_backward_working": backward_working, "inputs_embeddings": pixels, "text_decoder": text,
            "lm_head": head,
            "eager_attention_extra": nf * (a.v_layers if not checkpointing else 1) * 6 * a.v_heads * n * n}


# ------------------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------------------
RUNTIME_GPU_GIB = 1.5  # CUDA context, cuBLAS/NCCL workspaces, allocator slack (modelled)
RUNTIME_HOST_GIB = 3.0  # Python + torch + CUDA libraries resident per process (modelled)
SHARD_MB_PER_32_FRAMES = 0.6278  # measured: bench/shards.py, 32 frames at short side 256, JPEG q90 (README)
DECODE_STEP_OVERHEAD_S = 2e-3  # per beam-search step of one batch: kernel launches, beam bookkeeping (modelled)
BANDWIDTH_EFFICIENCY = 0.5  # fraction of HBM bandwidth reached by gathers / blocked GEMM reads (modelled)


@dataclass(frozen=True)
class PlanOptions:
    num_videos: int
    gpus: int
    gpu: str = "h100"
    mfu: float = 0.6
    decode_efficiency: float = 0.2
    distinct_fraction: float = 0.5
    prepared_frames: int = 32
    loader_clips_per_second: float | None = None  # measured loader rate per GPU; None = assume it keeps up


def caption_lengths(cfg: TrainConfig) -> tuple[int, int, int]:
    """(padded training tokens, scored tokens per caption, decoder prompt tokens), modelled from the config.

    A word is taken as one WordPiece token (true for the prompts and most caption words). Training text is
    ``[DEC] train_prompt caption [SEP]``; generated captions are at most ``max_length`` tokens with BOS and prompt,
    and initial captions made with another prompt carry that prompt too, so batches pad to
    ``max_length + longest other prompt`` (capped at the loss's 40 tokens). Every token after the prompt is scored.
    """
    prompt = 1 + len(cfg.train_prompt.split())  # BOS + prompt
    extra = max((len(p.split()) for p in cfg.prompts if p.strip().lower() != cfg.train_prompt.strip().lower()),
                default=0)
    tokens = min(40, cfg.max_length + extra)
    return tokens, max(1, tokens - prompt), prompt


def _n_adapters(cfg: TrainConfig, layers: int) -> int:
    v = cfg.adapter_layers_value()
    return layers if v == "all" else len([i for i in v if 0 <= i < layers])


def make_plan(cfg: TrainConfig, opts: PlanOptions) -> dict[str, Any]:
    """Every figure of the plan as a JSON-able dict (see the module docstring for what is counted/modelled)."""
    if opts.gpu not in GPUS:
        raise ValueError(f"--gpu must be one of {', '.join(GPUS)}, got {opts.gpu!r}")
    if opts.loader_clips_per_second is not None and opts.loader_clips_per_second <= 0:
        raise ValueError(f"--clips-per-second must be > 0, got {opts.loader_clips_per_second}")
    if opts.num_videos < 2:
        raise ValueError(f"--num-videos must be >= 2, got {opts.num_videos}")
    if opts.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {opts.gpus}")
    if not 0 < opts.mfu <= 1 or not 0 < opts.decode_efficiency <= 1:
        raise ValueError("--mfu and --decode-efficiency must be in (0, 1]")
    if not 0 < opts.distinct_fraction <= 1:
        raise ValueError(f"--distinct-fraction must be in (0, 1], got {opts.distinct_fraction}")
    if cfg.batch_size < opts.gpus:
        raise ValueError(f"batch_size={cfg.batch_size} is smaller than --gpus {opts.gpus}: each GPU needs a clip")
    gpu = GPUS[opts.gpu]
    N, G = opts.num_videos, opts.gpus
    a = blip_arch(cfg.blip, cfg.image_size)
    c = clip_arch(cfg.clip, cfg.image_size)
    if cfg.image_size % a.patch:
        raise ValueError(f"image_size={cfg.image_size} is not a multiple of the ViT patch size {a.patch}")
    T, P, H, K, S = cfg.num_frames, len(cfg.prompts), min(cfg.num_neighbours, N - 1), cfg.k, cfg.image_size
    n_adapt = _n_adapters(cfg, a.v_layers)
    tokens, scored, prompt_tokens = caption_lengths(cfg)
    image_tokens = (S // a.patch) ** 2 + 1
    per_rank = cfg.batch_size // G  # as the trainer splits it (inputs.per_rank_batch)
    global_batch = per_rank * G
    videos_per_rank = -(-N // G)
    steps_per_epoch = -(-videos_per_rank // per_rank)

    # --- FLOPs and time of training ----------------------------------------------------------------------------
    fl = train_step_flops(a, clips=global_batch, frames=T, image_size=S, n_adapters=n_adapt, tokens=tokens,
                          scored_per_caption=scored)
    recompute = fl["vit_layers_forward"] if cfg.grad_checkpointing else 0
    hw_flops = fl["total"] + recompute
    rate = gpu.bf16_flops * opts.mfu
    compute_step_s = hw_flops / (G * rate)
    cps = opts.loader_clips_per_second
    step_s = max(compute_step_s, per_rank / cps) if cps else compute_step_s
    epoch_s = steps_per_epoch * step_s
    train_s = cfg.epochs * epoch_s

    # --- caption rounds ----------------------------------------------------------------------------------------
    vf = vit_frame_flops(a.v_hidden, a.v_mlp, a.v_layers, a.patch, S, n_adapt)
    vit_frame = vf["patch_embed"] + vf["layers"] + vf["adapters"]
    dec_rate = gpu.bf16_flops * opts.decode_efficiency
    bw = gpu.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY
    dec_steps = max(1, cfg.max_length - prompt_tokens)
    per_rank_eval_batches = -(-videos_per_rank // cfg.eval_batch_size)
    D = c.embed_dim
    f_clip_img, f_clip_txt = clip_image_flops(c), clip_text_flops(c)
    # round 0: T×P initial captions per video (each frame its own 1-frame clip), CLIP video features, neighbours
    init_captions = N * T * P
    distinct0 = max(1, round(init_captions * opts.distinct_fraction))
    init_dec = sum(decode_flops(a, prompt_tokens=1 + len(p.split()), beams=cfg.num_beams, max_length=cfg.max_length,
                                image_tokens=image_tokens) for p in cfg.prompts)
    init_s = (N * T * vit_frame / rate + N * T * init_dec / dec_rate
              + per_rank_eval_batches * P * dec_steps * DECODE_STEP_OVERHEAD_S * G) / G
    clip_video_s = N * T * f_clip_img / rate / G
    if cps:  # each pass over the videos reads every clip once
        init_s, clip_video_s = max(init_s, videos_per_rank / cps), max(clip_video_s, videos_per_rank / cps)
    topk_flops = 2 * N * N * D
    topk_s = (topk_flops / rate + (videos_per_rank / 1024) * N * D * 2 / bw * G) / G  # GEMM + reading keys per block
    text0_s = distinct0 * f_clip_txt / rate / G
    per_video_candidates_upper = (H + 1) * T * P
    per_video_candidates = min(per_video_candidates_upper, (H + 1) * max(1, round(T * P * opts.distinct_fraction)))
    rerank0_bytes = videos_per_rank * per_video_candidates * D * 2
    rerank0_upper = videos_per_rank * per_video_candidates_upper * D * 2
    round0_s = init_s + clip_video_s + topk_s + text0_s + rerank0_bytes / bw
    # round r: one beam-search caption per video (T-frame clip through the adapted ViT), embed, re-rank
    gen_dec = decode_flops(a, prompt_tokens=prompt_tokens, beams=cfg.num_beams, max_length=cfg.max_length,
                           image_tokens=image_tokens)
    gen_s = (N * T * vit_frame / rate + N * gen_dec / dec_rate) / G + per_rank_eval_batches * dec_steps * DECODE_STEP_OVERHEAD_S
    if cps:
        gen_s = max(gen_s, videos_per_rank / cps)
    rerank_r_bytes = videos_per_rank * (H + K + 1) * D * 2
    round_s = gen_s + N * f_clip_txt / rate / G + rerank_r_bytes / bw
    rounds = cfg.num_rounds
    run_s = train_s + round0_s + rounds * round_s

    # --- device memory (per GPU) -------------------------------------------------------------------------------
    p_train = blip_params(a) + adapter_params(a, n_adapt)
    p_clip = clip_params(c)
    captions_final = distinct0 + rounds * N
    act = activation_bytes(a, clips=per_rank, frames=T, image_size=S, n_adapters=n_adapt, tokens=tokens,
                           scored_per_caption=scored, checkpointing=cfg.grad_checkpointing)
    act_total = sum(v for k, v in act.items() if k != "eager_attention_extra")
    mem = {
        "params_grads_optimizer": p_train * 18 / GIB,
        "activations": act_total / GIB,
        "caption_features": 1.25 * captions_final * D * 2 / GIB,
        "neighbour_graph": videos_per_rank * H * 4 / GIB,
        "video_features": N * D * 2 / GIB,
        "frozen_clip": p_clip * 2 / GIB,
        "runtime": RUNTIME_GPU_GIB,
    }
    mem["total"] = sum(mem.values())

    # --- host memory (rank 0, the largest) ---------------------------------------------------------------------
    clip_bytes = max(per_rank, cfg.eval_batch_size) * T * 3 * S * S * 4
    host = {
        "runtime": RUNTIME_HOST_GIB,
        "loader_buffers": (max(cfg.num_workers, 1) * 2 + 2) * clip_bytes / GIB,  # 2 batches per worker + pinned
        "caption_cache": (captions_final * 96 + N * K * 8) / GIB,  # texts (~40 B) + index/hash (~56 B) + slots
        "round0_initial_captions": init_captions * 100 / GIB,  # gathered Python strings on every rank
        "rank0_writes": (N * H * 4 + captions_final * D * 2 + N * 1024) / GIB,  # graph, feature table, round jsonl
        "weights_at_load": (p_train + p_clip) * 4 / GIB,  # fp32 on the host before moving to the GPU
    }
    host_total = (host["runtime"] + host["loader_buffers"] + host["caption_cache"]
                  + max(host["weights_at_load"], host["round0_initial_captions"] + host["rank0_writes"]))

    # --- advice ------------------------------------------------------------------------------------------------
    usable = 0.9 * gpu.memory_gib
    advice = []
    if mem["total"] > usable:
        rest = mem["total"] - mem["activations"]
        if not cfg.grad_checkpointing:
            ck = activation_bytes(a, clips=per_rank, frames=T, image_size=S, n_adapters=n_adapt, tokens=tokens,
                                  scored_per_caption=scored, checkpointing=True)
            ck_total = rest + sum(v for k, v in ck.items() if k != "eager_attention_extra") / GIB
            advice.append(f"does not fit in 90% of {gpu.memory_gib:.0f} GiB: grad_checkpointing=true brings it to "
                          f"{ck_total:.1f} GiB (+1/3 ViT compute)")
        per_clip = act_total / per_rank / GIB
        fit = max(0, int((usable - rest) // per_clip)) if per_clip > 0 else per_rank
        if fit < per_rank:
            accum = -(-per_rank // max(fit, 1))
            advice.append(f"activations fit for {fit} clips per GPU at once: accumulate gradients over {accum} "
                          f"micro-batches of {-(-per_rank // accum)} to keep batch_size={cfg.batch_size} (the trainer "
                          "has no accumulation key yet: otherwise lower batch_size)")
    else:
        advice.append(f"fits in 90% of {gpu.memory_gib:.0f} GiB without changes")
    eager = act["eager_attention_extra"] / GIB
    advice.append(f"with eager ViT attention instead of SDPA (n x n scores kept for backward) activations grow by "
                  f"{eager:.1f} GiB: {mem['total'] + eager:.1f} GiB in all")

    out = {
        "config": {"blip": cfg.blip, "clip": cfg.clip, "num_frames": T, "image_size": S, "batch_size": cfg.batch_size,
                   "per_gpu_batch": per_rank, "num_neighbours": H, "k": K, "prompts": P, "epochs": cfg.epochs,
                   "rounds": rounds, "grad_checkpointing": cfg.grad_checkpointing, "adapters": n_adapt,
                   "num_beams": cfg.num_beams, "max_length": cfg.max_length},
        "num_videos": N, "gpus": G, "gpu": gpu.name,
        "loader_clips_per_second": cps,
        "mfu": opts.mfu, "decode_efficiency": opts.decode_efficiency, "distinct_fraction": opts.distinct_fraction,
        "params": {"trainable": p_train, "frozen_clip": p_clip},
        "flops_per_step": fl["total"],
        "hardware_flops_per_step": hw_flops,
        "flops_breakdown": {k: v for k, v in fl.items() if k not in ("total", "vit_layers_forward")},
        "steps_per_epoch": steps_per_epoch,
        "step_seconds": step_s,
        "clips_per_second_needed": per_rank / compute_step_s,
        "input_bound": bool(cps) and step_s > compute_step_s,
        "epoch_seconds": epoch_s,
        "run_hours": run_s / 3600,
        "time_seconds": {"training": train_s, "round0": round0_s, "round0_initial_captions": init_s,
                         "round0_clip_features": clip_video_s, "round0_neighbours": topk_s,
                         "round0_text_features": text0_s, "round0_rerank": rerank0_bytes / bw,
                         "per_round": round_s, "rounds": rounds},
        "round0_rerank_bytes": rerank0_bytes,
        "round0_rerank_bytes_upper": rerank0_upper,
        "round0_candidates_per_video": per_video_candidates,
        "caption_count_final": captions_final,
        "memory_gb_per_gpu": mem,
        "activation_detail_gb": {k: v / GIB for k, v in act.items()},
        "gpu_memory_gb": gpu.memory_gib,
        "host_memory_gb_per_rank": host_total,
        "host_memory_detail_gb": host,
        "shard_disk_gb": N * SHARD_MB_PER_32_FRAMES * opts.prepared_frames / 32 * 1e6 / 1e9,
        "advice": advice,
        "model": MODEL_NOTES,
    }
    return out


MODEL_NOTES = {
    "counted": "flops_per_step: matmul/conv/attention FLOPs of one global step (fwd + 2x bwd; patch embedding bwd "
               "1x), per ViT layer 2n(4d^2+2dm)+4n^2d per frame, per decoder layer 2L(6d^2+2dm)+4ed*n+4L^2d+4Lnd, "
               "LM head 2s(d^2+dV) on scored tokens, adapters 54*d per patch (depth-wise 3x3x3); params from configs",
    "modelled": "time at mfu x dense bf16 peak (+1/3 ViT recompute with grad_checkpointing), decoding at "
                "decode_efficiency + 2 ms per beam step per batch, re-rank/top-k reads at 50% HBM bandwidth; "
                "activations (bf16 autocast, SDPA, no n^2 scores): (22d+4m) B per ViT token per layer + 4d per "
                "adapter, checkpointing keeps 4d per layer + one layer; 18 B per trainable param (fp32 weights, "
                "grads, AdamW m/v, bf16 autocast copies); caption features fp16 x1.25 capacity; neighbour rows int32 "
                "per rank; 1.5 GiB CUDA runtime; captions of T x P x N initial ones distinct_fraction distinct, "
                "+N per round; text padded to max_length + longest other prompt (1 word = 1 token); shards "
                "0.63 MB per 32-frame clip (measured)",
}


# ------------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------------
def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _dur(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable table of :func:`make_plan`'s result."""
    c, m, t = p["config"], p["memory_gb_per_gpu"], p["time_seconds"]
    head = [
        f"plan: {p['num_videos']:,} videos on {p['gpus']} x {p['gpu']}; T={c['num_frames']} S={c['image_size']}, "
        f"batch {c['batch_size']} ({c['per_gpu_batch']}/GPU), {c['epochs']} epochs, {c['rounds']} rounds, "
        f"H={c['num_neighbours']} K={c['k']}, grad_checkpointing={str(c['grad_checkpointing']).lower()}",
        f"models (from configs): {c['blip']} ({p['params']['trainable'] / 1e6:.1f} M trained), {c['clip']} "
        f"({p['params']['frozen_clip'] / 1e6:.1f} M frozen)",
        "",
    ]
    rows = [
        ("flops_per_step", _si(p["flops_per_step"], "FLOP") + f" (ViT {_si(p['flops_breakdown']['vit_forward'] + p['flops_breakdown']['vit_backward'], 'FLOP')})",
         "counted"),
        ("step_seconds", _dur(p["step_seconds"]) + f" at {p['mfu']:.0%} of dense bf16 peak"
         + (" (incl. checkpoint recompute)" if c["grad_checkpointing"] else ""), "modelled"),
        ("clips_per_second_needed", f"{p['clips_per_second_needed']:.0f} per GPU"
         + (f" (loader gives {p['loader_clips_per_second']:g}: input-bound)" if p["input_bound"] else ""), "modelled"),
        ("epoch_seconds", f"{_dur(p['epoch_seconds'])} ({p['steps_per_epoch']:,} steps)", "modelled"),
        ("round 0", f"{_dur(t['round0'])} (initial captions {_dur(t['round0_initial_captions'])}, CLIP "
                    f"{_dur(t['round0_clip_features'])}, top-k {_dur(t['round0_neighbours'])}, re-rank "
                    f"{_dur(t['round0_rerank'])})", "modelled"),
        ("per round", _dur(t["per_round"]) + " (beam search + embed + re-rank)", "modelled"),
        ("run_hours", f"{p['run_hours']:.2f} h (training {_dur(t['training'])})", "modelled"),
        ("round0_rerank_bytes", f"{p['round0_rerank_bytes'] / 1e9:,.1f} GB per rank ({p['round0_candidates_per_video']:,} "
                                f"distinct ids/video; all {p['round0_rerank_bytes_upper'] / 1e9:,.0f} GB undeduplicated)",
         "modelled"),
        ("memory_gb_per_gpu", f"{m['total']:.1f} GiB of {p['gpu_memory_gb']:.0f}", "modelled"),
        ("  params_grads_optimizer", f"{m['params_grads_optimizer']:.2f} GiB", ""),
        ("  activations", f"{m['activations']:.2f} GiB" + (" (checkpointed)" if c["grad_checkpointing"] else ""), ""),
        ("  caption_features", f"{m['caption_features']:.2f} GiB ({p['caption_count_final']:,} captions, fp16)", ""),
        ("  neighbour_graph", f"{m['neighbour_graph']:.2f} GiB (this rank's rows)", ""),
        ("  video feats, CLIP, runtime", f"{m['video_features'] + m['frozen_clip'] + m['runtime']:.2f} GiB", ""),
        ("host_memory_gb_per_rank", f"{p['host_memory_gb_per_rank']:.1f} GiB (rank 0)", "modelled"),
        ("shard_disk_gb", f"{p['shard_disk_gb']:,.0f} GB", "measured/clip"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = head + [f"{a:<{w0}}  {b:<{w1}}  {k}".rstrip() for a, b, k in rows]
    lines.append("")
    lines += [f"advice: {x}" for x in p["advice"]]
    lines.append(f"counted: {MODEL_NOTES['counted']}")
    lines.append(f"modelled: {MODEL_NOTES['modelled']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for `rest-fast train`")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of train config keys")
    p.add_argument("--num-videos", type=int, required=True, help="N, videos in the training set")
    p.add_argument("--gpus", type=int, required=True, help="G, GPUs (DDP ranks)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU model (default h100)")
    p.add_argument("--mfu", type=float, default=0.6, help="fraction of dense bf16 peak reached by training and "
                   "encoders (default 0.6)")
    p.add_argument("--decode-efficiency", type=float, default=0.2, help="fraction of peak reached by beam-search "
                   "decoding (default 0.2)")
    p.add_argument("--distinct-fraction", type=float, default=0.5, help="fraction of the T x P initial captions of a "
                   "video that are distinct (default 0.5; 1.0 = upper bound)")
    p.add_argument("--prepared-frames", type=int, default=32, help="frames per clip in prepared shards (default 32)")
    p.add_argument("--clips-per-second", type=float, metavar="R", help="what the loader delivers per GPU (e.g. from "
                   "bench/): steps and data passes take at least clips/R (default: assume it keeps up)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def config_for_plan(yaml_file: str | None, overrides: list[str]) -> TrainConfig:
    """Defaults → YAML → ``key=value``, as ``rest-fast train`` resolves a run with data (no demo preset: a plan
    is for a real data set of ``--num-videos`` videos)."""
    cfg = TrainConfig()
    if yaml_file is not None:
        cfg = apply_overrides(cfg, load_yaml(yaml_file))
    return apply_overrides(cfg, parse_key_values(list(overrides)))


def run_plan(args: argparse.Namespace) -> int:
    import yaml

    try:
        cfg = config_for_plan(args.config, list(args.overrides or []))
        opts = PlanOptions(num_videos=args.num_videos, gpus=args.gpus, gpu=args.gpu, mfu=args.mfu,
                           decode_efficiency=args.decode_efficiency, distinct_fraction=args.distinct_fraction,
                           prepared_frames=args.prepared_frames, loader_clips_per_second=args.clips_per_second)
        plan = make_plan(cfg, opts)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as exc:
        msg = " ".join(str(exc).split())  # one line, also for YAML errors that span several
        print(f"rest-fast plan: error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


__all__ = ["GPUS", "BlipArch", "ClipArch", "PlanOptions", "blip_arch", "clip_arch", "blip_params", "clip_params",
           "train_step_flops", "decode_flops", "clip_image_flops", "clip_text_flops", "activation_bytes",
           "make_plan", "format_plan", "run_plan", "add_plan_arguments", "config_for_plan"]
