"""The local-group memory: a ring buffer of past patch-token means searched by cosine top-k.

The original keeps three identical [K, D] buffers (q/k/v); one is enough.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..core.dist import gather_rows
from .ring_buffer import RingBuffer


class LocalGroupMemory(RingBuffer):
    """[size, dim] memory of features; `neighbours` reads it, `push` writes every rank's rows after the step."""

    def __init__(self, size: int, dim: int, top_k: int, pointer: str):
        super().__init__(size, dim, pointer=pointer)
        if top_k > size:
            raise ValueError(f"top-k {top_k} exceeds the memory size {size}")
        self.top_k = top_k
        self._normed_key = None  # (rows identity, version) the cached normalised copy was made from
        self._normed: Optional[torch.Tensor] = None

    def _normed_rows(self) -> torch.Tensor:
        """L2-normalised rows, recomputed only after the memory changed (push, load, move)."""
        key = (id(self.rows), self.rows._version)
        if key != self._normed_key:
            self._normed, self._normed_key = F.normalize(self.rows, dim=-1), key
        return self._normed

    @torch.no_grad()
    def neighbours(self, query: torch.Tensor) -> torch.Tensor:
        """Top-k rows by cosine similarity to each query, returned RAW (not normalised): [B, k, D]."""
        sim = F.normalize(query.to(self.rows.dtype), dim=-1) @ self._normed_rows().T
        index = sim.topk(self.top_k, dim=-1).indices
        return self.rows[index]

    @torch.no_grad()
    def push(self, rows: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Write every rank's `rows` (where `keep`), in rank order; returns the count (a tensor).

        The training step gathers once for all its writes and calls `write_kept` itself."""
        rows = gather_rows(rows.to(self.rows.dtype))
        if keep is None:
            self.write(rows)
            return torch.tensor(rows.shape[0])
        return self.write_kept(rows, gather_rows(keep.to(device=rows.device, dtype=torch.bool)))
