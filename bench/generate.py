"""Captioning throughput: our decoder (rest_fast.generation) vs HF ``generate`` on the same BLIP, same run.

Three rows (captions/s = batch / median time of one batched call, HF and ours timed alternately; ratio = ours /
HF):

* ``decode T=<frames>``: decoding only. Both decoders get the same encoder states (our ``GARModel.encode`` of
  ``T``-frame clips); HF runs ``text_decoder.generate(encoder_hidden_states=…)``, which is exactly what
  ``BlipForConditionalGeneration.generate`` does after its ViT. Token ids are compared (``same`` column).
* ``e2e T=1``: images end to end, ``BlipForConditionalGeneration.generate(pixel_values, input_ids)`` vs
  ``GARModel.generate`` (adapters at zero init; ``same`` compares token ids).
* ``e2e T=<frames>``: clips end to end. HF has no temporal model, so its baseline is HF's ViT on all ``B·T`` frames,
  the mean over ``T``, then HF ``text_decoder.generate``; ours is ``GARModel.generate`` *with* its temporal
  adapters on every layer (extra work on our side).

Models: ``--model tiny`` (default on CPU; :func:`rest_fast.models.tiny_blip`) or ``--model base`` (default on
CUDA): BLIP-base shapes (ViT-B/16 at ``--image-size``, 12-layer text decoder, BERT vocabulary) with random weights.
On CUDA both sides run under bf16 autocast (then ``same`` may say ``NO``: the two round differently in bf16;
token identity is a fp32 property, tested in ``tests/test_beam_search.py``).

    python bench/generate.py                       # tiny, CPU
    python bench/generate.py --device cuda --summary out.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Table, hardware_name  # noqa: E402

os.environ.setdefault("TRITON_INTERPRET", "0")


def build(model: str, image_size: int, frames: int, device: torch.device):
    from rest_fast.models import GARModel, tiny_blip

    if model == "tiny":
        blip, tok = tiny_blip(seed=0)
    else:
        from transformers import BlipConfig, BlipForConditionalGeneration

        # Random weights with BLIP-base's shapes (BERT-size vocabulary). The tiny tokenizer's ids are all below
        # 30524, so it serves as the tokenizer; only the special ids differ from BLIP's, which costs nothing.
        tok = tiny_blip(seed=0)[1]
        cfg = BlipConfig(
            text_config=dict(vocab_size=30524, bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                             eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, num_attention_heads=12),
            vision_config=dict(image_size=image_size, patch_size=16, initializer_range=0.02),
        )
        torch.manual_seed(0)
        blip = BlipForConditionalGeneration(cfg)
    blip.eval().to(device)
    gar = GARModel(blip, tok, num_frames=frames, adapter_layers="all").to(device).eval()
    return blip, tok, gar


def interleaved(fn_a, fn_b, *, min_time_s: float, max_reps: int) -> tuple[float, float]:
    """Median wall times (ms) of ``fn_a`` and ``fn_b``, called alternately (after one warm-up call each), so that
    load changes on a shared machine hit both sides alike."""
    fn_a()
    fn_b()
    a, b = [], []
    start = time.perf_counter()
    while len(a) < max_reps and (len(a) < 3 or time.perf_counter() - start < min_time_s):
        for fn, out in ((fn_a, a), (fn_b, b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["tiny", "base"], default=None, help="tiny on CPU, base on CUDA by default")
    ap.add_argument("--batch", type=int, default=None, help="default 64 (8 with --quick)")
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--min-length", type=int, default=5)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU intra-op threads (default 1 on CPU: tiny ops time stably on a shared box; both sides "
                         "use the same setting)")
    ap.add_argument("--quick", action="store_true", help="batch 8 (unless --batch), fewer repetitions")
    ap.add_argument("--summary", default=None, help="append the table to this file")
    args = ap.parse_args()

    dev = torch.device(args.device)
    threads = args.threads if args.threads is not None else (1 if dev.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    model = args.model or ("base" if dev.type == "cuda" else "tiny")
    batch = args.batch or (8 if args.quick else 64)
    blip, tok, gar = build(model, args.image_size, args.frames, dev)
    S = blip.config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(batch, args.frames, 3, S, S, generator=g).to(dev)
    images = videos[:, 0].contiguous()
    prompt = "a video of"
    kw = dict(num_beams=args.beams, max_length=args.max_length, min_length=args.min_length)
    hf_ids = tok([prompt] * batch, return_tensors="pt").input_ids.to(dev)
    tcfg = blip.config.text_config
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    # One call is a whole batched generate (≥ tens of ms): wall-clock medians, synchronised on CUDA.
    timing = dict(min_time_s=0.5 if args.quick else 3.0, max_reps=5 if args.quick else 15)

    def synced(fn):
        if dev.type != "cuda":
            return fn
        return lambda: (fn(), torch.cuda.synchronize())

    @torch.no_grad()
    def hf_decode(states):
        ids = hf_ids.clone()
        ids[:, 0] = tcfg.bos_token_id
        with amp:
            return blip.text_decoder.generate(
                input_ids=ids[:, :-1], eos_token_id=tcfg.sep_token_id, pad_token_id=tcfg.pad_token_id,
                encoder_hidden_states=states, encoder_attention_mask=torch.ones(states.shape[:2], dtype=torch.long,
                                                                                device=dev), **kw)

    @torch.no_grad()
    def hf_images():
        with amp:
            return blip.generate(images, input_ids=hf_ids.clone(), **kw)

    @torch.no_grad()
    def hf_videos():
        with amp:
            frames = videos.flatten(0, 1)
            states = blip.vision_model(pixel_values=frames).last_hidden_state
            states = states.view(batch, args.frames, *states.shape[1:]).mean(1)
        return hf_decode(states)

    with torch.no_grad():
        states = gar.encode(videos)
    table = Table("generate", ["case", "model", "batch", "beams", "hf_caps_s", "ours_caps_s", "ratio", "same"])
    cases = [
        (f"decode T={args.frames}", lambda: hf_decode(states), lambda: gar.decode(states, prompt=prompt, **kw)),
        ("e2e T=1", hf_images, lambda: gar.generate(images, prompt=prompt, **kw)),
        (f"e2e T={args.frames}", hf_videos, lambda: gar.generate(videos, prompt=prompt, **kw)),
    ]
    # Adapters start near identity (std 1e-3); zero them for the T=1 token comparison only.
    with torch.no_grad():
        for a in gar.temporal_adapters:
            a.weight.zero_()
    for name, hf_fn, ours_fn in cases:
        same = "-"
        if not name.startswith(f"e2e T={args.frames}") or args.frames == 1:
            same = "yes" if torch.equal(hf_fn().cpu(), ours_fn().token_ids.cpu()) else "NO"
        t_hf, t_ours = interleaved(synced(hf_fn), synced(ours_fn), **timing)
        hf_cps, ours_cps = batch / (t_hf / 1e3), batch / (t_ours / 1e3)
        table.add(case=name, model=model, batch=batch, beams=args.beams, hf_caps_s=hf_cps, ours_caps_s=ours_cps,
                  ratio=ours_cps / hf_cps, same=same)
    hw = hardware_name(dev)
    header = (f"bench/generate.py: captions/s, ours vs HF generate ({hw}; max_length {args.max_length}, "
              f"min_length {args.min_length}, T={args.frames}, {threads} CPU threads)")
    text = header + "\n" + table.format()
    print(text)
    path = table.save(hw, {"max_length": args.max_length, "frames": args.frames})
    print(f"rows appended to {path}")
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
