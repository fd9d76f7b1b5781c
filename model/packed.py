"""Packed token rows: several batches of different token counts as ONE [sum_i B_i N_i, D] tensor.

The backbone keeps the tokens of all crop sizes packed from the first block to the last (model/block.py);
this module holds what works on the packed rows without unpacking them: drop path with timm's random
draws, and attention of every sample in one call (issue 26)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import cast

import torch

Sizes = tuple[tuple[int, int], ...]  # (batch, tokens) of each packed batch

ATTENTION_MODES = ("per_size", "varlen", "flex")


def pack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B_i, N_i, D] tensors -> one [sum_i B_i N_i, D] tensor (a view when there is one)."""
    if len(xs) == 1:
        return xs[0].reshape(-1, xs[0].shape[-1])
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def cat_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat of the parts along dim 0, without the copy where none is needed: one part is returned
    as it is, and parts that are consecutive row blocks of one buffer (the loader's crops of one size,
    pipeline/dali_batch.py) as one view of it."""
    if len(parts) == 1:
        return parts[0]
    joined = _adjacent_rows(parts)
    return joined if joined is not None else torch.cat(list(parts))


def _adjacent_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The parts as one view when each is contiguous and starts where the one before ends in the same
    storage, with the same row shape, dtype and device; None otherwise, and for parts that require
    grad (a view of their base would not carry their gradients)."""
    first = parts[0]
    if any(p.requires_grad or not p.is_contiguous() for p in parts):
        return None
    if any(p.shape[1:] != first.shape[1:] or p.dtype != first.dtype or p.device != first.device for p in parts):
        return None
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in parts:
        if p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset:
            return None
        offset += p.numel()
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    strides: list[int] = []
    step = 1
    for size in reversed(shape):  # row-major strides (a contiguous part's own may be anything on a size-1 dim)
        strides.insert(0, step)
        step *= size
    return first.as_strided(shape, strides, first.storage_offset())


def unpack(flat: torch.Tensor, sizes: Sizes) -> list[torch.Tensor]:
    """Inverse of `pack`: views [B_i, N_i, D] of `flat`."""
    if len(sizes) == 1:
        return [flat.view(*sizes[0], -1)]
    return [t.view(b, n, -1) for t, (b, n) in zip(flat.split([b * n for b, n in sizes]), sizes)]


def packed_drop_path(
    flat: torch.Tensor, sizes: Sizes, drop_prob: float, training: bool, scale_by_keep: bool = True
) -> torch.Tensor:
    """timm's `drop_path` of each batch of the packed rows `flat`, without unpacking them (issue 26).

    The RNG draws are timm's, in its order: one `bernoulli_(keep)` of B_i values per batch, in `flat`'s
    dtype, then the division by keep; the per-sample masks are then gathered to the rows (one index)
    and multiply the rows once, instead of a multiply per batch and a concatenation. Bitwise timm's
    `drop_path` on each [B_i, N_i, D] batch (tests/test_fused_pass.py)."""
    if drop_prob == 0.0 or not training:
        return flat
    return flat * drop_masks(sizes, 1, drop_prob, scale_by_keep, flat.dtype, flat.device)[0]


def drop_masks(
    sizes: Sizes, count: int, drop_prob: float, scale_by_keep: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[count, rows, 1] row masks of `count` consecutive timm drop paths at one rate (a block's two).

    Drawn as `count` calls of timm's `drop_path` in a row would draw them: per drop path, per batch, one
    `bernoulli_(keep)` of B_i values in `dtype` (here into consecutive slices of one buffer: the same
    values), then the division by keep; then one index gathers every sample's value to its rows."""
    keep = 1.0 - drop_prob
    samples = sum(b for b, _ in sizes)
    mask = torch.empty(count, samples, 1, dtype=dtype, device=device)
    for piece in mask.view(-1).split([b for _ in range(count) for b, _ in sizes]):
        piece.bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return mask[:, _row_samples(sizes, device)]


def depth_drop_masks(sizes: Sizes, rates: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[len(rates), 2, rows, 1]: `drop_masks(sizes, 2, rate, True, ...)` of every block in turn, from the
    same `bernoulli_` calls in the same order, with one multiply by the blocks' 1/keep (exact on 0/1
    values, each the quotient `div_(keep)` gives) and ONE index for all blocks instead of a division
    and an index per block. Every rate in (0, 1)."""
    samples = sum(b for b, _ in sizes)
    mask = torch.empty(len(rates), 2, samples, 1, dtype=dtype, device=device)
    pieces = iter(mask.view(-1).split([b for _ in range(2 * len(rates)) for b, _ in sizes]))  # one view op
    for rate in rates:
        for _ in range(2 * len(sizes)):
            next(pieces).bernoulli_(1.0 - rate)
    mask.mul_(_reciprocals(tuple(rates), dtype, device))
    return mask[:, :, _row_samples(sizes, device)]


# The per-shape constants below are made once and kept in small LRU caches: a run meets one or two
# shapes (its crop sizes), an evaluation or a test a few more, and nothing grows without bound.
SHAPE_CACHE = 16


@functools.lru_cache(maxsize=SHAPE_CACHE)
def _reciprocals(rates: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[len(rates), 1, 1, 1]: 1 / (1 - rate) in `dtype`, each computed by the `div_(keep)` timm's drop
    path divides its mask with (so bitwise its mask value), made once per rates."""
    ones = torch.ones(len(rates), 1, 1, 1, dtype=dtype, device=device)
    for i, rate in enumerate(rates):
        ones[i].div_(1.0 - rate)
    return ones


@functools.lru_cache(maxsize=SHAPE_CACHE)
def _row_samples(sizes: Sizes, device: torch.device) -> torch.Tensor:
    """Each packed row's sample (batch i's samples numbered after batch i-1's), made once per shape."""
    starts = [sum(b for b, _ in sizes[:i]) for i in range(len(sizes))]
    # device factories and integer repeats only: no host tensor, no host sync (tests/test_host_sync.py)
    return torch.cat([torch.arange(s, s + b, device=device).repeat_interleave(n) for s, (b, n) in zip(starts, sizes)])


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: Sizes, mode: str) -> torch.Tensor:
    """Attention of every sample of the packed rows in ONE call (issue 26): q, k, v [T, H, hd] -> [T, H, hd],
    each row attending only to the rows of its own sample.

    `varlen`: torch.nn.attention.varlen (flash attention over cumulative sequence lengths; CUDA only).
    `flex`: FlexAttention with a block mask of same-sample pairs (compiled on CUDA; the eager reference
    elsewhere, which is how tests/test_fused_pass.py checks it against the per-size SDPA loop on CPU).
    Softmax scale hd^-0.5, as SDPA's default and timm's."""
    if mode == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu = _cu_seqlens(sizes, q.device)
        longest = max(n for _, n in sizes)
        return cast(torch.Tensor, varlen_attn(q, k, v, cu, cu, longest, longest))  # no return_lse: the output alone
    if mode == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex() if q.is_cuda else flex_attention
        out = fn(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), block_mask=_sample_mask(sizes, q.device))
        return out.squeeze(0).transpose(0, 1)
    raise ValueError(f"attention {mode!r} is not one call: one of {ATTENTION_MODES[1:]}")


@functools.lru_cache(maxsize=SHAPE_CACHE)
def _cu_seqlens(sizes: Sizes, device: torch.device) -> torch.Tensor:
    """int32 [samples + 1]: where each sample's rows start in the packed rows, then the total (made once)."""
    lengths = torch.cat([torch.full((b,), n, dtype=torch.int32, device=device) for b, n in sizes])
    return torch.cat([torch.zeros(1, dtype=torch.int32, device=device), lengths.cumsum(0, dtype=torch.int32)])


@functools.lru_cache(maxsize=SHAPE_CACHE)
def _sample_mask(sizes: Sizes, device: torch.device):
    """FlexAttention's block mask: row q attends to row k when both belong to one sample (made once)."""
    from torch.nn.attention.flex_attention import create_block_mask

    sample = _row_samples(sizes, device)
    total = sample.shape[0]
    return create_block_mask(lambda b, h, q, k: sample[q] == sample[k], None, None, total, total, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
