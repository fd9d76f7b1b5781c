"""The weak and strong recipes as batched, parameterised torch ops over all crops of one size.

Input: uint8-valued crops [N, 3, S, S] (float, 0..255) already cut, resized and flipped (dali_graph.py),
and their host draws (draws.py). Every stage runs once over the crops that drew it, with the parameters
of each crop as tensors: no per-sample branches, no per-crop Python loop. A crop that did not draw an
op gets identity parameters (a colour matrix of I, a LUT of 0..255) or is left out of the gather of a
costlier stage (blur, warps, equalize). The same code runs on CPU and on the GPU (the loader's producer
runs it on its own CUDA stream there), so the CPU tests cover the GPU path's maths.

Strong: timm RandAugment ops, each layer as (1) one per-crop, per-channel 256-entry LUT (AutoContrast,
Equalize, Invert, Posterize, Solarize, SolarizeAdd), (2) one 3x3 colour matrix + offset (Color, Contrast,
Brightness), (3) Sharpness (PIL's 3x3 smooth blend), (4) one affine warp (Rotate, Shear, Translate;
bilinear, grey fill); values are rounded to uint8 levels after each, as PIL does. Then random erasing
(N(0,1) noise from a counter hash of the crop's key: per sample, not per batch).
Weak: ColorJitter + grayscale as one colour matrix + offset (brightness, contrast, saturation, hue in YIQ,
in this fixed order), Gaussian blur (13-tap separable), solarize. Known differences from PIL are those of
the previous DALI graph: RandAugment on the cut crop, jitter order fixed, OpenCV-like rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .augment_config import IMAGENET_MEAN, IMAGENET_STD
from .draws import CropDraws

FILL = float(round(255 * sum(IMAGENET_MEAN) / 3))  # grey near timm's img_mean fill
OP_NAMES = (  # timm's _RAND_INCREASING_TRANSFORMS order (inc1); inc0 uses the plain names of the same ops
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
LUT_OPS = (0, 1, 2, 4, 5, 6)
MATRIX_OPS = (7, 8, 9)
SHARPNESS = 10
WARP_OPS = (3, 11, 12, 13, 14)
_GRAY_W = torch.tensor([0.299, 0.587, 0.114])
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_TAPS = 13


def _t(a, device, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype).to(device, non_blocking=True)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255)


# -- RandAugment ----------------------------------------------------------------------------------------
def _enhance(level: np.ndarray, sign: np.ndarray, increasing: bool) -> np.ndarray:
    """timm's enhance factor: inc1 1 +- 0.9 level/10, inc0 0.1 + 1.8 level/10."""
    return 1.0 + sign * 0.9 * level / 10.0 if increasing else 0.1 + 1.8 * level / 10.0


def _luts(x: torch.Tensor, op: np.ndarray, level: np.ndarray, increasing: bool) -> torch.Tensor:
    """[n, 3, 256] LUTs of the crops x [n, 3, S, S] for their LUT ops."""
    n = x.shape[0]
    dev = x.device
    v = torch.arange(256, device=dev, dtype=torch.float32).expand(n, 3, 256)
    opt = _t(op, dev, torch.long)[:, None, None]
    lv = _t(level, dev)[:, None, None]
    lut = v.clone()
    # Invert
    lut = torch.where(opt == 2, 255 - v, lut)
    # Posterize: keep the top `bits` bits (timm: int(level/10*4), inc1: 4 - that)
    bits = torch.floor(lv * 0.4)
    bits = 4 - bits if increasing else bits
    shift = (8 - bits).clamp(0, 8)
    post = torch.floor(v / 2**shift) * 2**shift
    lut = torch.where(opt == 4, post, lut)
    # Solarize at threshold 256 level/10 (inc1: 256 - that)
    th = torch.floor(lv * 25.6)
    th = 256 - th if increasing else th
    lut = torch.where(opt == 5, torch.where(v >= th, 255 - v, v), lut)
    # SolarizeAdd: + int(level/10*110) below 128
    add = torch.floor(lv * 11.0)
    lut = torch.where(opt == 6, torch.where(v < 128, (v + add).clamp(max=255), v), lut)
    need_auto, need_eq = bool((op == 0).any()), bool((op == 1).any())
    if need_auto:  # per-channel min/max stretch (PIL autocontrast, cutoff 0)
        lo = x.amin(dim=(2, 3))[..., None]
        hi = x.amax(dim=(2, 3))[..., None]
        scale = 255.0 / (hi - lo).clamp(min=1)
        stretched = torch.where(hi > lo, ((v - lo) * scale).clamp(0, 255).floor(), v)
        lut = torch.where(opt == 0, stretched, lut)
    if need_eq:  # PIL ImageOps.equalize, per channel, on the crops that drew it
        sel = torch.nonzero(_t(op == 1, dev, torch.bool)).flatten()
        xs = x.index_select(0, sel).to(torch.long).flatten(2)  # [k, 3, S*S]
        hist = torch.zeros(xs.shape[0], 3, 256, device=dev)
        hist.scatter_add_(2, xs, torch.ones_like(xs, dtype=torch.float32))
        last = torch.where(hist > 0, torch.arange(256, device=dev).expand_as(hist), -1).amax(-1, keepdim=True)
        h_last = hist.gather(2, last.clamp(min=0))
        step = torch.floor((hist.sum(-1, keepdim=True) - h_last) / 255)
        cum = torch.cumsum(hist, -1) - hist
        eq = torch.floor((torch.floor(step / 2) + cum) / step.clamp(min=1)).clamp(0, 255)
        eq = torch.where(step > 0, eq, v[: xs.shape[0]])
        lut = lut.index_copy(0, sel, torch.where(opt.index_select(0, sel) == 1, eq, lut.index_select(0, sel)))
    return lut


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    idx = x.to(torch.long).view(n * c, h * w)
    return lut.reshape(n * c, 256).gather(1, idx).view(n, c, h, w)


def _colour_matrix(x: torch.Tensor, m: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x' = M x + offset per crop: M [n, 3, 3], offset [n, 1]."""
    n, c, h, w = x.shape
    return torch.baddbmm(offset[:, :, None].expand(n, 3, 1), m, x.reshape(n, c, h * w)).view(n, c, h, w)


def _mean_gray(x: torch.Tensor) -> torch.Tensor:
    """[n] mean of each crop's grey image (grey is linear: the grey of the channel means)."""
    return x.mean(dim=(2, 3)) @ _GRAY_W.to(x.device)


def _ra_matrices(x, op, level, sign, increasing):
    """Color / Contrast / Brightness of PIL ImageEnhance as per-crop (matrix, offset); identity elsewhere."""
    n, dev = x.shape[0], x.device
    f = _t(np.where(np.isin(op, MATRIX_OPS), _enhance(level, sign, increasing), 1.0), dev)
    opt = _t(op, dev, torch.long)
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    g = _GRAY_W.to(dev)[None, None, :].expand(n, 3, 3)  # rows: the grey weights
    fm = f[:, None, None]
    colour = fm * eye + (1 - fm) * g
    scale = fm * eye
    m = torch.where(((opt == 8) | (opt == 9))[:, None, None], scale, eye)
    m = torch.where((opt == 7)[:, None, None], colour, m)
    mean = _mean_gray(x).add(0.5).floor()  # PIL Contrast: the grey image's mean, rounded
    offset = torch.where(opt == 8, (1 - f) * mean, 0.0)[:, None]
    return m, offset


def _sharpness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness: blend with the 3x3 SMOOTH filter (border pixels kept)."""
    k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    n, c, h, w = x.shape
    sm = F.conv2d(x.reshape(n * c, 1, h, w), k[None, None]).round().view(n, c, h - 2, w - 2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = sm
    return degenerate + f[:, None, None, None] * (x - degenerate)


def _warp(x: torch.Tensor, op: np.ndarray, level: np.ndarray, sign: np.ndarray, translate_px: float) -> torch.Tensor:
    """Rotate (deg 30 level/10), ShearX/Y (0.3 level/10), TranslateX/YRel (translate_px level/10), signed:
    one affine inverse map per crop, bilinear, FILL outside."""
    n, _, h, w = x.shape
    dev = x.device
    mag = sign * level / 10.0
    a = np.zeros((n, 2, 3))
    a[:, 0, 0] = a[:, 1, 1] = 1.0
    rot = np.deg2rad(30.0 * mag)
    is_rot = op == 3
    a[is_rot, 0, 0] = np.cos(rot[is_rot])
    a[is_rot, 0, 1] = -np.sin(rot[is_rot])
    a[is_rot, 1, 0] = np.sin(rot[is_rot])
    a[is_rot, 1, 1] = np.cos(rot[is_rot])
    # PIL shears about the top-left corner: x_in = x + s y (ShearX), y_in = y + s x (ShearY), in pixels
    sx, sy = 0.3 * mag[op == 11], 0.3 * mag[op == 12]
    a[op == 11, 0, 1], a[op == 11, 0, 2] = sx * h / w, sx * h / w
    a[op == 12, 1, 0], a[op == 12, 1, 2] = sy * w / h, sy * w / h
    # in normalised coordinates ([-1, 1] over the crop): translations by px / (S/2)
    a[op == 13, 0, 2] = translate_px * mag[op == 13] / (w / 2)
    a[op == 14, 1, 2] = translate_px * mag[op == 14] / (h / 2)
    theta = _t(a, dev)
    grid = F.affine_grid(theta, [n, 4, h, w], align_corners=False)
    ones = torch.ones(n, 1, h, w, device=dev, dtype=x.dtype)
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :3] + (1 - out[:, 3:]) * FILL


def rand_augment(x: torch.Tensor, d: CropDraws, increasing: bool, translate_px: float) -> torch.Tensor:
    """Every RandAugment layer over the crops x [n*B, 3, S, S] (flattened crop-major) that drew an op."""
    ops = d.ra_op.reshape(-1, d.ra_op.shape[-1])
    levels = d.ra_level.reshape(ops.shape)
    signs = d.ra_sign.reshape(ops.shape)
    for layer in range(ops.shape[1]):
        op, lv, sg = ops[:, layer], levels[:, layer], signs[:, layer]
        sel = np.flatnonzero(op >= 0)
        if not len(sel):
            continue
        idx = torch.as_tensor(sel, device=x.device)
        xs, o, l_, s_ = x.index_select(0, idx), op[sel], lv[sel], sg[sel]
        if np.isin(o, LUT_OPS).any():
            xs = _apply_lut(xs, _luts(xs, o, l_, increasing))
        if np.isin(o, MATRIX_OPS).any():
            xs = _quantise(_colour_matrix(xs, *_ra_matrices(xs, o, l_, s_, increasing)))
        if (o == SHARPNESS).any():
            k = np.flatnonzero(o == SHARPNESS)
            ki = torch.as_tensor(k, device=x.device)
            f = _t(_enhance(l_[k], s_[k], increasing), x.device)
            xs.index_copy_(0, ki, _quantise(_sharpness(xs.index_select(0, ki), f)))
        if np.isin(o, WARP_OPS).any():
            k = np.flatnonzero(np.isin(o, WARP_OPS))
            ki = torch.as_tensor(k, device=x.device)
            xs.index_copy_(0, ki, _quantise(_warp(xs.index_select(0, ki), o[k], l_[k], s_[k], translate_px)))
        x.index_copy_(0, idx, xs)
    return x


# -- weak recipe --------------------------------------------------------------------------------------------
def jitter_matrices(jitter: np.ndarray, gray: np.ndarray, device) -> tuple:
    """ColorJitter (brightness b, contrast c, saturation s, hue h in turns; this order) then grayscale, as
    x' = (c b) G H S x + (1 - c) b mean(grey(x)): returns (c b G H S [n, 3, 3], (1 - c) b [n])."""
    b, c, s, h = (jitter[:, i] for i in range(4))
    w = _GRAY_W.numpy().astype(np.float64)
    eye = np.eye(3)
    S = s[:, None, None] * eye + (1 - s)[:, None, None] * np.ones((3, 1)) * w[None, :]
    yiq = _YIQ.numpy().astype(np.float64)
    ang = 2 * math.pi * h
    R = np.zeros((len(h), 3, 3))
    R[:, 0, 0] = 1
    R[:, 1, 1] = R[:, 2, 2] = np.cos(ang)
    R[:, 1, 2], R[:, 2, 1] = -np.sin(ang), np.sin(ang)
    H = np.linalg.inv(yiq) @ R @ yiq
    G = np.where(gray[:, None, None], np.ones((3, 1)) * w[None, :], eye)
    M = (c * b)[:, None, None] * (G @ H @ S)
    return _t(M, device), _t((1 - c) * b, device)


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
        sg = _t(sigma[sel], x.device)
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
        mean = _mean_gray(xs)
        x.index_copy_(0, idx, _colour_matrix(xs, m, (k * mean)[:, None]).clamp_(0, 255))
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
        b = _t(box[sel], dev, torch.long)
        ys = torch.arange(h, device=dev)[None, :, None]
        xs = torch.arange(w, device=dev)[None, None, :]
        top, left, bh, bw = (b[:, i, None, None] for i in range(4))
        mask = ((ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw))[:, None].expand(-1, c, h, w)
        k, ch, yy, xx = torch.nonzero(mask, as_tuple=True)  # only the erased pixels get noise
        keys = _t(d.noise_key.reshape(-1)[sel], dev, torch.long)
        noise = _hash_normal(keys[k] * (4 * h * w) + (ch * h + yy) * w + xx)
        x[torch.as_tensor(sel, device=dev)[k], ch, yy, xx] = noise.to(x.dtype)
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
