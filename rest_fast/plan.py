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

Memory (modelled, GiB = 2³⁰ bytes): fp32 master weights + fp32 gradients + AdamW's two fp32 states + the bf16/fp16
weight copies autocast keeps during the step (18 B per trainable parameter, 16 B with ``precision=fp32``; DDP buckets
are gradient views); activations of ONE micro-batch (the per-GPU batch over ``accum_steps``) saved for backward under
autocast with SDPA attention (no n² score matrix), per ViT layer per token ``22d + 4m`` bytes (fp32 residual stream
into the two LayerNorms, half-precision inputs of the four projections, q/k/v and the attention output, the GELU
input and output; in fp32 the half-precision share doubles) + ``4d`` for an adapter's fp32 input; with
``grad_checkpointing`` only each layer's fp32 input (``4d`` per token) plus one layer recomputed; the frozen CLIP in
half precision; a fixed allowance for the CUDA context and library workspaces.

The data-sized state is SHARDED by video, as the trainer does it under torchrun (issue 20): each rank holds its own
captions' fp16 features (a table grown by ≤ 1.25×), its videos' neighbour rows (int32), its videos' fp16 features,
the running top-2H packed int64 keys of the streamed ring top-k, and a bounded exchange budget — memory per rank
O(N/G). Host memory per rank: its own caption cache, initial captions and file parts; rank 0 adds only a bounded
streaming-merge buffer. Figures that are peaks of different phases are summed (an upper bound).

Time (modelled): FLOPs at a stated fraction of the GPU's dense peak at the run's precision (``--mfu``; beam-search
decoding at ``--decode-efficiency`` plus a fixed overhead per decoding step); re-ranking and neighbour search as
bytes read at half the HBM bandwidth; the exchanges between ranks (``round_comm_bytes``: the ring top-k's video
features once around the ring in round 0, and the exact re-rank's requests — owner computes, the trainer's scheme,
or a ring of caption-feature shards) at 80 % of the per-direction link figure: NVLink within a node of 8 (H100/H200
450 GB/s, A100 300 GB/s; PCIe for the others), InfiniBand across nodes (NDR 50 GB/s per GPU on H100/H200, HDR 25 GB/s
on A100), all overridable. Data loading is assumed to keep up: ``clips_per_second_needed`` says at what rate.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
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
    """Vendor datasheet figures, dense (no structured sparsity), and the interconnect of the usual server.

    ``fp32_flops`` is the CUDA-core FP32 peak: PyTorch runs fp32 matmuls without TF32 unless asked
    (``torch.backends.cuda.matmul.allow_tf32`` is False by default) and the trainer does not ask; ``tf32_flops`` is
    listed for reference. Link figures are per GPU and per direction.
    """

    name: str
    bf16_flops: float | None  # dense bf16 tensor-core peak, FLOP/s; None: the card has no bf16 tensor cores
    memory_gib: float  # device memory
    hbm_bytes_per_s: float  # memory bandwidth
    fp16_flops: float = 0.0  # dense fp16 tensor-core peak (fp32 accumulate, as autocast's matmuls run)
    fp32_flops: float = 0.0  # CUDA-core fp32 peak
    tf32_flops: float | None = None  # dense tf32 tensor-core peak (not used: the trainer keeps TF32 off)
    intra_node: str = "PCIe 4.0 x16"
    intra_node_gb_per_s: float = 32.0  # GB/s per GPU per direction within a node
    inter_node: str = "one HDR 200 Gb/s InfiniBand NIC per node of 8 GPUs"
    inter_node_gb_per_s: float = 25.0 / 8  # GB/s per GPU per direction across nodes
    gpus_per_node: int = 8


TFLOP = 1e12  # FLOP/s per TFLOP/s
# Sources (dense = half the "with sparsity" figure where a datasheet gives only that):
#  H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet — BF16/FP16 1,979 TFLOPS sparse (989.4 dense), TF32 494.7 dense,
#    FP32 67; 80 GB HBM3 3.35 TB/s; NVLink 900 GB/s (450 per direction); DGX H100: 8 GPUs, one ConnectX-7
#    NDR 400 Gb/s (50 GB/s) per GPU.
#  H200 SXM: NVIDIA H200 datasheet — same tensor peaks as H100 SXM; 141 GB HBM3e 4.8 TB/s; NVLink 900 GB/s.
#  A100 SXM 40/80 GB: NVIDIA A100 datasheet — BF16/FP16 312, TF32 156, FP32 19.5; 1,555 / 2,039 GB/s;
#    NVLink 600 GB/s (300 per direction); DGX A100: one HDR 200 Gb/s (25 GB/s) NIC per GPU.
#  L40S: NVIDIA L40S datasheet — BF16/FP16 733 sparse (362.05 dense), TF32 366 sparse (183 dense), FP32 91.6;
#    48 GB GDDR6 864 GB/s; PCIe 4.0 x16 (64 GB/s both directions).
#  A10: NVIDIA A10 datasheet — BF16/FP16 125 dense (250 sparse), TF32 62.5, FP32 31.2; 24 GB GDDR6 600 GB/s; PCIe 4.0.
#  L4: NVIDIA L4 datasheet — BF16/FP16 242 sparse (121 dense), TF32 120 sparse (60 dense), FP32 30.3;
#    24 GB GDDR6 300 GB/s; PCIe 4.0 x16.
#  T4: NVIDIA T4 datasheet — mixed-precision FP16/FP32 65 TFLOPS (Turing: no bf16, no TF32), FP32 8.1;
#    16 GB GDDR6 320 GB/s; PCIe 3.0 x16 (32 GB/s both directions).
#  RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (Appendix A) — FP16/BF16 tensor with FP32 accumulate
#    165.2 dense (GeForce: half the FP16-accumulate rate), TF32 82.6, FP32 82.6; 24 GB GDDR6X 1,008 GB/s; PCIe 4.0.
#  RTX 3090: NVIDIA Ampere GA102 whitepaper — FP16/BF16 tensor with FP32 accumulate 71 dense, TF32 35.6,
#    FP32 35.6; 24 GB GDDR6X 936 GB/s; PCIe 4.0 (no NVLink assumed; workstations: 4 GPUs per node).
_NVL4 = dict(intra_node="NVLink 4 (900 GB/s both directions)", intra_node_gb_per_s=450.0,
             inter_node="InfiniBand NDR 400 Gb/s per GPU", inter_node_gb_per_s=50.0)
_NVL3 = dict(intra_node="NVLink 3 (600 GB/s both directions)", intra_node_gb_per_s=300.0,
             inter_node="InfiniBand HDR 200 Gb/s per GPU", inter_node_gb_per_s=25.0)
_WORKSTATION = dict(gpus_per_node=4, inter_node="one 100 Gb/s Ethernet NIC per node of 4 GPUs",
                    inter_node_gb_per_s=12.5 / 4)
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM 80GB", 989.4 * TFLOP, 80.0, 3.35e12, 989.4 * TFLOP, 67 * TFLOP, 494.7 * TFLOP, **_NVL4),
    "h200": GPU("H200 SXM 141GB", 989.4 * TFLOP, 141.0, 4.8e12, 989.4 * TFLOP, 67 * TFLOP, 494.7 * TFLOP, **_NVL4),
    "a100": GPU("A100 SXM 80GB", 312 * TFLOP, 80.0, 2.039e12, 312 * TFLOP, 19.5 * TFLOP, 156 * TFLOP, **_NVL3),
    "a100-80": GPU("A100 SXM 80GB", 312 * TFLOP, 80.0, 2.039e12, 312 * TFLOP, 19.5 * TFLOP, 156 * TFLOP, **_NVL3),
    "a100-40": GPU("A100 SXM 40GB", 312 * TFLOP, 40.0, 1.555e12, 312 * TFLOP, 19.5 * TFLOP, 156 * TFLOP, **_NVL3),
    "l40s": GPU("L40S 48GB", 362.05 * TFLOP, 48.0, 0.864e12, 362.05 * TFLOP, 91.6 * TFLOP, 183 * TFLOP),
    "a10": GPU("A10 24GB", 125 * TFLOP, 24.0, 0.6e12, 125 * TFLOP, 31.2 * TFLOP, 62.5 * TFLOP),
    "l4": GPU("L4 24GB", 121 * TFLOP, 24.0, 0.3e12, 121 * TFLOP, 30.3 * TFLOP, 60 * TFLOP),
    "t4": GPU("T4 16GB", None, 16.0, 0.32e12, 65 * TFLOP, 8.1 * TFLOP, None, intra_node="PCIe 3.0 x16",
              intra_node_gb_per_s=16.0),
    "rtx4090": GPU("RTX 4090 24GB", 165.2 * TFLOP, 24.0, 1.008e12, 165.2 * TFLOP, 82.6 * TFLOP, 82.6 * TFLOP, **_WORKSTATION),
    "rtx3090": GPU("RTX 3090 24GB", 71 * TFLOP, 24.0, 0.936e12, 71 * TFLOP, 35.6 * TFLOP, 35.6 * TFLOP, **_WORKSTATION),
}
PRECISIONS = ("bf16", "fp16", "fp32")


_PRECISION_SPELLINGS = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def plan_precision(cfg: TrainConfig) -> str:
    """The run's precision as the trainer reads it: the ``precision`` key, ``amp`` its alias (``amp=false`` is
    fp32; ``amp=false`` with ``precision=fp16`` contradicts itself)."""
    raw = getattr(cfg, "precision", "bf16")
    p = _PRECISION_SPELLINGS.get(str(raw).strip().lower(), str(raw).strip().lower())
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {raw!r}")
    if not cfg.amp and p == "fp16":
        raise ValueError("amp=false contradicts precision=fp16 (amp is precision's alias: false = fp32); give one "
                         "of them")
    return p if cfg.amp else "fp32"


def peak_flops(gpu: GPU, precision: str) -> float:
    """Dense peak FLOP/s of ``gpu`` at ``precision``; bf16 on a card without it is an error naming fp16."""
    if precision == "bf16":
        if gpu.bf16_flops is None:
            raise ValueError(f"precision=bf16: the {gpu.name} has no bf16 tensor cores; use precision=fp16 "
                             f"({gpu.fp16_flops / TFLOP:.0f} TFLOP/s dense, with a gradient scaler) or precision=fp32")
        return gpu.bf16_flops
    return gpu.fp16_flops if precision == "fp16" else gpu.fp32_flops


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
def vit_layer_bytes_per_token(d: int, m: int, adapter: bool, half_bytes: int = 2) -> int:
    """Bytes saved for backward per token per ViT layer under autocast with SDPA attention: ``8d`` of fp32
    residual stream (the two LayerNorm inputs) + ``14d + 4m`` of autocast (``half_bytes`` = 2: bf16/fp16) tensors
    (projection inputs, q/k/v, attention output, GELU input/output) + ``4d`` for an adapter's fp32 input.
    ``half_bytes=4`` is the fp32 run (no autocast): the autocast share doubles."""
    return 8 * d + (14 * d + 4 * m) * half_bytes // 2 + (4 * d if adapter else 0)


def activation_bytes(a: BlipArch, *, clips: int, frames: int, image_size: int, n_adapters: int, tokens: int,
                     scored_per_caption: int, checkpointing: bool, half_bytes: int = 2) -> dict[str, float]:
    """Activation memory of one micro-batch of ``clips`` clips on one GPU, by component (bytes).
    ``half_bytes``: 2 under bf16/fp16 autocast, 4 in fp32 (the text decoder and LM head then count twice)."""
    n = (image_size // a.patch) ** 2 + 1
    nf = clips * frames
    d = a.v_hidden
    scale = half_bytes / 2
    full = vit_layer_bytes_per_token(d, a.v_mlp, True, half_bytes)
    per_layer = [vit_layer_bytes_per_token(d, a.v_mlp, i < n_adapters, half_bytes) for i in range(a.v_layers)]
    if checkpointing:
        vit = nf * n * (4 * d * a.v_layers + full)  # checkpointed layer inputs + one layer recomputed
    else:
        vit = nf * n * sum(per_layer)
    backward_working = nf * n * full  # gradients of one layer's activations in flight
    # input (fp32) + the patch conv's autocast copy (none in fp32); embeddings
    pixels = nf * 3 * image_size * image_size * (4 + (2 if half_bytes == 2 else 0)) + nf * n * d * 4 * 2
    td, tm, heads = a.t_hidden, a.t_mlp, a.t_heads
    text = clips * a.t_layers * (tokens * (42 * td + 4 * tm + 6 * heads * (tokens + n)) + n * 8 * td) * scale
    head = clips * scored_per_caption * (10 * a.vocab + 12 * td) * scale
    return {"vit": vit, "vit_backward_working": backward_working, "inputs_embeddings": pixels, "text_decoder": text,
            "lm_head": head,
            "eager_attention_extra": nf * (a.v_layers if not checkpointing else 1) * 6 * a.v_heads * n * n * scale}


def _sum_activations(act: dict[str, float]) -> float:
    """Bytes of an :func:`activation_bytes` result, SDPA attention (the eager extra left out)."""
    return sum(v for k, v in act.items() if k != "eager_attention_extra")


# ------------------------------------------------------------------------------------------------------------------
# the plan: the resolved shape, then one small function per modelled figure
# ------------------------------------------------------------------------------------------------------------------
RUNTIME_GPU_GIB = 1.5  # CUDA context, cuBLAS/NCCL workspaces, allocator slack (modelled)
RUNTIME_HOST_GIB = 3.0  # Python + torch + CUDA libraries resident per process (modelled)
SHARD_MB_PER_32_FRAMES = 0.6278  # measured: bench/shards.py, 32 frames at short side 256, JPEG q90 (README)
DECODE_STEP_OVERHEAD_S = 2e-3  # per beam-search step of one batch: kernel launches, beam bookkeeping (modelled)
BANDWIDTH_EFFICIENCY = 0.5  # fraction of HBM bandwidth reached by gathers / blocked GEMM reads (modelled)
LINK_EFFICIENCY = 0.8  # fraction of a link's per-direction figure that large point-to-point transfers reach (modelled)
CAPTION_TABLE_GROWTH = 1.25  # the caption-feature table grows by at most this factor ahead of its rows (modelled)
RANK0_MERGE_GIB = 0.25  # rank 0's only extra: the streaming merge buffer of the per-rank round files (modelled)
USABLE_FRACTION = 0.9  # of the device memory a plan may fill (allocator fragmentation, other processes)
RERANK_SCHEMES = ("ring", "owner")
# memory figures that grow with the videos a rank owns (N/G); what accumulation or checkpointing cannot shrink
DATA_SCALED = ("caption_features", "neighbour_graph", "neighbour_search_state", "video_features")


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
    rerank_scheme: str = "owner"  # exact cross-shard re-rank: "owner" (queries travel; the trainer's) or "ring"
    exchange_budget_gb: float = 2.0  # GiB: the bounded device buffers of the exchanges (top-k ring, re-rank chunks)
    gpus_per_node: int | None = None  # None: the GPU's usual server (GPU.gpus_per_node)
    intra_node_gb_per_s: float | None = None  # None: the GPU's (NVLink or PCIe), per GPU per direction
    inter_node_gb_per_s: float | None = None  # None: the GPU's usual network, per GPU per direction


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


def check_options(opts: PlanOptions) -> None:
    """Every numeric option finite and in range (NaN and inf included): a ``ValueError`` naming the flag."""
    floats = {"--mfu": opts.mfu, "--decode-efficiency": opts.decode_efficiency,
              "--distinct-fraction": opts.distinct_fraction, "--clips-per-second": opts.loader_clips_per_second,
              "--exchange-budget-gb": opts.exchange_budget_gb, "--intra-node-gb-per-s": opts.intra_node_gb_per_s,
              "--inter-node-gb-per-s": opts.inter_node_gb_per_s}
    for flag, v in floats.items():
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{flag} must be a finite number, got {v}")
    if opts.gpu not in GPUS:
        raise ValueError(f"--gpu must be one of {', '.join(GPUS)}, got {opts.gpu!r}")
    for flag in ("--clips-per-second", "--exchange-budget-gb", "--intra-node-gb-per-s", "--inter-node-gb-per-s"):
        if floats[flag] is not None and floats[flag] <= 0:
            raise ValueError(f"{flag} must be > 0, got {floats[flag]}")
    if opts.num_videos < 2:
        raise ValueError(f"--num-videos must be >= 2, got {opts.num_videos}")
    if opts.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {opts.gpus}")
    if opts.gpus_per_node is not None and opts.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be >= 1, got {opts.gpus_per_node}")
    if opts.prepared_frames < 1:
        raise ValueError(f"--prepared-frames must be >= 1, got {opts.prepared_frames}")
    if not 0 < opts.mfu <= 1 or not 0 < opts.decode_efficiency <= 1:
        raise ValueError("--mfu and --decode-efficiency must be in (0, 1]")
    if not 0 < opts.distinct_fraction <= 1:
        raise ValueError(f"--distinct-fraction must be in (0, 1], got {opts.distinct_fraction}")
    if opts.rerank_scheme not in RERANK_SCHEMES:
        raise ValueError(f"--rerank-scheme must be one of {', '.join(RERANK_SCHEMES)}, got {opts.rerank_scheme!r}")


@dataclass(frozen=True)
class PlanShape:
    """What every figure is computed from: the config, the options, the hardware and the sizes derived from them."""

    cfg: TrainConfig
    opts: PlanOptions
    gpu: GPU
    blip: BlipArch
    clip: ClipArch
    precision: str
    peak: float  # dense FLOP/s at the run's precision
    N: int  # videos
    G: int  # ranks (GPUs)
    T: int  # frames per clip
    P: int  # prompts
    H: int  # neighbours (capped at N - 1)
    K: int  # pseudo-captions per video
    S: int  # frame size
    D: int  # CLIP embedding width
    n_adapt: int
    tokens: int  # padded training caption tokens
    scored: int  # scored tokens per caption
    prompt_tokens: int
    image_tokens: int
    per_rank: int  # clips per GPU per optimiser step
    accum: int  # micro-batches per optimiser step
    videos_per_rank: int  # the largest shard: ceil(N / G)
    gpus_per_node: int
    intra_bytes_per_s: float
    inter_bytes_per_s: float

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.G

    @property
    def micro_batch(self) -> int:
        return self.per_rank // self.accum

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.videos_per_rank // self.per_rank)

    @property
    def nodes(self) -> int:
        return -(-self.G // self.gpus_per_node)

    @property
    def half_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


def resolve_shape(cfg: TrainConfig, opts: PlanOptions) -> PlanShape:
    """Check the options and config, build the architectures, and derive the sizes every figure shares."""
    check_options(opts)
    gpu = GPUS[opts.gpu]
    precision = plan_precision(cfg)
    peak = peak_flops(gpu, precision)
    N, G = opts.num_videos, opts.gpus
    per_rank = max(1, cfg.batch_size // G)  # as the trainer splits it (inputs.per_rank_batch)
    accum = int(getattr(cfg, "accum_steps", 1))
    if accum < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum}")
    if per_rank % accum:  # as the trainer (train/accumulate.py): equal micro-batches
        raise ValueError(f"batch_size gives {per_rank} clips per GPU over {G} GPUs, which accum_steps={accum} does "
                         "not divide: pick accum_steps dividing it (the micro-batches must be equal)")
    a = blip_arch(cfg.blip, cfg.image_size)
    c = clip_arch(cfg.clip, cfg.image_size)
    if cfg.image_size % a.patch:
        raise ValueError(f"image_size={cfg.image_size} is not a multiple of the ViT patch size {a.patch}")
    tokens, scored, prompt_tokens = caption_lengths(cfg)
    gpn = opts.gpus_per_node or gpu.gpus_per_node
    intra = opts.intra_node_gb_per_s or gpu.intra_node_gb_per_s
    inter = opts.inter_node_gb_per_s or gpu.inter_node_gb_per_s
    return PlanShape(
        cfg=cfg, opts=opts, gpu=gpu, blip=a, clip=c, precision=precision, peak=peak, N=N, G=G, T=cfg.num_frames,
        P=len(cfg.prompts), H=min(cfg.num_neighbours, N - 1), K=cfg.k, S=cfg.image_size, D=c.embed_dim,
        n_adapt=_n_adapters(cfg, a.v_layers), tokens=tokens, scored=scored, prompt_tokens=prompt_tokens,
        image_tokens=(cfg.image_size // a.patch) ** 2 + 1, per_rank=per_rank, accum=accum,
        videos_per_rank=-(-N // G), gpus_per_node=gpn, intra_bytes_per_s=intra * 1e9, inter_bytes_per_s=inter * 1e9)


# --- training -------------------------------------------------------------------------------------------------------
def training_flops(s: PlanShape) -> dict[str, int]:
    """Counted FLOPs of one global optimiser step (all its micro-batches; accumulation does not change them)."""
    return train_step_flops(s.blip, clips=s.global_batch, frames=s.T, image_size=s.S, n_adapters=s.n_adapt,
                            tokens=s.tokens, scored_per_caption=s.scored)


def hardware_flops(s: PlanShape, fl: dict[str, int]) -> int:
    """FLOPs the GPUs execute per step: the counted ones + the ViT forward again under activation checkpointing."""
    return fl["total"] + (fl["vit_layers_forward"] if s.cfg.grad_checkpointing else 0)


def training_time(s: PlanShape, hw_flops: int) -> dict[str, float]:
    """Seconds of one step (compute-bound, and as the loader bounds it), of an epoch and of all epochs."""
    compute_step_s = hw_flops / (s.G * s.peak * s.opts.mfu)
    cps = s.opts.loader_clips_per_second
    step_s = max(compute_step_s, s.per_rank / cps) if cps else compute_step_s
    epoch_s = s.steps_per_epoch * step_s
    return {"compute_step": compute_step_s, "step": step_s, "epoch": epoch_s, "training": s.cfg.epochs * epoch_s}


# --- captions -------------------------------------------------------------------------------------------------------
def caption_counts(s: PlanShape) -> dict[str, int]:
    """Initial captions (T×P per video), the distinct ones, captions at the end (+N per round), and per rank."""
    initial = s.N * s.T * s.P
    distinct_per_video = max(1, round(s.T * s.P * s.opts.distinct_fraction))
    distinct = max(1, round(initial * s.opts.distinct_fraction))
    final = distinct + s.cfg.num_rounds * s.N
    return {"initial": initial, "distinct_initial": distinct, "distinct_per_video": distinct_per_video,
            "final": final, "final_per_rank": s.videos_per_rank * (distinct_per_video + s.cfg.num_rounds)}


def rerank_reads(s: PlanShape, counts: dict[str, int]) -> dict[str, int]:
    """Bytes of caption features one rank gathers to re-rank its videos: round 0 (each video's and its H
    neighbours' distinct initial captions; the undeduplicated upper bound) and a later round (the K slot and one
    pending caption of the video and of each neighbour)."""
    row = s.D * 2  # fp16 feature row
    upper = (s.H + 1) * s.T * s.P
    per_video = min(upper, (s.H + 1) * counts["distinct_per_video"])
    return {"round0": s.videos_per_rank * per_video * row, "round0_upper": s.videos_per_rank * upper * row,
            "round0_per_video": per_video, "per_round": s.videos_per_rank * (s.H + 1) * (s.K + 1) * row}


# --- interconnect ---------------------------------------------------------------------------------------------------
def round_comm_bytes(s: PlanShape, counts: dict[str, int], reads: dict[str, int]) -> dict[str, int]:
    """Bytes ONE rank sends per round in the sharded design (it receives as much).

    * ``round0_neighbour_ring``: the streamed ring top-k (``rest_fast.retrieval.distributed``, strategy ``ring``):
      every rank's fp16 video features pass once around the ring, each rank keeping a running top-H of its own
      videos: ``(G-1)·N/G·D·2``.
    * re-rank, ``owner`` scheme (``rest_fast.retrieval.sharded_rerank``: caption ``c`` lives on rank ``c mod G``,
      which scores it): for each video, its fp16 feature + an 8-byte position go to every other rank owning one of
      its ``L`` distinct candidates (``(G-1)(1-(1-1/G)^L)`` of them with ids spread over the ranks), with those
      candidates' int32 local rows (``4L(G-1)/G`` in all), and each owner answers ``K`` packed int64 keys; a rank
      answers as many requests as it sends: per rank ``N/G·(owners·(2D + 8 + 8K) + 4L(G-1)/G)``. ``L`` is the
      round-0 distinct initial candidates, then ``(H+1)(K+1)`` slot and pending ones.
    * re-rank, ``ring`` scheme (the alternative): caption-feature shards travel around the ring; round 0 carries each
      rank's distinct initial captions (``(G-1)·N/G·d0·D·2``), a later round the K slot + 1 pending features per
      video (each rank keeps copies of its videos' slot features): ``(G-1)·N/G·(K+1)·D·2``.
    """
    if s.G == 1:
        return {"round0_neighbour_ring": 0, "round0_rerank": 0, "round0": 0, "per_round": 0}
    vpr, row, G = s.videos_per_rank, s.D * 2, s.G
    ring = (G - 1) * vpr * row
    if s.opts.rerank_scheme == "ring":
        rerank0 = ring * counts["distinct_per_video"]
        rerank = ring * (s.K + 1)
    else:
        def owner(L: int) -> int:
            owners = (G - 1) * (1 - (1 - 1 / G) ** L)
            return round(vpr * (owners * (row + 8 + 8 * s.K) + 4 * L * (G - 1) / G))

        rerank0, rerank = owner(reads["round0_per_video"]), owner((s.H + 1) * (s.K + 1))
    return {"round0_neighbour_ring": ring, "round0_rerank": rerank0, "round0": ring + rerank0, "per_round": rerank}


def comm_seconds(s: PlanShape, nbytes: float, pattern: str) -> float:
    """Seconds to send ``nbytes`` per rank: a ring moves in lock-step at its slowest link (the inter-node one
    once there are two nodes); an all-to-all sends ``(gpus_per_node-1)/(G-1)`` of it within the node and the rest
    across nodes, one after the other (no overlap assumed)."""
    if s.G == 1 or nbytes == 0:
        return 0.0
    intra, inter = s.intra_bytes_per_s * LINK_EFFICIENCY, s.inter_bytes_per_s * LINK_EFFICIENCY
    if pattern == "ring":
        return nbytes / (inter if s.nodes > 1 else intra)
    local = (min(s.gpus_per_node, s.G) - 1) / (s.G - 1)
    return nbytes * local / intra + nbytes * (1 - local) / inter


def comm_time(s: PlanShape, comm: dict[str, int]) -> dict[str, float]:
    pattern = "ring" if s.opts.rerank_scheme == "ring" else "all_to_all"
    return {"round0": comm_seconds(s, comm["round0_neighbour_ring"], "ring")
            + comm_seconds(s, comm["round0_rerank"], pattern),
            "per_round": comm_seconds(s, comm["per_round"], pattern)}


# --- caption rounds -------------------------------------------------------------------------------------------------
def _vit_clip_frame_flops(s: PlanShape) -> int:
    vf = vit_frame_flops(s.blip.v_hidden, s.blip.v_mlp, s.blip.v_layers, s.blip.patch, s.S, s.n_adapt)
    return vf["patch_embed"] + vf["layers"] + vf["adapters"]


def _eval_batches_per_rank(s: PlanShape) -> int:
    return -(-s.videos_per_rank // s.cfg.eval_batch_size)


def _decode_steps(s: PlanShape) -> int:
    return max(1, s.cfg.max_length - s.prompt_tokens)


def round0_time(s: PlanShape, counts: dict[str, int], reads: dict[str, int], comm_s: float) -> dict[str, float]:
    """Round 0: T×P initial captions per video (each frame its own 1-frame clip), CLIP video features, the
    streamed neighbour search, text features of the distinct initial captions, the re-rank, and its exchanges."""
    rate, dec_rate = s.peak * s.opts.mfu, s.peak * s.opts.decode_efficiency
    bw = s.gpu.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY
    cfg, N, G, T = s.cfg, s.N, s.G, s.T
    init_dec = sum(decode_flops(s.blip, prompt_tokens=1 + len(p.split()), beams=cfg.num_beams,
                                max_length=cfg.max_length, image_tokens=s.image_tokens) for p in cfg.prompts)
    init_s = (N * T * _vit_clip_frame_flops(s) / rate + N * T * init_dec / dec_rate
              + _eval_batches_per_rank(s) * s.P * _decode_steps(s) * DECODE_STEP_OVERHEAD_S * G) / G
    clip_video_s = N * T * clip_image_flops(s.clip) / rate / G
    cps = s.opts.loader_clips_per_second
    if cps:  # each pass over the videos reads every clip once
        init_s, clip_video_s = max(init_s, s.videos_per_rank / cps), max(clip_video_s, s.videos_per_rank / cps)
    # GEMM of the rank's queries against all keys + reading the keys once per block of 1024 queries
    topk_s = (2 * N * N * s.D / rate + (s.videos_per_rank / 1024) * N * s.D * 2 / bw * G) / G
    text0_s = counts["distinct_initial"] * clip_text_flops(s.clip) / rate / G
    rerank_s = reads["round0"] / bw
    return {"initial_captions": init_s, "clip_features": clip_video_s, "neighbours": topk_s, "text_features": text0_s,
            "rerank": rerank_s, "comm": comm_s,
            "total": init_s + clip_video_s + topk_s + text0_s + rerank_s + comm_s}


def round_time(s: PlanShape, reads: dict[str, int], comm_s: float) -> dict[str, float]:
    """A later round: one beam-search caption per video (T-frame clip through the adapted ViT), its text feature,
    the re-rank and its exchange."""
    rate, dec_rate = s.peak * s.opts.mfu, s.peak * s.opts.decode_efficiency
    bw = s.gpu.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY
    cfg = s.cfg
    gen_dec = decode_flops(s.blip, prompt_tokens=s.prompt_tokens, beams=cfg.num_beams, max_length=cfg.max_length,
                           image_tokens=s.image_tokens)
    gen_s = ((s.N * s.T * _vit_clip_frame_flops(s) / rate + s.N * gen_dec / dec_rate) / s.G
             + _eval_batches_per_rank(s) * _decode_steps(s) * DECODE_STEP_OVERHEAD_S)
    cps = s.opts.loader_clips_per_second
    if cps:
        gen_s = max(gen_s, s.videos_per_rank / cps)
    embed_s = s.N * clip_text_flops(s.clip) / rate / s.G
    rerank_s = reads["per_round"] / bw
    return {"generate": gen_s, "embed": embed_s, "rerank": rerank_s, "comm": comm_s,
            "total": gen_s + embed_s + rerank_s + comm_s}


# --- device memory --------------------------------------------------------------------------------------------------
def micro_batch_activations(s: PlanShape, clips: int, checkpointing: bool) -> dict[str, float]:
    """Activation bytes of one micro-batch of ``clips`` clips (accumulation keeps one micro-batch's at a time)."""
    return activation_bytes(s.blip, clips=clips, frames=s.T, image_size=s.S, n_adapters=s.n_adapt, tokens=s.tokens,
                            scored_per_caption=s.scored, checkpointing=checkpointing, half_bytes=s.half_bytes)


def optimizer_state_bytes(s: PlanShape) -> int:
    """fp32 weights, gradients and AdamW's m and v (16 B per trained parameter), + the half-precision weight copies
    autocast keeps during a bf16/fp16 step (2 B)."""
    per_param = 16 + (2 if s.half_bytes == 2 else 0)
    return (blip_params(s.blip) + adapter_params(s.blip, s.n_adapt)) * per_param


def exchange_buffer_bytes(s: PlanShape) -> float:
    """The exchanges' bounded device buffers (``--exchange-budget-gb``): the ring top-k's chunk in hand and the
    one arriving, the re-rank's chunk of requests sent, received and merged; one GPU exchanges nothing."""
    return 0.0 if s.G == 1 else s.opts.exchange_budget_gb * GIB


def gpu_memory(s: PlanShape, counts: dict[str, int], act: dict[str, float]) -> dict[str, float]:
    """GiB per GPU, by figure (``total`` their sum: every phase's peak at once, an upper bound). Sharded: each rank
    holds only its own captions' features (fp16, table grown by ≤ 1.25×; the ring scheme adds copies of its
    videos' K slot features), its neighbour rows, its video features, and — while the ring top-k runs — the
    running top-2H packed int64 keys of its videos; what travels between ranks stays inside the exchange
    buffers."""
    vpr, row = s.videos_per_rank, s.D * 2
    mem = {
        "params_grads_optimizer": optimizer_state_bytes(s) / GIB,
        "activations": _sum_activations(act) / GIB,
        "caption_features": (CAPTION_TABLE_GROWTH * counts["final_per_rank"]
                             + (vpr * s.K if s.opts.rerank_scheme == "ring" else 0)) * row / GIB,
        "neighbour_graph": vpr * s.H * 4 / GIB,
        "video_features": vpr * row / GIB,
        "frozen_clip": clip_params(s.clip) * s.half_bytes / GIB,
        "runtime": RUNTIME_GPU_GIB,
        "neighbour_search_state": (vpr * 2 * s.H * 8 if s.G > 1 else 0) / GIB,  # ring top-k: 2H int64 keys
        "exchange_buffers": exchange_buffer_bytes(s) / GIB,
    }
    mem["total"] = sum(mem.values())
    return mem


# --- host memory ----------------------------------------------------------------------------------------------------
def host_memory(s: PlanShape, counts: dict[str, int]) -> dict[str, float]:
    """GiB of host memory per rank, by figure. Sharded (``rest_fast.cache.sharded``): each rank holds its share of
    the caption strings (by id and by hash) and its videos' slot scores; the slot ids of every video (16 B a video
    at K = 3) are replicated, since the re-rank reads the neighbours' slots of nearly every video; each rank writes
    its own part of the graph, feature table and round file; rank 0 adds only a bounded streaming-merge buffer
    (``rank0_merge``)."""
    cfg, vpr = s.cfg, s.videos_per_rank
    clip_bytes = max(s.micro_batch, cfg.eval_batch_size) * s.T * 3 * s.S * s.S * 4
    own_writes = (vpr * s.H * 4 + counts["final_per_rank"] * s.D * 2 + vpr * 1024) / GIB  # graph, features, jsonl
    merge = RANK0_MERGE_GIB if s.G > 1 else 0.0  # one process has no parts to merge
    return {
        "runtime": RUNTIME_HOST_GIB,
        "loader_buffers": (max(cfg.num_workers, 1) * 2 + 2) * clip_bytes / GIB,  # 2 batches per worker + pinned
        # ShardedCaptionCache: each caption's text on its id owner (~40 B + ~56 B index) and, with its 8-B id, on
        # its hash owner (the text -> id dictionary); the slot scores (fp32) of the rank's own videos
        "caption_cache": (counts["final_per_rank"] * (96 + (104 if s.G > 1 else 0)) + vpr * s.K * 4) / GIB,
        # replicated: K slot ids + the pending id of every video (int32), read by the re-rank and the sampler
        "slot_ids": s.N * (s.K + 1) * 4 / GIB,
        "round0_initial_captions": vpr * s.T * s.P * 100 / GIB,  # this rank's initial captions as strings
        # round 0 only: every video's distinct initial ids (int32, shared, and the re-rank's copy) + the interning
        # bitmap over the N·T·P positions and its word counts
        "round0_shared_ids": (s.N * counts["distinct_per_video"] * 4 * 2 + 3 * s.N * s.T * s.P / 8) / GIB,
        "rank_writes": own_writes,
        "rank0_merge": merge,
        "rank0_writes": own_writes + merge,  # what rank 0 holds while writing: its part + the merge buffer
        "weights_at_load": (blip_params(s.blip) + adapter_params(s.blip, s.n_adapt) + clip_params(s.clip)) * 4 / GIB,
    }


def host_total(host: dict[str, float], rank0: bool) -> float:
    """Peak host GiB of one rank: resident parts + the larger of weight loading and round-0 writing."""
    writes = host["rank0_writes"] if rank0 else host["rank_writes"]
    return (host["runtime"] + host["loader_buffers"] + host["caption_cache"] + host["slot_ids"]
            + max(host["weights_at_load"], host["round0_initial_captions"] + host["round0_shared_ids"] + writes))


# --- checkpoints ----------------------------------------------------------------------------------------------------
def checkpoint_gb(s: PlanShape) -> float:
    """GB of one checkpoint (``checkpoints/epoch_XXXX/``): the trained weights in fp32 (``model.safetensors``) and
    AdamW's two fp32 states (``train_state.pt``); the scheduler, RNG and step counters are negligible."""
    return (blip_params(s.blip) + adapter_params(s.blip, s.n_adapt)) * (4 + 8) / 1e9


# --- advice ---------------------------------------------------------------------------------------------------------
def _fit_accumulation(s: PlanShape, rest_gib: float, usable: float, checkpointing: bool) -> tuple[int, float] | None:
    """The fewest micro-batches per step (a divisor of the per-GPU batch, as the trainer needs) whose activations
    fit beside ``rest_gib``: (accum_steps, total GiB), or None."""
    for accum in (a for a in range(1, s.per_rank + 1) if s.per_rank % a == 0):
        micro = s.per_rank // accum
        total = rest_gib + _sum_activations(micro_batch_activations(s, micro, checkpointing)) / GIB
        if total <= usable:
            return accum, total
    return None


def _overflow_advice(s: PlanShape, mem: dict[str, float], usable: float, smallest_act: float) -> str:
    """Even one checkpointed clip at a time does not fit: accumulation and checkpointing only shrink activations,
    so name what overflows — the figures that grow with N/G (and how many GPUs would hold them) or the fixed part."""
    cap = f"90% of {s.gpu.memory_gib:.0f} GiB"
    rest = mem["total"] - mem["activations"]
    data_total = sum(mem[k] for k in DATA_SCALED)
    parts = {k: v for k, v in mem.items() if k not in ("total", "activations")}
    named = ", ".join(f"{k} {v:,.1f} GiB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])
                      if v >= 0.05 * rest)
    if data_total >= 0.5 * rest:
        # on G' > 1 GPUs each holds N/G' videos' worth of the data-sized figures (the ring top-k keys included)
        # beside the fixed part and the exchange budget
        per_video = ((CAPTION_TABLE_GROWTH * (caption_counts(s)["distinct_per_video"] + s.cfg.num_rounds)
                      + (s.K if s.opts.rerank_scheme == "ring" else 0) + 1) * s.D * 2 + s.H * 4 + 2 * s.H * 8) / GIB
        fixed = (mem["params_grads_optimizer"] + mem["frozen_clip"] + mem["runtime"] + smallest_act
                 + s.opts.exchange_budget_gb)
        room = usable - fixed
        videos_fit = int(room // per_video) if room > 0 else 0  # videos per GPU that fit
        more = (f"about {max(2, -(-s.N // videos_fit)):,} GPUs would hold it (these figures shrink as N/G), "
                f"or lower num_neighbours / the initial captions (prompts x num_frames)" if videos_fit else
                f"the parts that do not shrink with more GPUs alone exceed {cap}")
        what = f"what grows with the videos per GPU ({s.videos_per_rank:,}) overflows"
    else:
        more, what = "a GPU with more memory", "the model's fixed part overflows"
    return f"does not fit in {cap}: {what} — {named}; gradient accumulation or checkpointing cannot help: {more}"


def _activation_advice(s: PlanShape, mem: dict[str, float], usable: float) -> list[str]:
    """The activations overflow: the fewest ``accum_steps`` that fit, and the ``grad_checkpointing`` variant."""
    cfg, cap = s.cfg, f"90% of {s.gpu.memory_gib:.0f} GiB"
    rest = mem["total"] - mem["activations"]
    advice = []
    found = _fit_accumulation(s, rest, usable, cfg.grad_checkpointing)
    if found:  # the smallest that fits; the current accum_steps does not, so it is larger
        accum, total = found
        advice.append(f"activations overflow ({mem['activations']:.1f} GiB for micro-batches of {s.micro_batch} "
                      f"clips): accumulate gradients with accum_steps={accum} (micro-batches of "
                      f"{s.per_rank // accum} clips; batch_size={cfg.batch_size} and each optimiser step "
                      f"unchanged): {total:.1f} GiB")
    if not cfg.grad_checkpointing:
        ck = _fit_accumulation(s, rest, usable, True)
        if ck and ck[0] <= s.accum:
            ck_now = rest + _sum_activations(micro_batch_activations(s, s.micro_batch, True)) / GIB
            advice.append(f"or grad_checkpointing=true: {ck_now:.1f} GiB (+1/3 ViT compute)")
        elif ck:
            advice.append(f"or grad_checkpointing=true with accum_steps={ck[0]} (micro-batches of "
                          f"{s.per_rank // ck[0]}): {ck[1]:.1f} GiB (+1/3 ViT compute)")
    if not advice:
        advice.append(f"does not fit in {cap} even one clip at a time (accum_steps={s.per_rank})")
    return advice


def plan_advice(s: PlanShape, mem: dict[str, float], act: dict[str, float]) -> list[str]:
    """What to change when it does not fit, naming what overflows: the data-scaled figures (more GPUs; nothing
    per micro-batch helps) or the activations (concrete ``accum_steps`` / ``grad_checkpointing``)."""
    cfg = s.cfg
    usable = USABLE_FRACTION * s.gpu.memory_gib
    advice = []
    if cfg.batch_size < s.G:
        advice.append(f"batch_size={cfg.batch_size} is smaller than {s.G} GPUs: the trainer runs 1 clip per GPU, "
                      f"a global batch of {s.global_batch} (not the recipe's {cfg.batch_size}); set "
                      f"batch_size={s.global_batch} to say so")
    smallest_act = _sum_activations(micro_batch_activations(s, 1, True)) / GIB
    if mem["total"] <= usable:
        advice.append(f"fits in 90% of {s.gpu.memory_gib:.0f} GiB without changes")
    elif mem["total"] - mem["activations"] + smallest_act > usable:
        advice.append(_overflow_advice(s, mem, usable, smallest_act))
    else:
        advice += _activation_advice(s, mem, usable)
    eager = act["eager_attention_extra"] / GIB
    advice.append(f"with eager ViT attention instead of SDPA (n x n scores kept for backward) activations grow by "
                  f"{eager:.1f} GiB: {mem['total'] + eager:.1f} GiB in all")
    return advice


# --- assembly -------------------------------------------------------------------------------------------------------
def make_plan(cfg: TrainConfig, opts: PlanOptions) -> dict[str, Any]:
    """Every figure of the plan as a JSON-able dict (see the module docstring for what is counted/modelled)."""
    s = resolve_shape(cfg, opts)
    fl = training_flops(s)
    hw_flops = hardware_flops(s, fl)
    tt = training_time(s, hw_flops)
    counts = caption_counts(s)
    reads = rerank_reads(s, counts)
    comm = round_comm_bytes(s, counts, reads)
    comm_s = comm_time(s, comm)
    r0 = round0_time(s, counts, reads, comm_s["round0"])
    rr = round_time(s, reads, comm_s["per_round"])
    rounds = cfg.num_rounds
    act = micro_batch_activations(s, s.micro_batch, cfg.grad_checkpointing)
    mem = gpu_memory(s, counts, act)
    host = host_memory(s, counts)
    return {
        "config": {"blip": cfg.blip, "clip": cfg.clip, "num_frames": s.T, "image_size": s.S,
                   "batch_size": cfg.batch_size, "per_gpu_batch": s.per_rank, "num_neighbours": s.H, "k": s.K,
                   "prompts": s.P, "epochs": cfg.epochs, "rounds": rounds, "grad_checkpointing": cfg.grad_checkpointing,
                   "adapters": s.n_adapt, "num_beams": cfg.num_beams, "max_length": cfg.max_length,
                   "accum_steps": s.accum, "micro_batch": s.micro_batch, "precision": s.precision,
                   "keep_checkpoints": cfg.keep_checkpoints},
        "num_videos": s.N, "gpus": s.G, "gpu": s.gpu.name,
        "precision": s.precision, "peak_flops": s.peak,
        "loader_clips_per_second": opts.loader_clips_per_second,
        "mfu": opts.mfu, "decode_efficiency": opts.decode_efficiency, "distinct_fraction": opts.distinct_fraction,
        "params": {"trainable": blip_params(s.blip) + adapter_params(s.blip, s.n_adapt),
                   "frozen_clip": clip_params(s.clip)},
        "flops_per_step": fl["total"],
        "hardware_flops_per_step": hw_flops,
        "flops_breakdown": {k: v for k, v in fl.items() if k not in ("total", "vit_layers_forward")},
        "steps_per_epoch": s.steps_per_epoch,
        "step_seconds": tt["step"],
        "clips_per_second_needed": s.per_rank / tt["compute_step"],
        "input_bound": bool(opts.loader_clips_per_second) and tt["step"] > tt["compute_step"],
        "epoch_seconds": tt["epoch"],
        "run_hours": (tt["training"] + r0["total"] + rounds * rr["total"]) / 3600,
        "time_seconds": {"training": tt["training"], "round0": r0["total"],
                         "round0_initial_captions": r0["initial_captions"], "round0_clip_features": r0["clip_features"],
                         "round0_neighbours": r0["neighbours"], "round0_text_features": r0["text_features"],
                         "round0_rerank": r0["rerank"], "round0_comm": r0["comm"], "per_round": rr["total"],
                         "per_round_comm": rr["comm"], "rounds": rounds},
        "round0_rerank_bytes": reads["round0"],
        "round0_rerank_bytes_upper": reads["round0_upper"],
        "round0_candidates_per_video": reads["round0_per_video"],
        "round_rerank_bytes": reads["per_round"],
        "round_comm_bytes": comm["per_round"],
        "round0_comm_bytes": comm["round0"],
        "comm_detail_bytes": comm,
        "interconnect": {"rerank_scheme": opts.rerank_scheme, "gpus_per_node": s.gpus_per_node, "nodes": s.nodes,
                         "intra_node": s.gpu.intra_node if opts.intra_node_gb_per_s is None else "given",
                         "intra_node_gb_per_s": s.intra_bytes_per_s / 1e9,
                         "inter_node": s.gpu.inter_node if opts.inter_node_gb_per_s is None else "given",
                         "inter_node_gb_per_s": s.inter_bytes_per_s / 1e9, "link_efficiency": LINK_EFFICIENCY,
                         "exchange_budget_gb": opts.exchange_budget_gb},
        "caption_count_final": counts["final"],
        "caption_count_per_rank": counts["final_per_rank"],
        "memory_gb_per_gpu": mem,
        "activation_detail_gb": {k: v / GIB for k, v in act.items()},
        "gpu_memory_gb": s.gpu.memory_gib,
        "host_memory_gb_per_rank": host_total(host, rank0=True),
        "host_memory_gb_other_ranks": host_total(host, rank0=False),
        "host_memory_detail_gb": host,
        "checkpoint_gb": checkpoint_gb(s),
        "checkpoint_disk_gb": checkpoint_gb(s) * (cfg.keep_checkpoints + 1),  # the kept ones + one being written
        "shard_disk_gb": s.N * SHARD_MB_PER_32_FRAMES * opts.prepared_frames / 32 * 1e6 / 1e9,
        "advice": plan_advice(s, mem, act),
        "model": MODEL_NOTES,
    }


MODEL_NOTES = {
    "counted": "flops_per_step: matmul/conv/attention FLOPs of one global step (fwd + 2x bwd; patch embedding bwd "
               "1x), per ViT layer 2n(4d^2+2dm)+4n^2d per frame, per decoder layer 2L(6d^2+2dm)+4ed*n+4L^2d+4Lnd, "
               "LM head 2s(d^2+dV) on scored tokens, adapters 54*d per patch (depth-wise 3x3x3); params from configs",
    "modelled": "time at mfu x the GPU's dense peak at the run's precision (+1/3 ViT recompute with "
                "grad_checkpointing), decoding at decode_efficiency + 2 ms per beam step per batch, re-rank/top-k "
                "reads at 50% HBM bandwidth; activations of one micro-batch (batch per GPU / accum_steps; autocast, "
                "SDPA, no n^2 scores): (22d+4m) B per ViT token per layer + 4d per adapter (fp32: the autocast "
                "share doubles), checkpointing keeps 4d per layer + one layer; 18 B per trainable param (fp32 "
                "weights, grads, AdamW m/v, autocast copies; 16 B in fp32); SHARDED by video: each rank holds its "
                "N/G videos' caption features (fp16 x1.25 capacity; ring scheme + K slot copies per video), "
                "neighbour rows (int32), video features, running top-2H int64 keys while the ring top-k runs, and "
                "the exchange budget; 1.5 GiB CUDA runtime; comm: ring top-k (video features once around the ring), "
                "re-rank by owner (queries travel to the candidates' owners; default) or ring (caption features "
                "travel), at 80% of the per-direction "
                "link figure (ring: the slowest link; all-to-all: intra- then inter-node, no overlap); host: per "
                "rank its share of the caption strings (by id and by hash) and its writes, every video's slot ids "
                "(16 B, replicated), in round 0 every video's distinct initial ids (int32), rank 0 + a 0.25 GiB "
                "merge buffer; captions of T x P x N initial "
                "ones distinct_fraction distinct, +N per round; text padded to max_length + longest other prompt "
                "(1 word = 1 token); shards 0.63 MB per 32-frame clip (measured)",
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
    c, m, t, ic = p["config"], p["memory_gb_per_gpu"], p["time_seconds"], p["interconnect"]
    head = [
        f"plan: {p['num_videos']:,} videos on {p['gpus']} x {p['gpu']}; T={c['num_frames']} S={c['image_size']}, "
        f"batch {c['batch_size']} ({c['per_gpu_batch']}/GPU), {c['epochs']} epochs, {c['rounds']} rounds, "
        f"H={c['num_neighbours']} K={c['k']}, grad_checkpointing={str(c['grad_checkpointing']).lower()}, "
        f"accum_steps={c['accum_steps']} (micro-batches of {c['micro_batch']}), {p['precision']} "
        f"({p['peak_flops'] / 1e12:,.1f} TFLOP/s dense peak)",
        f"models (from configs): {c['blip']} ({p['params']['trainable'] / 1e6:.1f} M trained), {c['clip']} "
        f"({p['params']['frozen_clip'] / 1e6:.1f} M frozen)",
        "",
    ]
    rows = [
        ("flops_per_step", _si(p["flops_per_step"], "FLOP") + f" (ViT {_si(p['flops_breakdown']['vit_forward'] + p['flops_breakdown']['vit_backward'], 'FLOP')})",
         "counted"),
        ("step_seconds", _dur(p["step_seconds"]) + f" at {p['mfu']:.0%} of dense {p['precision']} peak"
         + (" (incl. checkpoint recompute)" if c["grad_checkpointing"] else ""), "modelled"),
        ("clips_per_second_needed", f"{p['clips_per_second_needed']:.0f} per GPU"
         + (f" (loader gives {p['loader_clips_per_second']:g}: input-bound)" if p["input_bound"] else ""), "modelled"),
        ("epoch_seconds", f"{_dur(p['epoch_seconds'])} ({p['steps_per_epoch']:,} steps)", "modelled"),
        ("round 0", f"{_dur(t['round0'])} (initial captions {_dur(t['round0_initial_captions'])}, CLIP "
                    f"{_dur(t['round0_clip_features'])}, top-k {_dur(t['round0_neighbours'])}, re-rank "
                    f"{_dur(t['round0_rerank'])})", "modelled"),
        ("per round", _dur(t["per_round"]) + f" (beam search + embed + re-rank; exchange {_dur(t['per_round_comm'])})",
         "modelled"),
        ("run_hours", f"{p['run_hours']:.2f} h (training {_dur(t['training'])})", "modelled"),
        ("round0_rerank_bytes", f"{p['round0_rerank_bytes'] / 1e9:,.1f} GB per rank ({p['round0_candidates_per_video']:,} "
                                f"distinct ids/video; all {p['round0_rerank_bytes_upper'] / 1e9:,.0f} GB undeduplicated)",
         "modelled"),
        ("round0_comm_bytes", f"{p['round0_comm_bytes'] / 1e9:,.1f} GB per rank ({_dur(t['round0_comm'])}; ring "
                              f"top-k {p['comm_detail_bytes']['round0_neighbour_ring'] / 1e9:,.1f} GB)", "modelled"),
        ("round_comm_bytes", f"{p['round_comm_bytes'] / 1e9:,.1f} GB per rank per round ({_dur(t['per_round_comm'])}; "
                             f"{ic['rerank_scheme']} re-rank, {ic['nodes']} node(s) of {ic['gpus_per_node']}, "
                             f"{ic['intra_node_gb_per_s']:g} GB/s within, {ic['inter_node_gb_per_s']:g} GB/s across, "
                             f"at {ic['link_efficiency']:.0%})", "modelled"),
        ("memory_gb_per_gpu", f"{m['total']:.1f} GiB of {p['gpu_memory_gb']:.0f}", "modelled"),
        ("  params_grads_optimizer", f"{m['params_grads_optimizer']:.2f} GiB", ""),
        ("  activations", f"{m['activations']:.2f} GiB" + (" (checkpointed)" if c["grad_checkpointing"] else ""), ""),
        ("  caption_features", f"{m['caption_features']:.2f} GiB ({p['caption_count_per_rank']:,} of "
                               f"{p['caption_count_final']:,} captions on this rank, fp16)", ""),
        ("  neighbour_graph", f"{m['neighbour_graph']:.2f} GiB (this rank's rows)", ""),
        ("  top-k state, exchange", f"{m['neighbour_search_state'] + m['exchange_buffers']:.2f} GiB", ""),
        ("  video feats, CLIP, runtime", f"{m['video_features'] + m['frozen_clip'] + m['runtime']:.2f} GiB", ""),
        ("host_memory_gb_per_rank", f"{p['host_memory_gb_per_rank']:.1f} GiB (rank 0; other ranks "
                                    f"{p['host_memory_gb_other_ranks']:.1f})", "modelled"),
        ("checkpoint_gb", f"{p['checkpoint_gb']:.1f} GB each (fp32 weights + AdamW states); "
                          f"{p['checkpoint_disk_gb']:.1f} GB with keep_checkpoints={c['keep_checkpoints']} + one "
                          "being written", "counted"),
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
    p.add_argument("--gpu", default="h100", choices=list(GPUS), help="GPU model (default h100; a100 = a100-80)")
    p.add_argument("--mfu", type=float, default=0.6, help="fraction of the dense peak at the run's precision reached "
                   "by training and encoders (default 0.6)")
    p.add_argument("--decode-efficiency", type=float, default=0.2, help="fraction of peak reached by beam-search "
                   "decoding (default 0.2)")
    p.add_argument("--distinct-fraction", type=float, default=0.5, help="fraction of the T x P initial captions of a "
                   "video that are distinct (default 0.5; 1.0 = upper bound)")
    p.add_argument("--prepared-frames", type=int, default=32, help="frames per clip in prepared shards (default 32)")
    p.add_argument("--clips-per-second", type=float, metavar="R", help="what the loader delivers per GPU (e.g. from "
                   "bench/): steps and data passes take at least clips/R (default: assume it keeps up)")
    p.add_argument("--rerank-scheme", default="owner", choices=RERANK_SCHEMES, help="exact re-rank across shards: "
                   "owner (each video's feature goes to the ranks owning its candidates, as the trainer does; "
                   "default) or ring (caption-feature shards travel around the ranks)")
    p.add_argument("--exchange-budget-gb", type=float, default=2.0, metavar="GIB", help="device memory the "
                   "exchanges may use (top-k ring chunks, re-rank request chunks); default 2")
    p.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs per node (default: the GPU's usual server, "
                   "8; 4 for RTX cards)")
    p.add_argument("--intra-node-gb-per-s", type=float, metavar="GB/S", help="link within a node, per GPU per "
                   "direction (default: NVLink 450 on H100/H200, 300 on A100; PCIe otherwise)")
    p.add_argument("--inter-node-gb-per-s", type=float, metavar="GB/S", help="network across nodes, per GPU per "
                   "direction (default: InfiniBand NDR 50 on H100/H200, HDR 25 on A100)")
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
                           prepared_frames=args.prepared_frames, loader_clips_per_second=args.clips_per_second,
                           rerank_scheme=getattr(args, "rerank_scheme", "owner"),
                           exchange_budget_gb=getattr(args, "exchange_budget_gb", 2.0),
                           gpus_per_node=getattr(args, "gpus_per_node", None),
                           intra_node_gb_per_s=getattr(args, "intra_node_gb_per_s", None),
                           inter_node_gb_per_s=getattr(args, "inter_node_gb_per_s", None))
        plan = make_plan(cfg, opts)
        # allow_nan=False: a non-finite figure is an error, never NaN/Infinity in --json (invalid JSON)
        text = json.dumps(plan, indent=2, allow_nan=False) if args.json else format_plan(plan)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as exc:
        msg = " ".join(str(exc).split())  # one line, also for YAML errors that span several
        print(f"rest-fast plan: error: {msg}", file=sys.stderr)
        return 2
    print(text)
    return 0


__all__ = ["GPUS", "BlipArch", "ClipArch", "PlanOptions", "blip_arch", "clip_arch", "blip_params", "clip_params",
           "train_step_flops", "decode_flops", "clip_image_flops", "clip_text_flops", "activation_bytes",
           "make_plan", "format_plan", "run_plan", "add_plan_arguments", "config_for_plan"]
