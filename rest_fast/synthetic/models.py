"""The demo's two pretrained models, as the trainer loads them (``blip=demo``, ``clip=demo``).

* **Demo CLIP** (:class:`DemoCLIP`): a dual encoder trained contrastively on the web corpus with REST's video
  feature — the mean of L2-normalised frame embeddings — against caption text. Image tower: a 4-layer CNN on
  32x32 frames; text tower: word embeddings averaged and passed through an MLP (the captions' word order carries
  no meaning in this world). It is wrapped by :class:`rest_fast.clip.FrozenCLIP` like any open_clip model, so
  retrieval and CLIP-TAM use it through the same code as ViT-B/16.
* **Demo BLIP**: a tiny ``BlipForConditionalGeneration`` (HF format, :func:`rest_fast.models.tiny.tiny_blip`
  architecture) pretrained as an *image* captioner on single web frames with their clip's caption.

Both ship as safetensors under ``rest_fast/assets/demo/`` (written by ``python -m rest_fast.synthetic.pretrain``,
which reproduces them bit for bit from its seed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEMO = "demo"  # model name of the pretrained demo BLIP / CLIP
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
CLIP_WEIGHTS = "demo_clip.safetensors"
CLIP_CONFIG = "demo_clip.json"
BLIP_DIR = "demo_blip"
CLIP_MEAN = (0.5, 0.5, 0.5)
CLIP_STD = (0.25, 0.25, 0.25)


class WordTokenizer:
    """Lower-cased words → ids over a fixed vocabulary (0 = pad, 1 = unknown); ``[n, context_length]`` int64."""

    def __init__(self, words: list[str], context_length: int = 16) -> None:
        self.words = list(words)
        self.ids = {w: i + 2 for i, w in enumerate(self.words)}
        self.context_length = context_length

    def __len__(self) -> int:
        return len(self.words) + 2

    def __call__(self, texts: list[str], context_length: int | None = None) -> torch.Tensor:
        L = context_length or self.context_length
        out = torch.zeros(len(texts), L, dtype=torch.int64)
        for i, t in enumerate(texts):
            toks = [self.ids.get(w, 1) for w in re.findall(r"[a-z]+", t.lower())][:L]
            if toks:
                out[i, : len(toks)] = torch.tensor(toks)
        return out


class _Visual(nn.Module):
    """Frames ``[N, 3, S, S]`` → ``[N, D]`` (unnormalised). Position is kept (flatten, no global pool)."""

    def __init__(self, image_size: int, width: int, dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        w = width
        self.convs = nn.Sequential(  # 32 → 16 → 8 → 4: cheap on a CPU, and the 4x4 grid keeps where things are
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),
        )
        side = -(-image_size // 8)
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, 2 * dim), nn.ReLU(),
                                  nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x))


class DemoCLIP(nn.Module):
    """``encode_image([N,3,S,S]) -> [N,D]``, ``encode_text(ids [n,L]) -> [n,D]`` (unnormalised, as open_clip)."""

    def __init__(self, vocab_size: int, *, image_size: int = 32, width: int = 16, dim: int = 64,
                 context_length: int = 16) -> None:
        super().__init__()
        self.visual = _Visual(image_size, width, dim)
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, 2 * dim, padding_idx=0)
        self.text_proj = nn.Sequential(nn.ReLU(), nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids > 0).unsqueeze(-1).to(self.token_embedding.weight.dtype)
        emb = (self.token_embedding(ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # mean over the words
        return self.text_proj(emb)

    def video_features(self, videos: torch.Tensor) -> torch.Tensor:
        """REST's video feature, differentiable: ``[B,T,3,S,S]`` → mean of normalised frame embeddings, normalised."""
        b, t = videos.shape[:2]
        frames = F.normalize(self.encode_image(videos.reshape(b * t, *videos.shape[2:])), dim=-1)
        return F.normalize(frames.view(b, t, -1).mean(1), dim=-1)


def to_pixels(clips_uint8: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 ``[..., S, S, 3]`` → float ``[..., 3, S, S]`` normalised with ``mean``/``std``."""
    x = clips_uint8.float().div(255.0).movedim(-1, -3)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x - m) / s


def save_demo_clip(model: DemoCLIP, tokenizer: WordTokenizer, out_dir: Path) -> None:
    from safetensors.torch import save_file

    from rest_fast.atomic_io import apply_umask

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / CLIP_WEIGHTS))
    apply_umask(out_dir / CLIP_WEIGHTS)  # safetensors writes 0600 whatever the umask
    cfg = {"words": tokenizer.words, "context_length": tokenizer.context_length,
           "image_size": model.visual.image_size, "width": model.visual.convs[0].out_channels,
           "dim": model.text_proj[-1].out_features, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    (out_dir / CLIP_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")


def load_demo_clip_module(model_dir: str | Path = ASSETS) -> tuple[DemoCLIP, WordTokenizer, dict]:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not (model_dir / CLIP_WEIGHTS).is_file():
        raise FileNotFoundError(f"demo CLIP weights missing in {model_dir}: run `python -m rest_fast.synthetic.pretrain`")
    cfg = json.loads((model_dir / CLIP_CONFIG).read_text())
    tok = WordTokenizer(cfg["words"], cfg["context_length"])
    model = DemoCLIP(len(tok), image_size=cfg["image_size"], width=cfg["width"], dim=cfg["dim"],
                     context_length=cfg["context_length"])
    model.load_state_dict(load_file(str(model_dir / CLIP_WEIGHTS)))
    return model.eval(), tok, cfg


def demo_clip(model_dir: str | Path = ASSETS, *, device: torch.device | str = "cpu", batch_size: int = 64):
    """The pretrained demo CLIP as a :class:`~rest_fast.clip.FrozenCLIP` (frames 32x32, its own mean/std)."""
    from rest_fast.clip import FrozenCLIP

    model, tok, cfg = load_demo_clip_module(model_dir)
    clip = FrozenCLIP(model, tokenizer=tok, mean=cfg["mean"], std=cfg["std"], image_size=cfg["image_size"],
                      device=device, dtype=torch.float32, batch_size=batch_size)
    clip.name = "demo-clip"
    return clip


def demo_blip_dir(model_dir: str | Path = ASSETS) -> Path:
    """Directory of the pretrained demo BLIP (HF ``save_pretrained`` layout)."""
    path = Path(model_dir) / BLIP_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"demo BLIP missing in {path}: run `python -m rest_fast.synthetic.pretrain`")
    return path
