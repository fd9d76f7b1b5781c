"""The local-group memory: a ring buffer of past patch-token means searched by cosine top-k.

The original keeps three identical [K, D] buffers (q/k/v); one is enough.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ring_buffer import RingBuffer


class LocalGroupMemory(RingBuffer):
    """[size, dim] memory of features; `neighbours` reads it during the forward, and
    `MugsObjective.update_state` writes every rank's rows after the step (`write_kept`, `write`)."""

    def __init__(self, size: int, dim: int, top_k: int, pointer: str):
        super().__init__(size, dim, pointer=pointer)
        if top_k > size:
            raise ValueError(f"top-k {top_k} exceeds the memory size {size}")
        self.top_k = top_k

    @torch.no_grad()
    def neighbours(self, query: torch.Tensor) -> torch.Tensor:
        """Top-k rows by cosine similarity to each query, returned RAW (not normalised): [B, k, D]."""
        sim = F.normalize(query.to(self.rows.dtype), dim=-1) @ F.normalize(self.rows, dim=-1).T
        index = sim.topk(self.top_k, dim=-1).indices
        return self.rows[index]
