"""The video-video neighbour graph: top-H neighbours of every video by frozen-CLIP similarity.

CLIP is frozen, so the graph is computed once per feature set and stored; later runs memory-map it.

On disk (a directory):

* ``meta.json`` — ``{"format": 1, "n", "k", "exclude_self", "feature_hash", "indices": <file>, "scores":
  <file>}``. Written last, atomically: it is the commit point.
* ``indices-<tag>.npy`` — int32 ``[N, k]`` neighbour ids (N < 2**31; half the bytes of int64).
* ``scores-<tag>.npy`` — float32 ``[N, k]``, descending per row.

``<tag>`` is derived from the feature hash and ``k``, so a new graph never overwrites the files the current
``meta.json`` points at: a crash at any point leaves either the old graph or the new one, never a mix.
Every file is written to a temporary name and moved into place with :func:`os.replace`.

The feature hash is the sha256 of the dtype name, the shape and the raw bytes of the (contiguous, CPU)
feature tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rest_fast.atomic_io import atomic_open, atomic_write_text
from rest_fast.ops.topk import topk_similarity

__all__ = ["NeighbourGraph", "feature_hash", "cap_neighbours"]

_FORMAT = 1


def feature_hash(features: Tensor, *, chunk_bytes: int = 16 << 20) -> str:
    """sha256 hex digest of ``features``' dtype, shape and bytes (device and strides do not matter).

    Streamed in row chunks of about ``chunk_bytes`` (each copied to a contiguous CPU tensor and hashed in place):
    the whole tensor is never copied to bytes, and the digest is the one of its contiguous bytes."""
    t = features.detach()
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        t = t.reshape(1) if t.dim() == 0 else t
        row = max(1, t[0].numel() * t.element_size())
        step = max(1, int(chunk_bytes) // row)
        for lo in range(0, t.shape[0], step):
            part = t[lo: lo + step].to("cpu").contiguous().reshape(-1)
            h.update(part.view(torch.uint8).numpy())
    return h.hexdigest()


def cap_neighbours(k: int, n: int, *, exclude_self: bool = True, warn: bool = True) -> int:
    """``k`` capped at the number of eligible neighbours (``n - 1`` with ``exclude_self``, else ``n``).

    REST asks for H = 2000 neighbours; small datasets have fewer videos, and the trainer relies on getting
    all of them instead of an error. Warns when it caps.
    """
    limit = n - 1 if exclude_self else n
    if limit < 1:
        raise ValueError(f"need at least {2 if exclude_self else 1} videos to build a neighbour graph, got {n}")
    if k > limit:
        if warn:
            warnings.warn(f"neighbour count {k} capped at {limit} (only {n} videos"
                          f"{', self excluded' if exclude_self else ''})", stacklevel=2)
        return limit
    return k


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.save(f, array)


@dataclass
class NeighbourGraph:
    """Top-``k`` neighbours of every one of ``N`` items.

    Attributes:
        indices: int32 ``[N, k]`` neighbour ids, best first (equal scores: lower id first).
        scores: float32 ``[N, k]`` inner products, descending.
        k: neighbours per item (after capping).
        exclude_self: whether an item is excluded from its own list.
        feature_hash: :func:`feature_hash` of the features the graph was built from.

    Loaded graphs are backed by copy-on-write memory maps (no read of the whole file up front).
    """

    indices: Tensor
    scores: Tensor
    k: int
    exclude_self: bool
    feature_hash: str

    @property
    def n(self) -> int:
        return self.indices.shape[0]

    def __repr__(self) -> str:
        return f"NeighbourGraph(n={self.n}, k={self.k}, exclude_self={self.exclude_self}, " \
               f"hash={self.feature_hash[:12]}…)"

    @classmethod
    def build(cls, features: Tensor, k: int, exclude_self: bool = True, *, device: str | torch.device | None = None,
              cap: bool = True, precomputed_hash: str | None = None) -> NeighbourGraph:
        """Exact top-``k`` inner-product neighbours of every row of ``features`` ``[N, d]``.

        ``device`` (default: the features' device) is where the search runs (``"cuda"`` uses the Triton
        kernel). With ``cap`` (default) ``k`` is capped at the eligible count with a warning
        (:func:`cap_neighbours`); without it, too large a ``k`` raises ``ValueError``.
        ``precomputed_hash`` skips re-hashing when the caller already has :func:`feature_hash`.
        """
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError(f"features must be a 2-D tensor [N, d], got {getattr(features, 'shape', features)}")
        n = features.shape[0]
        if cap:
            k = cap_neighbours(k, n, exclude_self=exclude_self)
        dev = torch.device(device) if device is not None else features.device
        x = features.detach().to(dev)
        exclude = torch.arange(n, device=dev) if exclude_self else None
        scores, idx = topk_similarity(x, x, k, exclude=exclude)
        return cls(indices=idx.to(torch.int32).cpu(), scores=scores.cpu(), k=k, exclude_self=exclude_self,
                   feature_hash=precomputed_hash or feature_hash(features))

    # -- persistence ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the graph under directory ``path`` (created if needed); atomic, see the module docstring."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        tag = f"{self.feature_hash[:16]}-k{self.k}-{'x' if self.exclude_self else 's'}"
        names = {"indices": f"indices-{tag}.npy", "scores": f"scores-{tag}.npy"}
        _atomic_save_npy(root / names["indices"], self.indices.cpu().numpy().astype(np.int32, copy=False))
        _atomic_save_npy(root / names["scores"], self.scores.cpu().numpy().astype(np.float32, copy=False))
        meta = {"format": _FORMAT, "n": self.n, "k": self.k, "exclude_self": self.exclude_self,
                "feature_hash": self.feature_hash, **names}
        atomic_write_text(root / "meta.json", json.dumps(meta, indent=1))
        for f in [*root.glob("indices-*.npy"), *root.glob("scores-*.npy")]:  # superseded graphs
            if f.name not in names.values():
                f.unlink(missing_ok=True)
        return root

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> NeighbourGraph:
        """Load a saved graph; raises ``FileNotFoundError`` / ``ValueError`` when absent or inconsistent."""
        root = Path(path)
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{root}: unknown neighbour-graph format {meta.get('format')!r}")
        mode = "c" if mmap else None  # copy-on-write: writable for torch, never written back
        ind = np.load(root / meta["indices"], mmap_mode=mode)
        sc = np.load(root / meta["scores"], mmap_mode=mode)
        shape = (meta["n"], meta["k"])
        if ind.shape != shape or sc.shape != shape or ind.dtype != np.int32 or sc.dtype != np.float32:
            raise ValueError(f"{root}: arrays {ind.shape}/{ind.dtype}, {sc.shape}/{sc.dtype} do not match "
                             f"meta {shape} int32/float32")
        return cls(indices=torch.from_numpy(ind), scores=torch.from_numpy(sc), k=meta["k"],
                   exclude_self=bool(meta["exclude_self"]), feature_hash=meta["feature_hash"])

    @classmethod
    def load_or_build(cls, path: str | os.PathLike, features: Tensor, k: int, exclude_self: bool = True, *,
                      device: str | torch.device | None = None, cap: bool = True) -> NeighbourGraph:
        """The graph saved at ``path`` if it was built from these exact features with this ``k`` (after
        capping) and ``exclude_self``; otherwise build it, save it (atomically) and return it."""
        n = features.shape[0]
        kk = cap_neighbours(k, n, exclude_self=exclude_self) if cap else k
        h = feature_hash(features)
        try:
            g = cls.load(path)
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
            g = None
        if g is not None and g.feature_hash == h and g.k == kk and g.exclude_self == exclude_self \
                and g.n == n:
            return g
        g = cls.build(features, kk, exclude_self, device=device, cap=False, precomputed_hash=h)
        g.save(path)
        return g
