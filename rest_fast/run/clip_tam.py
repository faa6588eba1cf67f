"""CLIP-TAM: map a free-form caption to the nearest class name by text embedding (REST paper, Sec. 4).

A generative recogniser outputs text, not a class index. CLIP-TAM embeds the caption and every class name with
the same text encoder (CLIP's text tower in the paper; any ``list[str] -> [n, D]`` encoder works, e.g. a
sentence-transformers model) and predicts the classes of highest cosine similarity.

Class-name cleanup (:func:`clean_class_name`), applied to every name before embedding unless ``clean=False``:

1. underscores become spaces (``brush_hair`` → ``brush hair``);
2. CamelCase is split into words: at a lower-case→upper-case step (``ApplyEyeMakeup`` → ``Apply Eye Makeup``),
   at the end of a capital run followed by a capitalised word (``BMXRiding`` → ``BMX Riding``) and between
   letters and digits;
3. words are lower-cased, except acronyms (all-capital words of two or more letters, kept as written);
4. a CamelCase word made of one syllable repeated is hyphenated (``YoYo`` → ``yo-yo``), the way the toy is
   written, rather than two separate words;
5. whitespace is collapsed. Names that are already phrases (Kinetics) only change case:
   ``passing American football (in game)`` → ``passing american football (in game)`` (CLIP's and MiniLM's
   tokenizers are uncased anyway). ``PlayingDaf`` → ``playing daf``, ``TaiChi`` → ``tai chi``.

Ties in similarity go to the lower class index (a stable sort), so results are deterministic.

Lives in the run layer because training (per-round accuracy on labelled data) and evaluation both use it;
:mod:`rest_fast.eval.clip_tam` adds the per-set metrics (``score_captions``) on top.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "clip_tam",
    "clean_class_name",
    "embed_texts",
    "embed_classes",
    "nearest_classes",
    "TextEncoder",
]

TextEncoder = Callable[[list[str]], torch.Tensor]

# Split points inside a word: aB | ABc (end of an acronym) | letter-digit | digit-letter.
_CAMEL_SPLIT = re.compile(
    r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])"
)


def _clean_word(word: str) -> str:
    parts = [p for p in _CAMEL_SPLIT.split(word) if p]
    if len(parts) > 1 and len({p.lower() for p in parts}) == 1 and parts[0].isalpha():
        return "-".join(p.lower() for p in parts)  # YoYo -> yo-yo
    return " ".join(p if len(p) >= 2 and p.isupper() else p.lower() for p in parts)


def clean_class_name(name: str) -> str:
    """Turn a dataset class identifier into the phrase that gets embedded (rules in the module docstring).

    >>> clean_class_name("ApplyEyeMakeup"), clean_class_name("brush_hair"), clean_class_name("YoYo")
    ('apply eye makeup', 'brush hair', 'yo-yo')
    """
    if not isinstance(name, str):
        raise TypeError(f"class name must be a str, got {type(name).__name__}")
    words = name.replace("_", " ").split()
    cleaned = " ".join(_clean_word(w) for w in words)
    if not cleaned:
        raise ValueError(f"class name {name!r} is empty after cleanup")
    return cleaned


def _encoder_fn(text_encoder) -> TextEncoder:
    if hasattr(text_encoder, "encode_text"):
        return text_encoder.encode_text
    if callable(text_encoder):
        return text_encoder
    raise TypeError(
        "text_encoder must be a callable list[str] -> [n, D] tensor or an object with encode_text(list[str]), "
        f"got {type(text_encoder).__name__}"
    )


def embed_texts(texts: Sequence[str], text_encoder) -> torch.Tensor:
    """Embed ``texts`` with ``text_encoder`` and L2-normalise: ``[n, D]`` float32 on CPU.

    ``text_encoder`` is a callable ``list[str] -> [n, D]`` (tensor or array) or has ``encode_text``. The output is
    re-normalised here rather than trusted to be unit norm.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    texts = list(texts)
    emb = _encoder_fn(text_encoder)(texts)
    emb = torch.as_tensor(emb)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(
            f"text_encoder returned shape {tuple(emb.shape)} for {len(texts)} texts; expected [n, D]"
        )
    emb = emb.detach().to("cpu", torch.float32)
    if not torch.isfinite(emb).all():
        raise ValueError("text_encoder returned non-finite embeddings")
    return F.normalize(emb, dim=-1)


def embed_classes(
    class_names: Sequence[str],
    text_encoder,
    templates: Sequence[str] | None = None,
    clean: bool = True,
) -> torch.Tensor:
    """Class embeddings ``[C, D]`` (float32, CPU, unit norm).

    Args:
        class_names: names as published; cleaned with :func:`clean_class_name` unless ``clean=False``.
        text_encoder: callable ``list[str] -> [n, D]`` or an object with ``encode_text``.
        templates: optional prompts with one ``{}`` each (``"a video of a person {}."``); the class embedding is
            the normalised mean of the normalised per-template embeddings. ``None`` embeds the bare names.
    """
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError("class_names must be a non-empty list of str")
    names = [clean_class_name(c) for c in class_names] if clean else [str(c) for c in class_names]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        warnings.warn(f"class names coincide after cleanup: {dup[:5]}; they will tie", stacklevel=2)
    if templates is None:
        return embed_texts(names, text_encoder)
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError("templates must be None or a non-empty list of str, each with one '{}'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"each template must contain exactly one '{{}}', got {t!r}")
    per_template = torch.stack([embed_texts([t.format(n) for n in names], text_encoder) for t in templates])
    return F.normalize(per_template.mean(dim=0), dim=-1)


def nearest_classes(
    text_emb: torch.Tensor, class_emb: torch.Tensor, topk: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k classes by cosine similarity.

    Args:
        text_emb: ``[n, D]`` caption embeddings; class_emb: ``[C, D]`` class embeddings (both normalised here).
        topk: 1 ≤ topk ≤ C.
    Returns:
        ``(pred [n, topk] int64, scores [n, topk] float32)``, best first; equal scores keep the lower class index
        first.
    """
    if text_emb.ndim != 2 or class_emb.ndim != 2 or text_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(
            f"text_emb [n, D] and class_emb [C, D] must share D, got {tuple(text_emb.shape)} and {tuple(class_emb.shape)}"
        )
    c = class_emb.shape[0]
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= c:
        raise ValueError(f"topk must be an int in [1, {c}] (the number of classes), got {topk!r}")
    sims = F.normalize(text_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T
    # A stable descending sort breaks ties by class index, where torch.topk gives no guarantee.
    scores, pred = torch.sort(sims, dim=1, descending=True, stable=True)
    return pred[:, :topk].contiguous(), scores[:, :topk].contiguous()


def clip_tam(
    captions: Sequence[str],
    class_names: Sequence[str],
    text_encoder,
    topk: int = 5,
    *,
    templates: Sequence[str] | None = None,
    clean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each caption to its ``topk`` nearest class names.

    Args:
        captions: ``n`` free-form captions (one per video).
        class_names: ``C`` class names as published (cleaned, see the module docstring, unless ``clean=False``).
        text_encoder: callable ``list[str] -> [n, D]`` or an object with ``encode_text`` (a
            :class:`rest_fast.clip.FrozenCLIP`, a :class:`rest_fast.eval.matchers.SentenceTransformerMatcher`).
        topk: how many classes to return per caption, 1 ≤ topk ≤ C.
        templates: optional prompt templates for the class names, averaged (captions are embedded as they are).
    Returns:
        ``(pred, scores)``: ``pred [n, topk]`` int64 class indices, best first; ``scores [n, topk]`` float32
        cosine similarities. Both on CPU.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of str (one per video), not a single str")
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError("class_names must be a non-empty list of str")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= len(class_names):
        raise ValueError(
            f"topk must be an int in [1, {len(class_names)}] (the number of classes), got {topk!r}"
        )
    class_emb = embed_classes(class_names, text_encoder, templates=templates, clean=clean)
    if len(captions) == 0:
        return torch.empty(0, topk, dtype=torch.long), torch.empty(0, topk)
    return nearest_classes(embed_texts(captions, text_encoder), class_emb, topk)
