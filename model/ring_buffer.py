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

A write masked by `ok` (a 0-dim bool on the device, False on a non-finite step)
stores, slot by slot, the new row or the slot's own old one, and moves the
pointer only where `ok`: the step never asks the host first.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

POINTER_RULES = ("fixed", "original")


@lru_cache(maxsize=64)  # a run writes a handful of sizes: bounded, made once each
def _arange(n: int, device: torch.device) -> torch.Tensor:
    """arange(n) on `device`: the writes' slot offsets are constants."""
    return torch.arange(n, device=device)


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

    def _store(self, slots: torch.Tensor, new: torch.Tensor) -> None:
        """rows[slots] = new ([n, dim]): the one place rows are written."""
        self.rows.index_copy_(0, slots, new)

    def _source(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` as they may enter a `where` with our rows: a narrower float (bf16) is promoted
        exactly by the `where` itself (no cast op); anything else is cast first, as a copy would."""
        if rows.dtype == self.rows.dtype:
            return rows
        narrower = rows.dtype.is_floating_point and rows.dtype.itemsize < self.rows.dtype.itemsize
        return rows if narrower and self.rows.dtype.is_floating_point else rows.to(self.rows.dtype)

    @torch.no_grad()
    def write_kept(self, rows: torch.Tensor, keep: torch.Tensor, ok: torch.Tensor | None = None) -> torch.Tensor:
        """Write the rows where `keep` (in order), as `write(rows[keep])` would, but without the
        host synchronisation boolean indexing costs. Returns the kept count (a tensor).
        `keep`: (m,) bool, or 0/1 numbers. `ok` (0-dim bool, on the device): False keeps no row.

        With m <= size (the training's case) in 10 ops: one cumsum over [ptr, keep] gives every kept
        row its slot, ptr + (kept rows before it), and ptr + count at its end; a dropped row goes to
        slot ptr + count with that slot's own old value (no kept row lands there when m <= size, and
        all such copies are equal, so the duplicates are harmless)."""
        m = rows.shape[0]
        keep = keep.to(rows.device)
        keep = torch.logical_and(keep, ok) if ok is not None else keep.to(torch.bool)
        if m > self.size:
            return self._write_kept_overflow(rows, keep)
        ends = torch.cat((self.ptr.view(1), keep)).cumsum(0)  # [ptr, ptr + kept before row i..., ptr + count]
        count = ends[m] - ends[0]
        wrapped = ends % self.size
        slots = torch.where(keep, wrapped[:m], wrapped[m])
        self._store(slots, torch.where(keep.unsqueeze(1), self._source(rows), self.rows.index_select(0, wrapped[m:])))
        if self.pointer == "fixed":
            self.ptr.copy_(wrapped[m])
        else:
            self.ptr.copy_(torch.where(ends[m] <= self.size, ends[m] + count, ends[m]) % self.size)
        return count

    def _write_kept_overflow(self, rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """write_kept when more rows are offered than the ring holds: only the newest `size` kept rows survive."""
        m = rows.shape[0]
        count = keep.sum()
        order = torch.cumsum(keep, 0) - 1 - (count - self.size).clamp(min=0)
        valid = keep & (order >= 0) & (order < self.size)
        source = torch.full((self.size + 1,), -1, dtype=torch.long, device=rows.device)  # slot `size`: discard
        source.scatter_(0, torch.where(valid, order, self.size), _arange(m, rows.device))
        source = source[: self.size]
        slots = (self.ptr + _arange(self.size, rows.device)) % self.size
        self._store(
            slots,
            torch.where((source >= 0).unsqueeze(1), rows[source.clamp(min=0)].to(self.rows.dtype), self.rows[slots]),
        )
        self._advance(count.clamp(max=self.size))
        return count

    def _advance(self, written) -> None:
        advance = written
        if self.pointer == "original":  # 2n when the write did not wrap, n when it did
            advance = torch.where(self.ptr + written <= self.size, 2 * written, written)
        self.ptr.copy_((self.ptr + advance) % self.size)

    @torch.no_grad()
    def write(self, rows: torch.Tensor, ok: torch.Tensor | None = None) -> int:
        """Write `rows` [..., dim] (row-major: any leading shape, e.g. a [2, n, dim] view) from the pointer
        on, wrapping; returns n (rows offered). `ok` (0-dim bool, on the device): False leaves rows and
        pointer as they are (a non-finite step). One range gives the slots and the next pointer; the
        original rule's non-wrapping pointer, ptr + 2n, is that range's entry 2n."""
        n = rows.shape[:-1].numel()
        if n == 0:
            return 0
        if n > self.size or (ok is None and rows.dim() != 2):
            rows = rows.reshape(n, rows.shape[-1])[-self.size :]
        written = rows.shape[:-1].numel()
        original = self.pointer == "original"
        index = (self.ptr + _arange((2 if original else 1) * written + 1, rows.device)) % self.size
        slots = index[:written]
        nxt = index[written]
        if original:  # 2n when the write does not wrap (ptr + n <= size), n when it does
            nxt = torch.where(self.ptr <= self.size - written, index[2 * written], nxt)
        if ok is None:
            self._store(slots, rows.to(self.rows.dtype))
            self.ptr.copy_(nxt)
            return n
        new = self.rows.new_empty((written, self.rows.shape[1]))  # row-major, whatever the strides of `rows`
        torch.where(ok, self._source(rows), self.rows[slots].view(rows.shape), out=new.view(rows.shape))
        self._store(slots, new)
        torch.where(ok, nxt, self.ptr, out=self.ptr)
        return n
