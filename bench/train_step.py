"""Benchmark: one REST self-training step of GARModel at BLIP-base shape (forward + backward + AdamW).

The model is built offline from a config (random init, no download): BLIP-base (ViT-B/16 with temporal
adapters before every layer, BERT-base decoder with cross-attention, vocabulary 30,524) at ``S = 224``,
``T = 8`` frames per clip, captions of ~20 tokens. The step is the trainer's own: ``CaptionLoss`` (Eq. 2,
label smoothing 0.2) under bf16 autocast, ``backward``, ``build_optimizer``'s AdamW ``step``.

Columns: median / p20 / p80 ms per step; clips/s; achieved TFLOP/s (model FLOPs of one step counted with
``torch.utils.flop_counter`` on the same step, plus the adapters' depth-wise convs, which that counter
cannot see inside our custom op); MFU against the card's dense bf16 peak (spec sheet, ``--peak-tflops``
overrides) and against a bf16 GEMM measured in the same run (the baseline row).

    python bench/train_step.py --device cuda                   # BLIP-base, B=16, T=8, S=224
    python bench/train_step.py --quick                         # tiny shape on CPU (smoke run)
    python bench/train_step.py --device cuda --summary results/summary.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import Table, fused_path, hardware_name, matmul_tflops, time_fn  # noqa: E402

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name substring, most specific first.
PEAK_BF16 = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("GH200", 989.4),
             ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
             ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("B200", 2250.0)]


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


def build_model(quick: bool, frames: int, size: int, device: torch.device):
    """GARModel at BLIP-base shape (or a tiny one with ``quick``), random init, offline."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    from rest_fast.models.gar import GARModel
    from rest_fast.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.sep_token_id)
    if quick:
        text = dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, **ids)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=size, patch_size=8)
    else:  # Salesforce/blip-image-captioning-base's shapes (its config.json), at S = size
        text = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512, **ids)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=size, patch_size=16)
    torch.manual_seed(0)
    blip = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).to(device)
    model = GARModel(blip, tok, num_frames=frames, adapter_layers="all", adapter_init_std=0.02)
    return model.to(device).train()


def dwconv_flops(model, batch: int, frames: int, size: int) -> float:
    """Forward + backward FLOPs of the adapters' depth-wise convs (dx and dw: 3x the forward)."""
    vcfg = model.blip.config.vision_config
    tokens = batch * frames * (size // vcfg.patch_size) ** 2
    return 3 * 2 * 27 * tokens * vcfg.hidden_size * len(model.adapter_layers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model and shape (CPU smoke run)")
    ap.add_argument("--batch", type=int, default=None, help="clips per step (default 16 on CUDA, 2 quick)")
    ap.add_argument("--frames", type=int, default=None, help="T (default 8; 2 quick)")
    ap.add_argument("--size", type=int, default=None, help="S (default 224; 32 quick)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    ap.add_argument("--summary", default=None, metavar="FILE", help="append the table to FILE")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    quick = args.quick or dev.type == "cpu"
    B = args.batch or (2 if quick else 16)
    T = args.frames or (2 if quick else 8)
    S = args.size or (32 if quick else 224)

    from rest_fast.train.distributed import autocast
    from rest_fast.train.self_train import CaptionLoss, build_optimizer

    model = build_model(quick, T, S, dev)
    loss_mod = CaptionLoss(model, "a video of", 0.2)
    opt = build_optimizer(model, 2e-5, 1e-3, (0.9, 0.98))
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(B, T, 3, S, S, generator=g).to(dev)
    words = ["person", "playing", "guitar", "on", "a", "stage", "with", "friends", "outdoors", "at", "night"]
    captions = [" ".join(words[(i + j) % len(words)] for j in range(16)) for i in range(B)]

    def step():
        with autocast(dev, True):
            loss = loss_mod(clips, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step()  # compile/autotune the kernels, allocate optimizer state
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        with autocast(dev, True):
            loss = loss_mod(clips, captions)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops = fc.get_total_flops() + dwconv_flops(model, B, T, S)
    with fused_path("temporal_dwconv3d", dev):  # on CUDA the adapters must run the Triton kernels
        t = time_fn(step, device=dev, warmup=1, min_time_s=1.0 if quick else 3.0, max_reps=5 if quick else 30)

    hw = hardware_name(dev)
    peak = args.peak_tflops or (peak_tflops(hw) if dev.type == "cuda" else None)
    gemm = matmul_tflops(dev)  # same-run baseline: what this device's dense GEMM reaches
    achieved = flops / (t.median_ms * 1e-3) / 1e12
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = f"{'tiny' if quick else 'BLIP-base'} B={B} T={T} S={S}"
    table = Table("train_step", ["shape", "params_M", "ms", "p20", "p80", "min", "max", "reps", "clips/s",
                                 "TFLOP/step", "TFLOP/s", "MFU % peak", "x gemm"])
    table.add(shape=shape, params_M=params / 1e6, ms=t.median_ms, p20=t.p20_ms, p80=t.p80_ms, min=t.min_ms,
              max=t.max_ms, reps=t.reps,
              **{"clips/s": B / (t.median_ms * 1e-3), "TFLOP/step": flops / 1e12, "TFLOP/s": achieved,
                 "MFU % peak": (100 * achieved / peak) if peak else "n/a", "x gemm": achieved / gemm})
    text = (f"## train step ({hw}; peak {peak or 'unknown'} TFLOP/s bf16, measured GEMM {gemm:.3g} TFLOP/s)\n"
            + table.format())
    print(text)
    table.save(hw, {"device": dev.type})
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
