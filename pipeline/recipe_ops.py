"""Tensor primitives shared by the strong (randaug.py) and weak (recipes.py) recipes: per-crop colour
matrices, grey means, rounding to uint8 levels, host arrays to the crops' device."""

from __future__ import annotations

import numpy as np
import torch

GRAY_W = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, PIL's "L" conversion


def to_tensor(a, device, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype).to(device, non_blocking=True)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Round to uint8 levels in place, as PIL does after each op."""
    return x.round_().clamp_(0, 255)


def colour_matrix(x: torch.Tensor, m: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x' = M x + offset per crop: M [n, 3, 3], offset [n, 1]."""
    n, c, h, w = x.shape
    return torch.baddbmm(offset[:, :, None].expand(n, 3, 1), m, x.reshape(n, c, h * w)).view(n, c, h, w)


def mean_gray(x: torch.Tensor) -> torch.Tensor:
    """[n] mean of each crop's grey image (grey is linear: the grey of the channel means)."""
    return x.mean(dim=(2, 3)) @ GRAY_W.to(x.device)
