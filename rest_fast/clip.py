"""Frozen CLIP: video features (mean of frame embeddings) and text features for retrieval and CLIP-TAM.

REST scores captions against videos with a frozen CLIP (paper Sec. 3): a video's feature is the mean of its
T frame embeddings, and every caption is embedded by the text tower. :class:`FrozenCLIP` wraps either an
open_clip model (``"ViT-B-16"`` + a pretrained tag such as ``"openai"``) or a Hugging Face ``CLIPModel``
(``"openai/clip-vit-base-patch16"`` or a local directory), and offers one interface to both:

* ``encode_frames(videos [B, T, 3, S, S]) -> [B, D]`` — L2-normalised video features;
* ``encode_images(images [N, 3, S, S]) -> [N, D]`` — L2-normalised frame features;
* ``encode_text(list[str]) -> [n, D]`` — L2-normalised text features;
* ``mean``, ``std``, ``image_size`` — what the data loaders must produce (frames resized to ``image_size``
  and normalised with ``mean``/``std``).

The model never trains: parameters are frozen, the module stays in eval mode, and every encoder runs under
``torch.no_grad``. On CUDA the weights default to bf16 (fp16 where bf16 is unsupported); outputs are always
float32, normalised in float32.

:func:`tiny_clip` builds a small randomly initialised open_clip model offline (the BPE vocabulary ships with
open_clip) for tests and the trainer's CPU demo.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrozenCLIP", "tiny_clip", "OPENAI_MEAN", "OPENAI_STD", "default_dtype"]

# The normalisation the OpenAI CLIP models were trained with (open_clip and HF use the same constants).
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# open_clip's tokenizer pads with 0 and uses the full OpenAI BPE vocabulary.
_OPENAI_VOCAB_SIZE = 49408


def default_dtype(device: torch.device | str | None) -> torch.dtype:
    """Weight dtype used when none is given: bf16 on CUDA (fp16 if bf16 is unsupported), else fp32."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _as_hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class _OpenCLIPAdapter:
    """Calls into an open_clip ``CLIP``/``CustomTextCLIP`` (anything with ``encode_image``/``encode_text``)."""

    kind = "open_clip"

    def __init__(self, tokenizer: Callable, context_length: int | None):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.context_length is not None:
            ids = self.tokenizer(texts, context_length=self.context_length)
        else:
            ids = self.tokenizer(texts)
        return {"text": ids}

    @staticmethod
    def image(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model.encode_image(pixels)

    @staticmethod
    def text(model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.encode_text(tokens["text"])


class _HFAdapter:
    """Calls into a ``transformers.CLIPModel``.

    Uses the towers and projections directly rather than ``get_image_features``: that method returns a
    tensor in transformers 4.x and a ``BaseModelOutputWithPooling`` in 5.x, the submodules are stable.
    """

    kind = "hf"

    def __init__(self, tokenizer: Callable, context_length: int | None):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if _is_hf_tokenizer(self.tokenizer):
            out = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
            )
        else:
            out = self.tokenizer(texts, context_length=self.context_length)
        if isinstance(out, torch.Tensor):
            # An open_clip tokenizer (same OpenAI BPE): the text tower is causal and pools at the first EOS,
            # so the zero padding after it cannot change the result and no attention mask is needed.
            return {"input_ids": out}
        return {k: out[k] for k in ("input_ids", "attention_mask") if k in out}

    @staticmethod
    def image(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        return model.visual_projection(pooled)

    @staticmethod
    def text(model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = model.text_model(**tokens).pooler_output
        return model.text_projection(pooled)


def _is_hf_tokenizer(tok) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(tok, PreTrainedTokenizerBase)


def _is_hf_clip(model: nn.Module) -> bool:
    return all(
        hasattr(model, a) for a in ("vision_model", "text_model", "visual_projection", "text_projection")
    )


def _is_hf_dir(name: str) -> bool:
    return os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json"))


def is_open_clip_name(name: str) -> bool:
    """True for an open_clip model name (``"ViT-B-16"``, ``"hf-hub:org/repo"``), False for a Hugging Face CLIP
    id (``"openai/clip-vit-base-patch16"``) or a local HF model folder."""
    import open_clip

    if name.startswith("hf-hub:"):
        return True
    if _is_hf_dir(name):
        return False
    return name in open_clip.list_models()


def pretrained_for(name: str, pretrained: str | None) -> str | None:
    """The ``pretrained`` argument to pass for ``name``: a config's open_clip tag (default ``"openai"``) is
    dropped for HF ids and folders, which carry their own weights — the config documents it as ignored
    there, so its default must not make a documented ``--clip`` value fail."""
    if pretrained is None or not isinstance(name, str):
        return pretrained
    return pretrained if is_open_clip_name(name) else None


class FrozenCLIP(nn.Module):
    """A frozen CLIP image/text encoder with a video interface.

    Args:
        name: an open_clip model name (``"ViT-B-16"``, ``"ViT-L-14"``, ``"hf-hub:org/repo"``), a Hugging Face
            CLIP id (``"openai/clip-vit-base-patch16"``), a local HF model directory, or an already built
            model (an open_clip ``CLIP`` or a ``transformers.CLIPModel``; then ``tokenizer`` is required).
        pretrained: open_clip pretrained tag or checkpoint file. ``None`` means ``"openai"`` when open_clip
            has that tag for the model; ``"random"`` builds the architecture with random weights (no
            download). Must be ``None`` for HF ids, directories and built models.
        tokenizer: for a built model: an open_clip tokenizer (``list[str] -> LongTensor [n, L]``) or a HF
            tokenizer. When loading by name the matching tokenizer is loaded; one given here replaces it.
        mean, std, image_size: override the preprocessing read from the model (for built models the
            defaults are the OpenAI constants and the vision tower's configured size).
        device: where the model runs (default: CUDA if available, else CPU).
        dtype: weight dtype (default :func:`default_dtype` of the device: bf16/fp16 on CUDA, fp32 on CPU).
        batch_size: default chunk size — videos per forward in :meth:`encode_frames`, images in
            :meth:`encode_images`, strings in :meth:`encode_text`.
        cache_dir: where open_clip / HF keep downloaded weights.

    Outputs are float32 on the model's device, L2-normalised along the last dimension.
    """

    def __init__(
        self,
        name: str | nn.Module = "ViT-B-16",
        pretrained: str | None = None,
        *,
        tokenizer: Callable | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int | tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 64,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dtype is None:
            dtype = default_dtype(device)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(
                f"dtype must be a floating dtype (float32/float16/bfloat16/float64), got {dtype}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

        if isinstance(name, nn.Module):
            if pretrained is not None:
                raise ValueError("pretrained must be None when name is an already built model")
            if tokenizer is None:
                raise ValueError("tokenizer is required when name is an already built model")
            model, info = name, self._describe_built(name, tokenizer)
        elif isinstance(name, str):
            model, info = self._load(name, pretrained, cache_dir)
            if tokenizer is not None:
                info["adapter"].tokenizer = tokenizer
        else:
            raise TypeError(f"name must be a model name/path or an nn.Module, got {type(name).__name__}")

        self.model = model
        self._adapter = info["adapter"]
        self.name = info["name"]
        self.mean = tuple(float(v) for v in (mean if mean is not None else info["mean"]))
        self.std = tuple(float(v) for v in (std if std is not None else info["std"]))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std must have 3 values (RGB), got {self.mean} and {self.std}")
        self.image_size = _as_hw(image_size if image_size is not None else info["image_size"])
        self.context_length = self._adapter.context_length
        self.batch_size = batch_size

        self.model.to(device=device, dtype=dtype)
        self.model.requires_grad_(False)
        super().train(False)
        self._dim: int | None = None

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _describe_built(model: nn.Module, tokenizer: Callable) -> dict:
        if _is_hf_clip(model):
            cfg = model.config
            return {
                "adapter": _HFAdapter(tokenizer, cfg.text_config.max_position_embeddings),
                "name": f"hf:{type(model).__name__}",
                "mean": OPENAI_MEAN,
                "std": OPENAI_STD,
                "image_size": cfg.vision_config.image_size,
            }
        if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
            import open_clip

            pp = open_clip.get_model_preprocess_cfg(model)
            return {
                "adapter": _OpenCLIPAdapter(tokenizer, getattr(model, "context_length", None)),
                "name": f"open_clip:{type(model).__name__}",
                "mean": pp.get("mean", OPENAI_MEAN),
                "std": pp.get("std", OPENAI_STD),
                "image_size": pp.get("size", model.visual.image_size),
            }
        raise TypeError(
            f"unsupported model type {type(model).__name__}: expected an open_clip CLIP (encode_image/"
            "encode_text) or a transformers CLIPModel"
        )

    @staticmethod
    def _load(name: str, pretrained: str | None, cache_dir: str | None) -> tuple[nn.Module, dict]:
        import open_clip

        is_open_clip = name.startswith("hf-hub:") or name in open_clip.list_models()
        if not is_open_clip and (_is_hf_dir(name) or "/" in name):
            if pretrained is not None:
                raise ValueError(
                    f"pretrained={pretrained!r} is only for open_clip names; {name!r} is a Hugging Face "
                    "CLIP id or directory, which carries its own weights"
                )
            return FrozenCLIP._load_hf(name, cache_dir)
        if not is_open_clip:
            raise ValueError(
                f"unknown CLIP name {name!r}: expected an open_clip model (e.g. 'ViT-B-16', 'ViT-L-14'; see "
                "open_clip.list_models()), 'hf-hub:org/repo', a Hugging Face CLIP id such as "
                "'openai/clip-vit-base-patch16', or a local HF model directory"
            )
        if pretrained is None and not name.startswith("hf-hub:"):
            tags = open_clip.list_pretrained_tags_by_model(name)
            if "openai" not in tags:
                raise ValueError(
                    f"open_clip model {name!r} has no 'openai' weights; pass pretrained= one of {tags} "
                    "(or 'random' for random initialisation)"
                )
            pretrained = "openai"
        tag = None if pretrained == "random" else pretrained
        model = open_clip.create_model(name, pretrained=tag, cache_dir=cache_dir, device="cpu")
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
        pp = open_clip.get_model_preprocess_cfg(model)
        return model, {
            "adapter": _OpenCLIPAdapter(tokenizer, getattr(model, "context_length", None)),
            "name": f"{name}:{pretrained}",
            "mean": pp.get("mean", OPENAI_MEAN),
            "std": pp.get("std", OPENAI_STD),
            "image_size": pp.get("size", model.visual.image_size),
        }

    @staticmethod
    def _load_hf(name: str, cache_dir: str | None) -> tuple[nn.Module, dict]:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(name, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
        mean, std = OPENAI_MEAN, OPENAI_STD
        try:  # the image processor config is optional; every OpenAI/LAION CLIP uses the OpenAI constants
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor.from_pretrained(name, cache_dir=cache_dir)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError):
            pass
        cfg = model.config
        return model, {
            "adapter": _HFAdapter(tokenizer, cfg.text_config.max_position_embeddings),
            "name": name,
            "mean": mean,
            "std": std,
            "image_size": cfg.vision_config.image_size,
        }

    @classmethod
    def tiny(cls, **kwargs) -> FrozenCLIP:
        """Same as :func:`tiny_clip` (a small random-init model for tests and the CPU demo)."""
        return tiny_clip(**kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def backend(self) -> str:
        """``"open_clip"`` or ``"hf"``."""
        return self._adapter.kind

    @property
    def dim(self) -> int:
        """Embedding dimension D (found with one text forward the first time it is asked)."""
        if self._dim is None:
            self._dim = int(self.encode_text([""]).shape[1])
        return self._dim

    def train(self, mode: bool = True) -> FrozenCLIP:
        # Frozen by contract: a parent module's .train() must not switch dropout/BN of CLIP back on.
        return super().train(False)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, backend={self.backend}, image_size={self.image_size}, "
            f"context_length={self.context_length}, dtype={self.dtype}"
        )

    # ------------------------------------------------------------------ encoders
    def _check_pixels(self, x: torch.Tensor, arg: str, ndim: int, layout: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor {layout}, got {type(x).__name__}")
        if x.ndim != ndim or x.shape[-3] != 3:
            raise ValueError(f"{arg} must have shape {layout} with 3 channels, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(
                f"{arg} must be a float tensor already normalised with mean={self.mean}, std={self.std}; "
                f"got dtype {x.dtype}"
            )
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"{arg} frames must be {self.image_size[0]}x{self.image_size[1]} (the model's image_size), "
                f"got {tuple(x.shape[-2:])}"
            )

    def _batch(self, batch_size: int | None) -> int:
        bs = self.batch_size if batch_size is None else batch_size
        if not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch_size must be a positive int, got {bs!r}")
        return bs

    @torch.no_grad()
    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return F.normalize(self._adapter.image(self.model, x).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """L2-normalised image embeddings.

        Args:
            images: ``[N, 3, S, S]`` float, normalised with :attr:`mean`/:attr:`std`, ``S = image_size``.
            batch_size: images per forward (default :attr:`batch_size`).
        Returns:
            ``[N, D]`` float32 on :attr:`device`.
        """
        self._check_pixels(images, "images", 4, "[N, 3, S, S]")
        bs = self._batch(batch_size)
        if images.shape[0] == 0:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat([self._embed_images(images[i : i + bs]) for i in range(0, images.shape[0], bs)])

    @torch.no_grad()
    def encode_frames(self, videos: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Video features: the mean over T of the L2-normalised frame embeddings, L2-normalised again.

        Each frame embedding is normalised before the mean so that every frame counts equally (CLIP
        compares directions; a frame's raw norm carries no meaning for retrieval).

        Args:
            videos: ``[B, T, 3, S, S]`` float, normalised with :attr:`mean`/:attr:`std`, ``S = image_size``.
                Any device; chunks are moved to :attr:`device` as they are encoded.
            batch_size: videos per forward, i.e. ``batch_size * T`` frames (default :attr:`batch_size`).
        Returns:
            ``[B, D]`` float32 on :attr:`device`, unit norm.
        """
        self._check_pixels(videos, "videos", 5, "[B, T, 3, S, S]")
        b, t = videos.shape[:2]
        if t == 0:
            raise ValueError(f"videos must have at least one frame (T >= 1), got shape {tuple(videos.shape)}")
        bs = self._batch(batch_size)
        if b == 0:
            return torch.empty(0, self.dim, device=self.device)
        out = []
        for i in range(0, b, bs):
            chunk = videos[i : i + bs]
            frames = self._embed_images(chunk.reshape(-1, *chunk.shape[2:]))
            out.append(F.normalize(frames.view(chunk.shape[0], t, -1).mean(dim=1), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """L2-normalised text embeddings.

        Args:
            texts: a list of strings (longer ones are truncated to :attr:`context_length` tokens).
            batch_size: strings per forward (default :attr:`batch_size`).
        Returns:
            ``[n, D]`` float32 on :attr:`device`, unit norm.
        """
        if isinstance(texts, str) or not all(isinstance(s, str) for s in texts):
            raise TypeError("texts must be a list of str (wrap a single string in a list)")
        texts = list(texts)
        bs = self._batch(batch_size)
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        out = []
        for i in range(0, len(texts), bs):
            tokens = self._adapter.tokenize(texts[i : i + bs])
            tokens = {k: v.to(self.device, non_blocking=True) for k, v in tokens.items()}
            out.append(F.normalize(self._adapter.text(self.model, tokens).float(), dim=-1))
        return torch.cat(out)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode_frames`."""
        return self.encode_frames(videos)


@functools.cache
def _openai_bpe_tokenizer():
    # Building the BPE tables takes most of a tiny model's construction time; the tokenizer is shareable.
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")


def tiny_clip(
    *,
    embed_dim: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    context_length: int = 32,
    seed: int = 0,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
) -> FrozenCLIP:
    """A small randomly initialised open_clip CLIP, built offline in well under a second.

    For tests and the trainer's CPU demo: real architecture and real BPE tokenizer (open_clip ships its
    vocabulary), random weights. The same ``seed`` gives the same weights, whatever the global RNG state
    (which is left untouched).
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if width % heads:
        raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(
            embed_dim=embed_dim,
            vision_cfg=CLIPVisionCfg(
                layers=layers,
                width=width,
                head_width=width // heads,
                patch_size=patch_size,
                image_size=image_size,
            ),
            text_cfg=CLIPTextCfg(
                context_length=context_length,
                vocab_size=_OPENAI_VOCAB_SIZE,
                width=width,
                heads=heads,
                layers=layers,
            ),
        )
    clip = FrozenCLIP(
        model, tokenizer=_openai_bpe_tokenizer(), device=device, dtype=dtype, batch_size=batch_size
    )
    clip.name = f"tiny(embed_dim={embed_dim}, width={width}, layers={layers}, seed={seed})"
    return clip
