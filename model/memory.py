"""The local-group memory: a ring buffer of past patch-token means searched by cosine top-k.

The original keeps three identical [K, D] buffers (q/k/v); one is enough. Its
normalised copy (`unit`, derived, not in checkpoints) is kept up to date at write
time, so a forward normalises only its queries, not the whole memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ring_buffer import RingBuffer


class LocalGroupMemory(RingBuffer):
    """[size, dim] memory of features; `neighbours` reads it during the forward, and
    `MugsObjective.update_state` writes every rank's rows after the step (`write_kept`, `write`).

    `unit` = F.normalize(rows) row by row: each write normalises the rows it stores (row-wise, so
    the same values as normalising the whole memory: checked bitwise on CPU; on CUDA the norm's
    reduction order may depend on the row count, a last-bit difference). Any other change to `rows`
    (load_state_dict, DCP's in-place read, a test's copy_) moves its version counter past the one
    recorded, and the next lookup rebuilds `unit` from `rows` (a host check, no device sync)."""

    unit: torch.Tensor

    def __init__(self, size: int, dim: int, top_k: int, pointer: str):
        super().__init__(size, dim, pointer=pointer)
        if top_k > size:
            raise ValueError(f"top-k {top_k} exceeds the memory size {size}")
        self.top_k = top_k
        self.register_buffer("unit", torch.empty_like(self.rows), persistent=False)
        self._unit_of: tuple | None = None  # the (rows, version) `unit` was derived from
        self._refresh_unit()

    def _rows_key(self) -> tuple | None:
        if self.rows.is_inference():  # no version counter: rebuild at every lookup
            return None
        return (self.rows.data_ptr(), self.rows._version, self.unit.data_ptr())

    @torch.no_grad()
    def _refresh_unit(self) -> None:
        self.unit.copy_(F.normalize(self.rows, dim=-1))
        self._unit_of = self._rows_key()

    def _store(self, slots: torch.Tensor, new: torch.Tensor) -> None:
        current = self._unit_of is not None and self._unit_of == self._rows_key()
        super()._store(slots, new)
        if current:
            self.unit.index_copy_(0, slots, F.normalize(new, dim=-1))
            self._unit_of = self._rows_key()

    def _apply(self, fn, recurse=True):  # .to()/.cuda() move rows and unit together: still current
        current = self._unit_of is not None and self._unit_of == self._rows_key()
        out = super()._apply(fn, recurse)
        self._unit_of = self._rows_key() if current else None
        return out

    @torch.no_grad()
    def neighbours(self, query: torch.Tensor) -> torch.Tensor:
        """Top-k rows by cosine similarity to each query, returned RAW (not normalised): [B, k, D]."""
        if self._unit_of is None or self._unit_of != self._rows_key():
            self._refresh_unit()
        sim = F.normalize(query.to(self.rows.dtype), dim=-1) @ self.unit.T
        index = sim.topk(self.top_k, dim=-1).indices
        return self.rows[index]
