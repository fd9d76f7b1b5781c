"""The one ring buffer behind the instance/local-group queues and the local-group memories.

Rows [size, dim], the oldest overwritten first. A write of n rows puts them at
`ptr, ptr+1, ...` (wrapping) and advances the pointer by the rows actually
written (a write longer than the ring keeps only its newest `size` rows). The
pointer stays a tensor, so writing never synchronises with the host.

`pointer="original"` reproduces the paper's code for the local-group memory:
in the branch where the write does not wrap (ptr + n <= size) its pointer
advances by 2n, leaving every other block of slots unwritten; in the wrapping
branch it advances by n. The golden traces pin the non-wrapping branch (one
row written -> pointer 2, two rows -> 4); see `docs/method.md`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

POINTER_RULES = ("fixed", "original")
_ARANGES: dict = {}


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """arange(n) on `device`, made once per (n, device): the writes' slot offsets are constants."""
    key = (n, device)
    if key not in _ARANGES:
        _ARANGES[key] = torch.arange(n, device=device)
    return _ARANGES[key]


class RingBuffer(nn.Module):
    rows: torch.Tensor  # the buffers registered below
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, *, unit_rows: bool = False, pointer: str = "fixed"):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"ring buffer needs size and dim >= 1 (got {size} x {dim})")
        if pointer not in POINTER_RULES:
            raise ValueError(f"pointer rule must be one of {POINTER_RULES}, not {pointer!r}")
        self.pointer = pointer
        # drawn as [dim, size] and transposed: the queues' random start is the one they always had
        init = torch.randn(dim, size)
        if unit_rows:
            init = F.normalize(init, dim=0)
        self.register_buffer("rows", init.T.contiguous())
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def write_kept(self, rows: torch.Tensor, keep: torch.Tensor, ok: torch.Tensor | None = None) -> torch.Tensor:
        """Write the rows where `keep` (in order), as `write(rows[keep])` would, but without the
        host synchronisation boolean indexing costs: the slots touched are the next len(rows) from
        the pointer, each gets its kept row or keeps its value. Returns the kept count (a tensor).
        `ok` (0-dim bool, on the device): False keeps no row (a non-finite step writes nothing)."""
        m = rows.shape[0]
        keep = keep.to(device=rows.device, dtype=torch.bool)
        if ok is not None:
            keep = keep & ok
        count = keep.sum()
        if m > self.size:  # only the newest `size` kept rows can survive
            order = torch.cumsum(keep, 0) - 1 - (count - self.size).clamp(min=0)
        else:
            order = torch.cumsum(keep, 0) - 1
        window = min(m, self.size)
        valid = keep & (order >= 0) & (order < window)
        source = torch.full((window + 1,), -1, dtype=torch.long, device=rows.device)  # slot `window`: discard
        source.scatter_(0, torch.where(valid, order, window), _arange(m, rows.device))
        source = source[:window]
        slots = (self.ptr + _arange(window, rows.device)) % self.size
        written = torch.where(
            (source >= 0).unsqueeze(1), rows[source.clamp(min=0)].to(self.rows.dtype), self.rows[slots]
        )
        self.rows.index_copy_(0, slots, written)
        self._advance(count.clamp(max=self.size))
        return count

    def _advance(self, written) -> None:
        advance = written
        if self.pointer == "original":  # 2n when the write did not wrap, n when it did
            advance = torch.where(self.ptr + written <= self.size, 2 * written, written)
        self.ptr.copy_((self.ptr + advance) % self.size)

    @torch.no_grad()
    def write(self, rows: torch.Tensor, ok: torch.Tensor | None = None) -> int:
        """Write `rows` [n, dim] from the pointer on, wrapping; returns n (rows offered).
        `ok` (0-dim bool, on the device): False leaves rows and pointer as they are (a non-finite step)."""
        n = rows.shape[0]
        if n == 0:
            return 0
        rows = rows[-self.size :].to(self.rows.dtype)
        written = rows.shape[0]
        if ok is None and self.pointer == "fixed":  # the slots and the new pointer from one range: 2 ops fewer
            index = (self.ptr + _arange(written + 1, rows.device)) % self.size
            self.rows.index_copy_(0, index[:written], rows)
            self.ptr.copy_(index[written])
            return n
        index = (self.ptr + _arange(written, rows.device)) % self.size
        if ok is None:
            self.rows.index_copy_(0, index, rows)
            self._advance(written)
        else:
            self.rows.index_copy_(0, index, torch.where(ok, rows, self.rows[index]))
            self._advance(ok * written)
        return n
