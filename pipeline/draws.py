"""Every random choice of the multi-crop recipe, drawn on the host from (seed, epoch, sample position).

A sample's draws come from its own generator, seeded by (seed, epoch, global position in the epoch's
permutation): they do not depend on the batch, the rank layout or DALI's generators, so a resume at
any position (on any number of ranks with the same global batch) gives the same crops. One fixed block
of uniforms per crop (`_COLS`) is read by vectorised rules:

* windows: torchvision's RandomResizedCrop.get_params (10 tries of area U(scale) x log-uniform aspect,
  the first that fits, position uniform over the valid anchors; else the centre-crop fallback);
* recipes as the original draws them (augment_config.py): weak/strong per image and per local crop;
* weak: flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur (p by recipe, sigma
  U(0.1, 2)), solarize (p by recipe); strong: flip 0.5, timm RandAugment (n ops drawn with replacement,
  each applied with p=0.5, magnitude N(m, mstd) clipped to [0, 10], sign +-1), random erasing (re_prob,
  timm's rectangle rule) with a per-crop noise key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .augment_config import RRC_RATIO, AugmentConfig

WEAK_GLOBAL_1, WEAK_GLOBAL_2, WEAK_LOCAL, STRONG = 0, 1, 2, 3  # recipe kinds
BLUR_P = np.array([1.0, 0.1, 0.5, 0.0])  # by kind
SOLARIZE_P = np.array([0.0, 0.2, 0.0, 0.0])
RA_OPS = 15  # timm's suites (inc0 and inc1) have 15 ops each
MAX_RA_LAYERS = 8
ERASE_AREA, ERASE_ASPECT = (0.02, 1.0 / 3.0), 0.3  # timm RandomErasing defaults
_SALT = 0x6D756773  # "mugs": these draws' stream, apart from any other use of (seed, epoch, position)

# columns of the per-crop uniform block
_AREA, _RATIO, _POS_Y, _POS_X, _FLIP = slice(0, 10), slice(10, 20), 20, 21, 22
_JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY = 23, 24, 25, 26, 27, 28
_BLUR, _SIGMA, _SOLARIZE = 29, 30, 31
_RA = 32  # 3 columns per layer: op, apply, sign (32..55)
_ERASE, _E_AREA, _E_RATIO, _E_TOP, _E_LEFT = 64, slice(65, 75), slice(75, 85), 85, 86
_LOCAL_WEAK = 95
_COLS = 96


@dataclass
class CropDraws:
    """Draws of one crop size, crop-major: arrays are [n crops, B] (+ trailing dims)."""

    kind: np.ndarray  # int recipe kind
    window: np.ndarray  # [n, B, 4] (y0, x0, h, w) in pixels of the original image
    flip: np.ndarray  # bool
    jitter: np.ndarray  # [n, B, 4] brightness, contrast, saturation, hue (identity 1, 1, 1, 0)
    gray: np.ndarray  # bool
    blur_sigma: np.ndarray  # 0: no blur
    solarize: np.ndarray  # bool
    ra_op: np.ndarray  # [n, B, layers] op index, -1: none
    ra_level: np.ndarray  # [n, B, layers] in [0, 10]
    ra_sign: np.ndarray  # [n, B, layers] +-1
    erase: np.ndarray  # [n, B, 4] pixel (top, left, h, w) in the crop; h = 0: not erased
    noise_key: np.ndarray  # [n, B] int64 key of the erasing noise


@dataclass
class BatchDraws:
    weak: np.ndarray  # [B] bool: the student's globals are weak
    groups: dict  # "global" / "local" -> CropDraws


def sample_uniforms(seed: int, epoch: int, positions: np.ndarray, crops: int):
    """Per sample: one uniform (its weak flag), [crops, _COLS] uniforms and [crops, MAX_RA_LAYERS] normals."""
    s, u, z = [], [], []
    for p in positions:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(p), _SALT])
        s.append(rng.random())
        u.append(rng.random((crops, _COLS)))
        z.append(rng.standard_normal((crops, MAX_RA_LAYERS)))
    return np.asarray(s), np.stack(u), np.stack(z)


def rrc_windows(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale, ratio=RRC_RATIO) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorised: u [B, n, _COLS], sizes [B] -> [B, n, 4] (i, j, h, w)."""
    H = heights.astype(np.float64)[:, None, None]
    W = widths.astype(np.float64)[:, None, None]
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., _AREA])
    aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., _RATIO])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = np.argmax(ok, axis=-1)[..., None]
    found = ok.any(axis=-1)
    w = np.take_along_axis(w, first, -1)[..., 0]
    h = np.take_along_axis(h, first, -1)[..., 0]
    H2, W2 = H[..., 0], W[..., 0]
    # torch.randint(0, H - h + 1): uniform over the valid anchors
    i = np.floor(u[..., _POS_Y] * (H2 - h + 1))
    j = np.floor(u[..., _POS_X] * (W2 - w + 1))
    # fallback: the whole image, cut to the ratio range, centred
    in_ratio = W2 / H2
    fw = np.where(in_ratio < ratio[0], W2, np.where(in_ratio > ratio[1], np.round(H2 * ratio[1]), W2))
    fh = np.where(in_ratio < ratio[0], np.round(W2 / ratio[0]), H2)
    fh = np.broadcast_to(fh, w.shape)
    fw = np.broadcast_to(fw, w.shape)
    fi, fj = np.floor((H2 - fh) / 2), np.floor((W2 - fw) / 2)
    pick = [np.where(found, a, b) for a, b in ((i, fi), (j, fj), (h, fh), (w, fw))]
    return np.stack(pick, -1)


def erase_boxes(u: np.ndarray, on: np.ndarray, size: int) -> np.ndarray:
    """timm RandomErasing's rectangle (max_count 1) on a size x size crop: [..., 4] pixel (top, left, h, w);
    h = 0 where nothing is erased (not drawn, or none of the 10 tries fits)."""
    lo, hi = math.log(ERASE_ASPECT), math.log(1.0 / ERASE_ASPECT)
    area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[..., _E_AREA]) * size * size
    aspect = np.exp(lo + (hi - lo) * u[..., _E_RATIO])
    eh = np.round(np.sqrt(area * aspect))
    ew = np.round(np.sqrt(area / aspect))
    ok = (eh < size) & (ew < size) & (eh > 0) & (ew > 0)
    first = np.argmax(ok, axis=-1)[..., None]
    found = ok.any(axis=-1) & on
    eh = np.take_along_axis(eh, first, -1)[..., 0]
    ew = np.take_along_axis(ew, first, -1)[..., 0]
    top = np.floor(u[..., _E_TOP] * (size - eh + 1))  # random.randint(0, size - eh)
    left = np.floor(u[..., _E_LEFT] * (size - ew + 1))
    box = np.stack([top, left, eh, ew], -1)
    box[~found] = 0
    return box.astype(np.int64)


def draw_batch(
    aug: AugmentConfig,
    seed: int,
    epoch: int,
    positions: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    uniforms: tuple | None = None,
) -> BatchDraws:
    """The draws of the samples at global `positions` of `epoch` (images of heights x widths pixels)."""
    B = len(positions)
    ng = 2 if aug.vanilla_weak_augmentation else 4
    nl = aug.local_crops_number
    s, u, z = uniforms if uniforms is not None else sample_uniforms(seed, epoch, positions, ng + nl)
    if aug.vanilla_weak_augmentation:
        weak = np.ones(B, dtype=bool)
    else:
        weak = s < aug.student_weak_prob
    gk = np.empty((B, ng), dtype=np.int64)
    gk[:, 0], gk[:, 1] = WEAK_GLOBAL_1, WEAK_GLOBAL_2
    if ng == 4:
        gk[:, 2] = np.where(weak, WEAK_GLOBAL_1, STRONG)
        gk[:, 3] = np.where(weak, WEAK_GLOBAL_2, STRONG)
    lk = np.where(u[:, ng:, _LOCAL_WEAK] < aug.local_weak_prob, WEAK_LOCAL, STRONG)
    groups = {
        "global": _group(
            aug,
            u[:, :ng],
            z[:, :ng],
            gk,
            heights,
            widths,
            aug.global_crops_scale,
            aug.global_size,
            seed,
            epoch,
            positions,
            0,
        )
    }
    if nl:
        groups["local"] = _group(
            aug,
            u[:, ng:],
            z[:, ng:],
            lk,
            heights,
            widths,
            aug.local_crops_scale,
            aug.local_size,
            seed,
            epoch,
            positions,
            ng,
        )
    return BatchDraws(weak=weak, groups=groups)


def _group(aug, u, z, kind, heights, widths, scale, size, seed, epoch, positions, first_crop) -> CropDraws:
    """One crop size's draws, transposed to crop-major [n, B]."""
    policy = aug.policy
    strong = kind == STRONG
    weak = ~strong
    window = rrc_windows(u, heights, widths, scale)
    flip = u[..., _FLIP] < 0.5
    on = weak & (u[..., _JITTER] < 0.8)
    jitter = np.stack(
        [
            np.where(on, 0.6 + 0.8 * u[..., _BRIGHT], 1.0),
            np.where(on, 0.6 + 0.8 * u[..., _CONTRAST], 1.0),
            np.where(on, 0.8 + 0.4 * u[..., _SAT], 1.0),
            np.where(on, -0.1 + 0.2 * u[..., _HUE], 0.0),
        ],
        -1,
    )
    gray = weak & (u[..., _GRAY] < 0.2)
    blur = u[..., _BLUR] < BLUR_P[kind]
    sigma = np.where(blur, 0.1 + 1.9 * u[..., _SIGMA], 0.0)
    solarize = u[..., _SOLARIZE] < SOLARIZE_P[kind]
    layers = policy.num_ops
    if layers > MAX_RA_LAYERS:
        raise ValueError(f"RandAugment with {layers} ops: at most {MAX_RA_LAYERS} are supported")
    cols = _RA + 3 * np.arange(layers)
    op = np.minimum((u[..., cols] * RA_OPS).astype(np.int64), RA_OPS - 1)
    applied = strong[..., None] & (u[..., cols + 1] < 0.5)
    op = np.where(applied, op, -1)
    sign = np.where(u[..., cols + 2] < 0.5, 1.0, -1.0)
    level = policy.magnitude + (policy.magnitude_std * z[..., :layers] if policy.magnitude_std > 0 else 0.0)
    level = np.clip(np.broadcast_to(level, op.shape), 0.0, 10.0)
    erase = erase_boxes(u, strong & (u[..., _ERASE] < aug.re_prob), size)
    n = kind.shape[1]
    key = (np.asarray(positions, dtype=np.int64)[:, None] * 64 + first_crop + np.arange(n)[None, :]) * 1_000_003
    key = (key + (int(seed) % 1_000_033) * 7919 + int(epoch) * 104_729) & 0x7FFFFFFF
    T = lambda a: np.ascontiguousarray(np.swapaxes(a, 0, 1))  # noqa: E731  [B, n, ...] -> [n, B, ...]
    return CropDraws(
        kind=T(kind),
        window=T(window),
        flip=T(flip),
        jitter=T(jitter),
        gray=T(gray),
        blur_sigma=T(sigma),
        solarize=T(solarize),
        ra_op=T(op),
        ra_level=T(level),
        ra_sign=T(sign),
        erase=T(erase),
        noise_key=T(key),
    )
