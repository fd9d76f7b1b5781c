"""timm's RandAugment (the strong recipe) as batched, parameterised torch ops over all crops of one size.

Each layer runs once over the crops that drew an op in it, as (1) one per-crop, per-channel 256-entry LUT
(AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd), (2) one 3x3 colour matrix + offset
(Color, Contrast, Brightness), (3) Sharpness (PIL's 3x3 smooth blend), (4) one affine warp (Rotate, Shear,
Translate; bilinear, grey fill); values are rounded to uint8 levels after each, as PIL does. Ops and levels
are host draws (draws.py); tests/test_pipeline_randaug.py holds each op against timm's PIL op.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .augment_config import IMAGENET_MEAN
from .draws import CropDraws
from .recipe_ops import GRAY_W, colour_matrix, mean_gray, quantise, to_tensor

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


def _enhance(level: np.ndarray, sign: np.ndarray, increasing: bool) -> np.ndarray:
    """timm's enhance factor: inc1 1 +- 0.9 level/10, inc0 0.1 + 1.8 level/10."""
    return 1.0 + sign * 0.9 * level / 10.0 if increasing else 0.1 + 1.8 * level / 10.0


def _luts(x: torch.Tensor, op: np.ndarray, level: np.ndarray, increasing: bool) -> torch.Tensor:
    """[n, 3, 256] LUTs of the crops x [n, 3, S, S] for their LUT ops."""
    n = x.shape[0]
    dev = x.device
    v = torch.arange(256, device=dev, dtype=torch.float32).expand(n, 3, 256)
    opt = to_tensor(op, dev, torch.long)[:, None, None]
    lv = to_tensor(level, dev)[:, None, None]
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
        sel = torch.as_tensor(np.flatnonzero(op == 1), device=dev)  # host indices: no device sync
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


def _ra_matrices(x, op, level, sign, increasing):
    """Color / Contrast / Brightness of PIL ImageEnhance as per-crop (matrix, offset); identity elsewhere."""
    n, dev = x.shape[0], x.device
    f = to_tensor(np.where(np.isin(op, MATRIX_OPS), _enhance(level, sign, increasing), 1.0), dev)
    opt = to_tensor(op, dev, torch.long)
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    g = GRAY_W.to(dev)[None, None, :].expand(n, 3, 3)  # rows: the grey weights
    fm = f[:, None, None]
    colour = fm * eye + (1 - fm) * g
    scale = fm * eye
    m = torch.where(((opt == 8) | (opt == 9))[:, None, None], scale, eye)
    m = torch.where((opt == 7)[:, None, None], colour, m)
    mean = mean_gray(x).add(0.5).floor()  # PIL Contrast: the grey image's mean, rounded
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
    theta = to_tensor(a, dev)
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
            xs = quantise(colour_matrix(xs, *_ra_matrices(xs, o, l_, s_, increasing)))
        if (o == SHARPNESS).any():
            k = np.flatnonzero(o == SHARPNESS)
            ki = torch.as_tensor(k, device=x.device)
            f = to_tensor(_enhance(l_[k], s_[k], increasing), x.device)
            xs.index_copy_(0, ki, quantise(_sharpness(xs.index_select(0, ki), f)))
        if np.isin(o, WARP_OPS).any():
            k = np.flatnonzero(np.isin(o, WARP_OPS))
            ki = torch.as_tensor(k, device=x.device)
            xs.index_copy_(0, ki, quantise(_warp(xs.index_select(0, ki), o[k], l_[k], s_[k], translate_px)))
        x.index_copy_(0, idx, xs)
    return x
