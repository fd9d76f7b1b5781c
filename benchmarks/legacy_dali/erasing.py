"""Random erasing of the strong crops (timm RandomErasing, mode='pixel', max_count=1), in torch.

Why here and not in DALI: on DALI's CPU backend the noise + paste ops cost more than the
whole RandAugment; in torch it is a slice assignment per erased crop, on CPU or GPU. The
draws come from a NumPy generator the caller seeds per step, so resume stays exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MIN_AREA, MAX_AREA, MIN_ASPECT = 0.02, 1.0 / 3.0, 0.3


def erase_rect(rng: np.random.Generator, h: int, w: int):
    """timm's rectangle rule: up to 10 tries of area U(2%, 33%), log-uniform aspect 0.3..3.3."""
    log_ratio = (math.log(MIN_ASPECT), math.log(1.0 / MIN_ASPECT))
    for _ in range(10):
        area = rng.uniform(MIN_AREA, MAX_AREA) * h * w
        ratio = math.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < eh < h and 0 < ew < w:
            return int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1)), eh, ew
    return None


def erase_strong(
    crops: torch.Tensor, strong: np.ndarray, re_prob: float, rng: np.random.Generator, noise: torch.Generator
) -> int:
    """In place on normalised crops [N,3,S,S]: each crop with strong[i] is erased with prob re_prob.

    Returns the number of erased crops. Noise is N(0,1) (timm's 'pixel' mode on normalised data).
    """
    if re_prob <= 0:
        return 0
    n, c, h, w = crops.shape
    chosen = np.flatnonzero(strong & (rng.random(n) < re_prob))
    rects = [(int(i), r) for i in chosen for r in [erase_rect(rng, h, w)] if r is not None]
    if not rects:
        return 0
    # all patches from one draw and one host-to-device copy (not one per crop)
    sizes = [c * eh * ew for _, (_, _, eh, ew) in rects]
    noise_all = torch.randn(sum(sizes), generator=noise, dtype=torch.float32).to(crops.device, crops.dtype)
    for (i, (y, x, eh, ew)), patch in zip(rects, noise_all.split(sizes)):
        crops[i, :, y : y + eh, x : x + ew] = patch.view(c, eh, ew)
    return len(rects)
