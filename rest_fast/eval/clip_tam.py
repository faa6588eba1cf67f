"""CLIP-TAM for evaluation: the matching itself lives in :mod:`rest_fast.run.clip_tam` (training uses it too);
this module re-exports it and adds :func:`score_captions`, the per-set metrics ``rest-fast eval`` writes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rest_fast.run.clip_tam import (  # noqa: F401 - the public CLIP-TAM API, importable from here as before
    _CAMEL_SPLIT,
    TextEncoder,
    _clean_word,
    _encoder_fn,
    clean_class_name,
    clip_tam,
    embed_classes,
    embed_texts,
    nearest_classes,
)

__all__ = [
    "clip_tam",
    "clean_class_name",
    "embed_texts",
    "embed_classes",
    "nearest_classes",
    "score_captions",
    "TextEncoder",
]


def score_captions(
    captions: Sequence[str],
    labels: Sequence[int],
    class_names: Sequence[str],
    text_encoder,
    *,
    topk: int = 5,
    templates: Sequence[str] | None = None,
    videos: Sequence[str] | None = None,
    top_confused: int = 10,
) -> dict:
    """CLIP-TAM plus metrics for one labelled set, JSON-ready (what ``rest-fast eval`` writes per split).

    Args:
        captions: one caption per video; labels: ``[n]`` true class indices into ``class_names``.
        text_encoder, templates: as for :func:`clip_tam`. ``topk`` is capped at the number of classes.
        videos: optional video paths, echoed in the per-video predictions.
    Returns:
        :func:`rest_fast.eval.metrics.summarize` keys (``n``, ``top1``, ``top5``, ``mean_class_top1``,
        ``per_class_top1``, ``most_confused``) plus ``predictions``: one dict per video with ``caption``,
        ``label``, ``topk`` (class names, best first), ``scores`` (and ``video`` when given).
    """
    from rest_fast.eval.metrics import summarize

    if len(labels) != len(captions):
        raise ValueError(f"labels ({len(labels)}) and captions ({len(captions)}) must have the same length")
    if videos is not None and len(videos) != len(captions):
        raise ValueError(f"videos ({len(videos)}) and captions ({len(captions)}) must have the same length")
    k = min(topk, len(class_names))
    pred, scores = clip_tam(captions, class_names, text_encoder, topk=k, templates=templates)
    out = summarize(pred, torch.as_tensor(list(labels), dtype=torch.long), class_names, top_confused)
    preds = []
    for i, (row, srow) in enumerate(zip(pred.tolist(), scores.tolist())):
        item = {
            "caption": captions[i],
            "label": class_names[int(labels[i])],
            "topk": [class_names[j] for j in row],
            "scores": [round(s, 6) for s in srow],
        }
        if videos is not None:
            item = {"video": videos[i], **item}
        preds.append(item)
    out["predictions"] = preds
    return out
