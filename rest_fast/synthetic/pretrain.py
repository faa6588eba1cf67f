"""Pretrain the demo CLIP and the demo BLIP on the web corpus, bit for bit from a seed.

``python -m rest_fast.synthetic.pretrain`` writes ``rest_fast/assets/demo/`` (what the package ships);
``--out DIR`` writes elsewhere, ``--check`` re-trains and compares the bytes with the shipped files, and the
``--web-clips/--clip-steps/--blip-steps`` knobs make a reduced run (the test re-runs it small, twice).

Determinism: one CPU thread, every draw from ``numpy.random.default_rng([seed, ...])`` or a seeded torch
generator, and fixed-order float32 arithmetic, so the same seed gives the same bytes on the same machine and
software (a different CPU instruction set or torch version may change the last bits of the weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rest_fast.synthetic import world
from rest_fast.synthetic.models import ASSETS, BLIP_DIR, DemoCLIP, WordTokenizer, save_demo_clip, to_pixels

PROMPT = "a video of"
# The CLIP learns from 24,576 web clips (rendering them takes ~15 s): with 1,536 it memorised them (100% on its own
# clips, 60% on fresh ones). The captioner keeps the first 1,536 of the same corpus: an image captioner that saw
# more would read more of the action off single frames, which is what the demo must not give it.
DEFAULTS = {"seed": 0, "web_clips": 24576, "blip_web_clips": 1536, "frames": 4, "size": 32, "clip_steps": 4000,
            "blip_steps": 2000}


def _positives(specs: list[world.ClipSpec], only_action: list[bool]) -> torch.Tensor:
    """[B, B] float: text j describes video i (same action, and same object unless the text names no object)."""
    a = torch.tensor([world.ACTIONS.index(s.action) for s in specs])
    objects = sorted({s.object for s in specs})
    o = torch.tensor([objects.index(s.object) for s in specs])
    bare = torch.tensor(only_action)
    same_a = a[:, None] == a[None, :]
    same_o = o[:, None] == o[None, :]
    return (same_a & (same_o | bare[None, :])).float()


def train_demo_clip(clips: np.ndarray, specs: list[world.ClipSpec], *, seed: int, steps: int, batch: int = 64,
                    lr: float = 2e-3, text_text_weight: float = 0.5, log=print) -> tuple[DemoCLIP, WordTokenizer]:
    """Contrastive training of :class:`DemoCLIP`: REST's video feature vs one caption per clip (soft targets).

    Plus a text-text term (weight ``text_text_weight``): each caption must be nearer its bare action name than
    the other seven names. CLIP-TAM scores a caption by exactly that, and video-text training alone left every
    "... changing colour" and "... changing shape" caption nearer another action's name (measured: 75% of
    captions mapped to their own action without the term, 100% with it; the video side is unchanged, 90-91% on
    fresh clips).
    """
    rng = np.random.default_rng([seed, 0xC11])
    tok = WordTokenizer(world.vocabulary())
    torch.manual_seed(seed)
    model = DemoCLIP(len(tok), image_size=clips.shape[2], width=32, dim=128)
    action_ids = tok(list(world.ACTIONS))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    pixels = to_pixels(torch.from_numpy(clips))
    scale = 20.0  # fixed inverse temperature: the small corpus does not need a learned one
    for step in range(steps):
        idx = rng.choice(len(clips), size=min(batch, len(clips)), replace=False)
        sp = [specs[i] for i in idx]
        bare = [bool(rng.random() < 0.3) for _ in idx]
        texts = [world.caption(s, rng, world.ACTION_ONLY_TEMPLATES if b else world.TEMPLATES) for s, b in zip(sp, bare)]
        v = model.video_features(pixels[torch.from_numpy(idx)])
        t = F.normalize(model.encode_text(tok(texts)), dim=-1)
        logits = scale * v @ t.T
        pos = _positives(sp, bare)
        loss = 0.5 * (-(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                      - (pos / pos.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean())
        if text_text_weight:
            names = F.normalize(model.encode_text(action_ids), dim=-1)
            action = torch.tensor([world.ACTIONS.index(s.action) for s in sp])
            loss = loss + text_text_weight * F.cross_entropy(scale * t @ names.T, action)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"clip step {step + 1}/{steps}: loss {float(loss.detach()):.4f}")
    return model.eval(), tok


def train_demo_blip(clips: np.ndarray, specs: list[world.ClipSpec], *, seed: int, steps: int, batch: int = 64,
                    lr: float = 2e-3, log=print):
    """A tiny BLIP trained as an *image* captioner: one random frame of a web clip → that clip's caption."""
    from rest_fast.clip import OPENAI_MEAN, OPENAI_STD
    from rest_fast.models import GARModel
    from rest_fast.models.tiny import tiny_blip

    rng = np.random.default_rng([seed, 0xB11])
    blip, tok = tiny_blip(None, seed=seed, vocab=world.vocabulary(), image_size=clips.shape[2], patch_size=8,
                          vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=2, num_heads=2,
                          init_std=0.02)
    model = GARModel(blip, tok, num_frames=1, adapter_layers=[])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    pixels = to_pixels(torch.from_numpy(clips), OPENAI_MEAN, OPENAI_STD)
    T = clips.shape[1]
    for step in range(steps):
        idx = rng.choice(len(clips), size=min(batch, len(clips)), replace=False)
        frame = rng.integers(T, size=len(idx))
        texts = [world.caption(specs[i], rng) for i in idx]
        loss = model.loss(pixels[torch.from_numpy(idx), torch.from_numpy(frame)], texts, prompt=PROMPT,
                          label_smoothing=0.1).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"blip step {step + 1}/{steps}: loss {float(loss.detach()):.4f}")
    model.eval()
    return model


def _one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a fixed reduction order, so the bytes repeat
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _clip_job(tmp: str, *, seed: int, web_clips: int, frames: int, size: int, steps: int) -> list[str]:
    lines: list[str] = []
    clips, specs = world.web_corpus(web_clips, seed=seed, frames=frames, size=size)
    model, tok = _one_thread(lambda: train_demo_clip(clips, specs, seed=seed, steps=steps, log=lines.append))
    save_demo_clip(model, tok, Path(tmp))
    return lines


def _blip_job(tmp: str, *, seed: int, web_clips: int, frames: int, size: int, steps: int) -> list[str]:
    lines: list[str] = []
    clips, specs = world.web_corpus(web_clips, seed=seed, frames=frames, size=size)
    model = _one_thread(lambda: train_demo_blip(clips, specs, seed=seed, steps=steps, log=lines.append))
    model.blip.save_pretrained(str(Path(tmp) / BLIP_DIR))
    model.tokenizer.save_pretrained(str(Path(tmp) / BLIP_DIR))
    return lines


def pretrain(out: str | Path, *, seed: int = 0, web_clips: int = DEFAULTS["web_clips"],
             blip_web_clips: int = DEFAULTS["blip_web_clips"], frames: int = 4, size: int = 32,
             clip_steps: int = DEFAULTS["clip_steps"], blip_steps: int = DEFAULTS["blip_steps"], parallel: bool = True,
             log=print) -> dict[str, str]:
    """Train both demo models and write them to ``out``; return ``{relative file: sha256}`` of what was written.

    The CLIP trains on the first ``web_clips`` clips of the web corpus, the captioner on the first
    ``blip_web_clips`` (a prefix of the same corpus: clip ``i`` does not depend on how many are rendered).
    """
    out = Path(out)
    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    corpus = dict(seed=seed, frames=frames, size=size)
    jobs = [(_clip_job, dict(corpus, web_clips=web_clips, steps=clip_steps)),
            (_blip_job, dict(corpus, web_clips=blip_web_clips, steps=blip_steps))]
    if parallel:  # the two models train in two processes (one thread each): same bytes, half the wall time
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(2) as pool:
            results = [pool.apply_async(fn, (str(tmp),), kw) for fn, kw in jobs]
            for r in results:
                for line in r.get():
                    log(line)
    else:
        for fn, kw in jobs:
            for line in fn(str(tmp), **kw):
                log(line)
    recipe = {"seed": seed, "web_clips": web_clips, "blip_web_clips": blip_web_clips, "frames": frames, "size": size,
              "clip_steps": clip_steps, "blip_steps": blip_steps, "torch": torch.__version__}
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp.rglob("*"):  # safetensors writes 0600: package data must be readable as the umask allows
        if p.is_file():
            p.chmod(0o666 & ~umask)
    sums = file_hashes(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"wrote {out} ({sum((out / f).stat().st_size for f in sums) / 1e6:.2f} MB) [{time.time() - t0:.1f} s]")
    return sums


def file_hashes(root: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` except ``recipe.json`` (versions may differ)."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "recipe.json"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rest_fast.synthetic.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ASSETS), help="where the models go (default: the package's assets)")
    ap.add_argument("--check", action="store_true", help="train into a temporary folder and compare with --out")
    ap.add_argument("--serial", action="store_true", help="train the two models one after the other in this process")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    args = ap.parse_args(argv)
    kw = {k: getattr(args, k) for k in DEFAULTS}
    kw["parallel"] = not args.serial
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            new = pretrain(Path(tmp) / "demo", **kw)
            old = file_hashes(args.out)
        diff = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        if diff:
            print(f"differs from {args.out}: {', '.join(diff)}", file=sys.stderr)
            return 1
        print(f"identical to {args.out}: {len(new)} files")
        return 0
    pretrain(args.out, **kw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
