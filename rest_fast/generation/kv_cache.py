"""A preallocated self-attention KV cache whose rows are reordered (and dropped) by index.

Beam search keeps ``rows = batch · beams`` decoder states. After every step each surviving beam continues one of the
previous step's rows, so the cache is permuted by a row index; a batch item whose search is over is dropped from the
cache the same way (the index simply omits its rows). The cache is one buffer
``[rows, layers, 2, heads, max_len, head_dim]`` plus a spare of the same size: a reorder is a single
``index_select`` into the spare, then the two swap (no allocation per step, unlike a growing ``torch.cat`` cache).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Self-attention keys/values for ``layers`` decoder layers, up to ``max_len`` positions, ``capacity`` rows.

    Storage is allocated on the first :meth:`write` (it takes that tensor's dtype, e.g. bf16 under autocast).
    ``rows`` is the number of live rows; rows ``>= rows`` are stale.
    """

    def __init__(self, layers: int, capacity: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu"):
        for name, v in (("layers", layers), ("capacity", capacity), ("heads", heads), ("max_len", max_len),
                        ("head_dim", head_dim)):
            if v < 1:
                raise ValueError(f"StaticKVCache: {name} must be >= 1, got {v}")
        self.shape = (capacity, layers, 2, heads, max_len, head_dim)
        self.device = torch.device(device)
        self.rows = capacity
        self.length = 0  # positions filled (the same for every row)
        self._buf: torch.Tensor | None = None
        self._spare: torch.Tensor | None = None

    def _alloc(self, dtype: torch.dtype) -> None:
        self._buf = torch.empty(self.shape, dtype=dtype, device=self.device)
        self._spare = torch.empty(self.shape, dtype=dtype, device=self.device)

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Store ``k, v: [rows, heads, P, head_dim]`` at positions ``pos .. pos+P-1`` of ``layer``.

        With ``v=None``, ``k`` is both at once: ``[rows, 2, heads, P, head_dim]`` (one copy instead of two).
        """
        if self._buf is None:
            self._alloc(k.dtype)
        n, p = k.shape[0], k.shape[-2]
        if n != self.rows:
            raise ValueError(f"StaticKVCache.write: k has {n} rows, the cache {self.rows}")
        if pos + p > self.shape[4]:
            raise ValueError(f"StaticKVCache.write: positions {pos}..{pos + p - 1} exceed max_len {self.shape[4]}")
        if v is None:
            self._buf[:n, layer, :, :, pos:pos + p] = k
        else:
            self._buf[:n, layer, 0, :, pos:pos + p] = k
            self._buf[:n, layer, 1, :, pos:pos + p] = v
        if layer == 0:
            self.length = pos + p

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(k, v)``, each ``[rows, heads, length, head_dim]`` (strided, not copied)."""
        if self._buf is None:
            raise RuntimeError("StaticKVCache.get before any write")
        kv = self._buf[:self.rows, layer, :, :, :self.length]
        return kv[:, 0], kv[:, 1]

    def reorder(self, rows: torch.Tensor) -> None:
        """New row ``i`` = old row ``rows[i]`` (``rows``: int64 ``[n]``, ``n <= capacity``, values ``< self.rows``)."""
        n = rows.shape[0]
        if n > self.shape[0]:
            raise ValueError(f"StaticKVCache.reorder: {n} rows exceed the capacity {self.shape[0]}")
        if self._buf is not None:
            torch.index_select(self._buf[:self.rows], 0, rows, out=self._spare[:n])
            self._buf, self._spare = self._spare, self._buf
        self.rows = n
