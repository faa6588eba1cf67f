"""Evaluation: CLIP-TAM (caption → class name), the paper's protocols and split files, metrics, matchers.

``import rest_fast.eval`` is cheap: sentence-transformers and open_clip load only when a matcher or CLIP is built.

* :func:`clip_tam` — map captions to their nearest class names; :func:`score_captions` adds the metrics
  and per-video predictions for one labelled set;
* :mod:`rest_fast.eval.protocols` — ``protocols.get("hmdb51", split=1)`` etc., shipped class/video lists;
* :mod:`rest_fast.eval.metrics` — top-1/top-5, per-class accuracy, most-confused pairs, mean ± std;
* :mod:`rest_fast.eval.matchers` — text encoders for matching: CLIP's text tower or sentence-transformers.
"""

from rest_fast.eval import matchers, metrics, protocols
from rest_fast.eval.clip_tam import (
    clean_class_name,
    clip_tam,
    embed_classes,
    embed_texts,
    nearest_classes,
    score_captions,
)
from rest_fast.eval.matchers import CLIPTextMatcher, SentenceTransformerMatcher, get_matcher
from rest_fast.eval.metrics import (
    accuracies,
    confusion_matrix,
    mean_class_accuracy,
    mean_std,
    most_confused,
    per_class_accuracy,
    summarize,
    topk_accuracy,
)

__all__ = [
    "clip_tam",
    "clean_class_name",
    "embed_classes",
    "embed_texts",
    "nearest_classes",
    "score_captions",
    "protocols",
    "metrics",
    "matchers",
    "CLIPTextMatcher",
    "SentenceTransformerMatcher",
    "get_matcher",
    "topk_accuracy",
    "accuracies",
    "confusion_matrix",
    "per_class_accuracy",
    "mean_class_accuracy",
    "most_confused",
    "mean_std",
    "summarize",
]
