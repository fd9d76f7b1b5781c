"""timm-style RandAugment (`rand-m9-mstd0.5-inc1`) as DALI graph code, for the strong branch.

DALI's stock `auto_aug.rand_augment` differs from timm's, which the original uses: timm
applies each of the n chosen ops only with probability 0.5, picks them without
replacement, draws the magnitude per op from N(m, mstd) clipped to [0, 10], and its
suites have invert and solarize-add but no identity. We rebuild timm's policy: per layer a
per-sample op index, level and sign; a fixed binary split of the batch routes each sample
to its op (the image ops are DALI's public `auto_aug.augmentations` bodies), whose parameter
is computed from the level with the timm formula. Needs `enable_conditionals=True`.

Known differences from the original (PIL): RandAugment runs on the already-cut crop
(the original runs it on the full image before RandomResizedCrop), so translate is
`strong_ratio` x crop size and rotation corners fall inside the crop; warps use bilinear
interpolation and a grey fill; equalize follows OpenCV; consecutive ops differ but with
n > 2 an op may repeat.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as A
from nvidia.dali.pipeline import do_not_convert

from mugs.pipeline.augment_config import IMAGENET_MEAN, RandAugmentPolicy
from mugs.pipeline.randaug import OP_NAMES  # timm's op order, stated once

MAX_LEVEL = 10.0
NUM_OPS = len(OP_NAMES)  # both timm suites (inc0 and inc1) have 15 ops
FILL = int(round(255 * sum(IMAGENET_MEAN) / 3))  # grey near timm's img_mean fill
# ImageOps.posterize(img, bits) keeps the top `bits` bits: the AND mask for bits = 0..8
_POSTER_MASKS = np.array([(0xFF << (8 - b)) & 0xFF for b in range(9)], dtype=np.uint8)


class _Params:
    """Per-sample level in [0, 10] and sign (+-1) of one RandAugment layer, plus static settings."""

    def __init__(self, level, sign, increasing: bool, translate_px: float):
        self.level, self.sign = level, sign
        self.increasing, self.translate_px = increasing, translate_px

    def signed(self, scale: float):
        return self.level * (scale / MAX_LEVEL) * self.sign

    def enhance(self):
        """ColorIncreasing etc.: 1 +- 0.9 level/10; plain Color etc.: 0.1 + 1.8 level/10."""
        if self.increasing:
            return 1.0 + self.signed(0.9)
        return 0.1 + self.level * (1.8 / MAX_LEVEL)


def _device_like(node, data):
    return node.gpu() if data.device == "gpu" else node


def _uint8(node, data):
    return _device_like(fn.cast(node, dtype=types.UINT8), data)


def _pair(first, second):
    return fn.stack(first, second)


@do_not_convert
def _apply(op: int, x, p: _Params):
    """timm's op `OP_NAMES[op]` with its level-to-argument rule, on DALI."""
    warp = dict(fill_value=FILL, interp_type=types.INTERP_LINEAR)
    zero = p.sign * 0.0
    name = OP_NAMES[op]
    if name == "AutoContrast":
        return A.auto_contrast.op(x, None)
    if name == "Equalize":
        return fn.equalize(x)  # OpenCV-style histogram equalisation
    if name == "Invert":
        return A.invert.op(x, None)
    if name == "Rotate":
        return A.rotate.op(x, p.signed(30.0), **warp)
    if name == "Posterize":
        bits = p.level * (4.0 / MAX_LEVEL)  # timm: int(level / 10 * 4), "increasing" keeps 4 - that
        bits = fn.cast(dmath.floor(bits), dtype=types.INT32)
        if p.increasing:
            bits = 4 - bits
        return A.posterize.op(x, _device_like(types.Constant(_POSTER_MASKS)[bits], x))
    if name == "Solarize":
        thresh = dmath.floor(p.level * (256.0 / MAX_LEVEL))
        if p.increasing:
            thresh = 256.0 - thresh
        thresh = _device_like(fn.cast(thresh, dtype=types.INT32), x)
        return A.solarize.op(x, thresh)
    if name == "SolarizeAdd":
        return A.solarize_add.op(x, _uint8(dmath.floor(p.level * (110.0 / MAX_LEVEL)), x))
    if name == "Color":
        return A.color.op(x, p.enhance())
    if name == "Contrast":
        return A.contrast.op(x, _device_like(p.enhance(), x))
    if name == "Brightness":
        return A.brightness.op(x, p.enhance())
    if name == "Sharpness":
        # PIL: blend of the image with its 3x3 smoothed version by factor f
        f = p.enhance()
        blur = types.Constant(np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13)
        ident = types.Constant(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32))
        return fn.filter(x, _device_like((1.0 - f) * blur + f * ident, x))
    if name == "ShearX":
        return A.shear_x.op(x, _pair(p.signed(0.3), zero), **warp)
    if name == "ShearY":
        return A.shear_y.op(x, _pair(zero, p.signed(0.3)), **warp)
    if name == "TranslateXRel":
        return A.translate_x_no_shape.op(x, _pair(p.signed(p.translate_px), zero), **warp)
    if name == "TranslateYRel":
        return A.translate_y_no_shape.op(x, _pair(zero, p.signed(p.translate_px)), **warp)
    raise ValueError(name)


@do_not_convert
def _layer_params(policy: RandAugmentPolicy, prev_idx, translate_px: float):
    if prev_idx is None:
        idx = fn.random.uniform(values=list(range(NUM_OPS)), dtype=types.INT32)
    else:  # a different op than the previous layer's (timm draws without replacement)
        idx = (prev_idx + 1 + fn.random.uniform(values=list(range(NUM_OPS - 1)), dtype=types.INT32)) % NUM_OPS
    sign = fn.random.uniform(values=[-1.0, 1.0])
    if policy.magnitude_std > 0:
        level = fn.random.normal(mean=policy.magnitude, stddev=policy.magnitude_std)
        level = dmath.clamp(level, 0.0, MAX_LEVEL)
    else:  # a per-sample node holding the constant level
        level = sign * 0.0 + min(max(policy.magnitude, 0.0), MAX_LEVEL)
    apply = fn.random.coin_flip(probability=0.5, dtype=types.BOOL)  # timm AugmentOp prob=0.5
    return idx, _Params(level, sign, policy.increasing, translate_px), apply


def rand_augment(images, policy: RandAugmentPolicy, crop_size: int, translate_frac: float):
    """Apply the policy to a batch of HWC uint8 crops of side `crop_size`."""
    prev = None
    for _ in range(policy.num_ops):
        idx, params, apply = _layer_params(policy, prev, translate_frac * crop_size)
        if apply:
            images = _select(idx, images, params)
        prev = idx
    return images


def _select(i, x, p: _Params):
    """OP_NAMES[i](x) per sample: a fixed 4-level binary split of the batch over the 15 ops.

    Written out, not recursive: AutoGraph's per-call cost made the recursive form slow to build.
    DataNodes in `p` are split with the batch when an op inside a branch consumes them.
    """
    if i < 8:
        if i < 4:
            if i < 2:
                if i < 1:
                    x = _apply(0, x, p)
                else:
                    x = _apply(1, x, p)
            else:
                if i < 3:
                    x = _apply(2, x, p)
                else:
                    x = _apply(3, x, p)
        else:
            if i < 6:
                if i < 5:
                    x = _apply(4, x, p)
                else:
                    x = _apply(5, x, p)
            else:
                if i < 7:
                    x = _apply(6, x, p)
                else:
                    x = _apply(7, x, p)
    else:
        if i < 12:
            if i < 10:
                if i < 9:
                    x = _apply(8, x, p)
                else:
                    x = _apply(9, x, p)
            else:
                if i < 11:
                    x = _apply(10, x, p)
                else:
                    x = _apply(11, x, p)
        else:
            if i < 14:
                if i < 13:
                    x = _apply(12, x, p)
                else:
                    x = _apply(13, x, p)
            else:
                x = _apply(14, x, p)
    return x
