"""The weak and strong recipes as batched, parameterised torch ops over all crops of one size.

Input: uint8-valued crops [N, 3, S, S] (float, 0..255) already cut, resized and flipped (dali_graph.py),
and their host draws (draws.py). Every stage runs once over the crops that drew it, with the parameters
of each crop as tensors: no per-sample branches, no per-crop Python loop. A crop that did not draw an
op gets identity parameters (a colour matrix of I, a LUT of 0..255) or is left out of the gather of a
costlier stage (blur, warps, equalize). The same code runs on CPU and on the GPU (the loader's producer
runs it on its own CUDA stream there), so the CPU tests cover the GPU path's maths.

Strong: timm RandAugment (randaug.py), then random erasing (N(0,1) noise from a counter hash of the
crop's key: per sample, not per batch).
Weak: ColorJitter + grayscale as one colour matrix + offset (brightness, contrast, saturation, hue in YIQ,
in this fixed order), Gaussian blur (separable, 3 sigma), solarize. Known differences from torchvision/PIL:
RandAugment on the cut crop, jitter order fixed, no clamp between jitter factors, hue a YIQ rotation (as
DALI's color_twist) rather than an HSV shift. Contrast is about the crop's grey mean, as torchvision's (the
f9e9db5 DALI graph used grey 128): tests/test_pipeline_weak_recipe.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .augment_config import IMAGENET_MEAN, IMAGENET_STD
from .draws import CropDraws
from .randaug import rand_augment
from .recipe_ops import GRAY_W, colour_matrix, mean_gray, to_tensor

_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_TAPS = 13
_GRAY_W64 = GRAY_W.numpy().astype(np.float64)  # the jitter matrices' constants, made once
_YIQ64 = _YIQ.numpy().astype(np.float64)
_YIQ_INV64 = np.linalg.inv(_YIQ64)


# -- weak recipe --------------------------------------------------------------------------------------------
def jitter_matrices(jitter: np.ndarray, gray: np.ndarray, device) -> tuple:
    """ColorJitter (brightness b, contrast c, saturation s, hue h in turns; this order) then grayscale, as
    x' = (c b) G H S x + (1 - c) b mean(grey(x)): returns (c b G H S [n, 3, 3], (1 - c) b [n])."""
    b, c, s, h = (jitter[:, i] for i in range(4))
    eye = np.eye(3)
    S = s[:, None, None] * eye + (1 - s)[:, None, None] * np.ones((3, 1)) * _GRAY_W64[None, :]
    ang = 2 * math.pi * h
    R = np.zeros((len(h), 3, 3))
    R[:, 0, 0] = 1
    R[:, 1, 1] = R[:, 2, 2] = np.cos(ang)
    R[:, 1, 2], R[:, 2, 1] = -np.sin(ang), np.sin(ang)
    H = _YIQ_INV64 @ R @ _YIQ64
    G = np.where(gray[:, None, None], np.ones((3, 1)) * _GRAY_W64[None, :], eye)
    M = (c * b)[:, None, None] * (G @ H @ S)
    return to_tensor(M, device), to_tensor((1 - c) * b, device)


def _blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Separable Gaussian, one kernel per crop cut at 3 sigma (13 taps at the largest sigma, 2), reflect
    padding: crops are grouped by kernel radius, one grouped convolution per axis and group."""
    n, c, h, w = x.shape
    radius = np.clip(np.ceil(3 * sigma), 1, _TAPS // 2).astype(int)
    out = torch.empty_like(x)
    for r in np.unique(radius):
        sel = np.flatnonzero(radius == r)
        idx = torch.as_tensor(sel, device=x.device)
        xs = x.index_select(0, idx) if len(sel) < n else x
        m = len(sel)
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        sg = to_tensor(sigma[sel], x.device)
        k = torch.exp(-(t[None, :] ** 2) / (2 * sg[:, None] ** 2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [m*c, taps]
        y = xs.reshape(1, m * c, h, w)
        for dim, size in ((2, h), (3, w)):
            p = min(int(r), size - 1)
            kk = k[:, r - p : r + p + 1]
            kk = kk / kk.sum(1, keepdim=True)
            if dim == 2:
                y = F.conv2d(F.pad(y, (0, 0, p, p), mode="reflect"), kk[:, None, :, None], groups=m * c)
            else:
                y = F.conv2d(F.pad(y, (p, p, 0, 0), mode="reflect"), kk[:, None, None, :], groups=m * c)
        out.index_copy_(0, idx, y.view(m, c, h, w))
    return out


def weak_recipe(x: torch.Tensor, d: CropDraws) -> torch.Tensor:
    """Colour jitter + grayscale (weak crops; identity matrix for strong ones), blur, solarize."""
    dev = x.device
    jit = d.jitter.reshape(-1, 4)
    gray = d.gray.reshape(-1)
    changes = (np.abs(jit - np.array([1.0, 1.0, 1.0, 0.0])).sum(1) > 0) | gray
    sel = np.flatnonzero(changes)
    if len(sel):
        idx = torch.as_tensor(sel, device=dev)
        xs = x.index_select(0, idx)
        m, k = jitter_matrices(jit[sel], gray[sel], dev)
        mean = mean_gray(xs)
        x.index_copy_(0, idx, colour_matrix(xs, m, (k * mean)[:, None]).clamp_(0, 255))
    sigma = d.blur_sigma.reshape(-1)
    sel = np.flatnonzero(sigma > 0)
    if len(sel):
        idx = torch.as_tensor(sel, device=dev)
        x.index_copy_(0, idx, _blur(x.index_select(0, idx), sigma[sel]))
    sol = np.flatnonzero(d.solarize.reshape(-1))
    if len(sol):
        idx = torch.as_tensor(sol, device=dev)
        xs = x.index_select(0, idx)
        x.index_copy_(0, idx, torch.where(xs >= 128, 255 - xs, xs))
    return x


# -- normalisation and erasing -----------------------------------------------------------------------------
def _hash_normal(counter: torch.Tensor) -> torch.Tensor:
    """N(0, 1) per int64 counter (a crop's noise key and the pixel's index): a counter hash, so a crop's
    noise is the same whatever batch or device it is made in."""
    m = 0x7FFFFFFF  # 31-bit lanes: every product below fits an int64 without overflow
    out = []
    for salt in (0x2545F491, 0x5851F42D):
        v = ((counter & m) * 0x2C1B3C6D + salt) & m ^ ((counter >> 31) & m)
        for mul in (0x7FEB352D, 0x046CA68B, 0x2C1B3C6D):
            v = (v ^ (v >> 16)) * mul & m
        v = v ^ (v >> 15)
        out.append((v.to(torch.float64) + 0.5) / 2**31)
    u1, u2 = out
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def normalise_and_erase(x: torch.Tensor, d: CropDraws) -> torch.Tensor:
    """ImageNet normalisation, then random erasing of the drawn boxes with N(0, 1) noise (timm 'pixel')."""
    dev = x.device
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1) * 255
    x.sub_(mean).div_(std)
    box = d.erase.reshape(-1, 4)
    sel = np.flatnonzero(box[:, 2] > 0)
    if len(sel):
        n, c, h, w = x.shape
        b = to_tensor(box[sel], dev, torch.long)
        ys = torch.arange(h, device=dev)[None, :, None]
        xs = torch.arange(w, device=dev)[None, None, :]
        top, left, bh, bw = (b[:, i, None, None] for i in range(4))
        mask = ((ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw))[:, None]  # [k, 1, h, w]
        keys = to_tensor(d.noise_key.reshape(-1)[sel], dev, torch.long)[:, None, None, None]
        ch = torch.arange(c, device=dev)[None, :, None, None]
        # noise for every pixel of the erased crops, kept inside the boxes: no `nonzero`, whose size would
        # make this (producer) thread wait for the device; each pixel's noise is its counter's, as before
        noise = _hash_normal(keys * (4 * h * w) + (ch * h + ys[:, None]) * w + xs[:, None])
        idx = torch.as_tensor(sel, device=dev)
        x.index_copy_(0, idx, torch.where(mask, noise.to(x.dtype), x.index_select(0, idx)))
    return x


def apply_recipes(
    crops_u8,
    d: CropDraws,
    increasing: bool,
    translate_frac: float,
    out_dtype: torch.dtype | None = None,
    layout: str = "HWC",
) -> torch.Tensor:
    """n uint8 crops [B, S, S, 3] each (layout HWC, DALI's; or [B, 3, S, S], CHW) -> normalised
    [n, B, 3, S, S] in `out_dtype`."""
    if isinstance(crops_u8, torch.Tensor):
        crops_u8 = list(crops_u8.unbind(1))
    n = len(crops_u8)
    B, S = crops_u8[0].shape[0], crops_u8[0].shape[2]
    x = torch.empty((n, B, 3, S, S), dtype=torch.float32, device=crops_u8[0].device)
    for c, u8 in enumerate(crops_u8):  # crop-major float32: one pass each
        x[c].copy_(u8.permute(0, 3, 1, 2) if layout == "HWC" else u8)
    x = x.view(n * B, 3, S, S)
    x = rand_augment(x, d, increasing, translate_frac * S)
    x = weak_recipe(x, d)
    x = normalise_and_erase(x, d)
    x = x.view(n, B, 3, S, S)
    return x if out_dtype is None or out_dtype == x.dtype else x.to(out_dtype)
