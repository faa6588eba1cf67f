"""Accuracy metrics for class predictions: top-k, per-class, confusion, most-confused pairs, mean ± std.

Predictions are ``[n, k]`` class indices best first (what :func:`rest_fast.eval.clip_tam` returns) or ``[n]``
top-1 indices; labels are ``[n]``. Accuracies are fractions in [0, 1] (multiply by 100 for the paper's tables).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "topk_accuracy",
    "accuracies",
    "confusion_matrix",
    "per_class_accuracy",
    "mean_class_accuracy",
    "most_confused",
    "mean_std",
    "summarize",
]


def _prep(pred, labels, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.as_tensor(pred)
    labels = torch.as_tensor(labels)
    if pred.ndim == 1:
        pred = pred[:, None]
    if pred.ndim != 2:
        raise ValueError(f"pred must be [n] or [n, k] class indices, got shape {tuple(pred.shape)}")
    if labels.ndim != 1 or labels.shape[0] != pred.shape[0]:
        raise ValueError(
            f"labels must be [n] with n = {pred.shape[0]} (rows of pred), got shape {tuple(labels.shape)}"
        )
    if pred.is_floating_point() or labels.is_floating_point():
        raise TypeError("pred and labels must be integer class indices")
    pred, labels = pred.long().cpu(), labels.long().cpu()
    if num_classes is not None:
        for arg, t in (("pred", pred), ("labels", labels)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
                raise ValueError(f"{arg} has class indices outside [0, {num_classes})")
    return pred, labels


def topk_accuracy(pred, labels, k: int = 1) -> float:
    """Fraction of rows whose label is among the first ``k`` predictions (``k`` ≤ columns of ``pred``)."""
    pred, labels = _prep(pred, labels)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= pred.shape[1]:
        raise ValueError(f"k must be an int in [1, {pred.shape[1]}] (columns of pred), got {k!r}")
    if pred.shape[0] == 0:
        return math.nan
    return float((pred[:, :k] == labels[:, None]).any(dim=1).double().mean())


def accuracies(pred, labels, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": …, "top5": …}`` for each k in ``ks`` that ``pred`` has columns for."""
    pred_t = torch.as_tensor(pred)
    width = 1 if pred_t.ndim == 1 else pred_t.shape[-1]
    return {f"top{k}": topk_accuracy(pred, labels, k) for k in ks if k <= width}


def confusion_matrix(pred, labels, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, rows = true class, columns = top-1 predicted class."""
    pred, labels = _prep(pred, labels, num_classes)
    flat = labels * num_classes + pred[:, 0]
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(pred, labels, num_classes: int, k: int = 1) -> torch.Tensor:
    """``[C]`` float64 top-k accuracy of each class; NaN for classes with no videos."""
    pred, labels = _prep(pred, labels, num_classes)
    if not 1 <= k <= pred.shape[1]:
        raise ValueError(f"k must be in [1, {pred.shape[1]}] (columns of pred), got {k}")
    hit = (pred[:, :k] == labels[:, None]).any(dim=1).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels, weights=hit, minlength=num_classes)
    return torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, math.nan))


def mean_class_accuracy(pred, labels, num_classes: int, k: int = 1) -> float:
    """Mean over classes that have videos of the per-class top-k accuracy."""
    acc = per_class_accuracy(pred, labels, num_classes, k)
    acc = acc[~torch.isnan(acc)]
    return float(acc.mean()) if acc.numel() else math.nan


def most_confused(pred, labels, class_names: Sequence[str], top: int = 10) -> list[tuple[str, str, int]]:
    """The ``top`` most frequent (true class, predicted class, count) errors of the top-1 prediction.

    Ordered by count, then by true and predicted class index (deterministic).
    """
    cm = confusion_matrix(pred, labels, len(class_names))
    cm.fill_diagonal_(0)
    nz = torch.nonzero(cm, as_tuple=False).tolist()
    nz.sort(key=lambda ij: (-int(cm[ij[0], ij[1]]), ij[0], ij[1]))
    return [(class_names[i], class_names[j], int(cm[i, j])) for i, j in nz[:top]]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0) of per-split results; std is 0 for one value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def summarize(pred, labels, class_names: Sequence[str], top_confused: int = 10) -> dict:
    """All of the above for one evaluation, as a JSON-ready dict.

    Keys: ``n``, ``top1``, ``top5`` (when ``pred`` has ≥ 5 columns), ``mean_class_top1``, ``per_class_top1``
    (``{class name: accuracy or None}``), ``most_confused`` (``[[true, predicted, count], …]``).
    """
    pred_t, labels_t = _prep(pred, labels, len(class_names))
    per_class = per_class_accuracy(pred_t, labels_t, len(class_names))
    out = {"n": int(labels_t.numel()), **accuracies(pred_t, labels_t, (1, 5))}
    out["mean_class_top1"] = mean_class_accuracy(pred_t, labels_t, len(class_names))
    out["per_class_top1"] = {
        c: (None if math.isnan(float(a)) else float(a)) for c, a in zip(class_names, per_class.tolist())
    }
    out["most_confused"] = [list(t) for t in most_confused(pred_t, labels_t, class_names, top_confused)]
    return out
