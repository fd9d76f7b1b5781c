"""Collectives that degrade to identity in a single process, so the model code has one path."""
from __future__ import annotations

import torch
import torch.distributed as dist


# torch >= 2.14 renamed all_gather_into_tensor; older releases (>= 2.6 supported) only have the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 in rank order (no gradient)."""
    if world_size() == 1:
        return x
    out = x.new_empty((world_size() * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous())
    return out


@torch.no_grad()
def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average `x` over ranks (one all-reduce)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()
