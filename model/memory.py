"""The local-group memory: a ring buffer of past patch-token means searched by cosine top-k.

The original keeps three identical [K, D] buffers (q/k/v); one is enough. Its
write pointer also advanced by twice the rows written; ours advances by the
rows written, so every slot is used.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.dist import gather_rows


class LocalGroupMemory(nn.Module):
    """[size, dim] memory of features; `neighbours` reads it, `push` writes it after the step."""

    def __init__(self, size: int, dim: int, top_k: int):
        super().__init__()
        if top_k > size:
            raise ValueError(f"top-k {top_k} exceeds the memory size {size}")
        self.top_k = top_k
        self.register_buffer("bank", torch.randn(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._normed_key = None  # (bank identity, version) the cached normalised copy was made from
        self._normed: Optional[torch.Tensor] = None

    def _normed_bank(self) -> torch.Tensor:
        """L2-normalised rows, recomputed only after the bank changed (push, load, move)."""
        key = (id(self.bank), self.bank._version)
        if key != self._normed_key:
            self._normed, self._normed_key = F.normalize(self.bank, dim=-1), key
        return self._normed

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def neighbours(self, query: torch.Tensor) -> torch.Tensor:
        """Top-k rows by cosine similarity to each query, returned RAW (not normalised): [B, k, D]."""
        sim = F.normalize(query.to(self.bank.dtype), dim=-1) @ self._normed_bank().T
        index = sim.topk(self.top_k, dim=-1).indices
        return self.bank[index]

    @torch.no_grad()
    def push(self, rows: torch.Tensor, keep: Optional[torch.Tensor] = None) -> int:
        """Write every rank's `rows` (where `keep`) from the pointer on, wrapping; returns the count."""
        rows = gather_rows(rows.to(self.bank.dtype))
        if keep is not None:
            rows = rows[gather_rows(keep.to(device=rows.device, dtype=torch.bool))]
        n = rows.shape[0]
        if n == 0:
            return 0
        if n > self.size:  # only the newest `size` rows survive a write longer than the ring
            rows = rows[-self.size :]
        index = (self.ptr + torch.arange(rows.shape[0], device=rows.device)) % self.size
        self.bank.index_copy_(0, index, rows)
        self.ptr.copy_((self.ptr + n) % self.size)
        return n
