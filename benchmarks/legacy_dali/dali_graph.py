"""The Mugs multi-crop recipe as two small DALI graphs: a cutter and an augmenter.

Why two: DALI runs one batch per operator, so one graph that treats each of the 4 + n crops
separately holds 4 + n copies of every augmentation (thousands of operators with RandAugment,
~50-100 us of executor overhead each per step, and a build of many seconds). Instead:

* the **cutter** (one per rank) reads and decodes each image once and cuts all its crops with
  RandomResizedCrop (torchvision's window rule, bicubic): uint8 HWC, G- and L-sized;
* the **augmenter** (one per crop size) gets all crops of that size as ONE batch (crop-major:
  sample c * B + b is crop c of image b) plus a per-crop recipe `kind` (drawn by the loader),
  and applies the recipe with DALI conditionals, so blur, solarize and the strong branch
  (RandAugment) run only on the crops that draw them. Random erasing of strong crops is done
  afterwards in torch (erasing.py): on DALI's CPU backend it cost more than RandAugment.

Flips are folded into the final crop_mirror_normalize (a flip commutes with every later op up
to the symmetric distributions of RandAugment and erasing). Colour jitter and random grayscale
are one `color_twist` (grayscale = saturation 0); jitter order is fixed (brightness, contrast,
saturation, hue) where torchvision shuffles it. The same graphs run on the GPU
(`decode_device="mixed"`, augmenter on "gpu") or on the CPU (`device_id=None`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import do_not_convert

from mugs.pipeline.augment_config import IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, AugmentConfig

from .dali_randaug import rand_augment

READER_NAME = "Reader"
RESIZE = dict(interp_type=types.INTERP_CUBIC, antialias=True)
# recipe kinds fed to the augmenter, one per crop
WEAK_GLOBAL_1, WEAK_GLOBAL_2, WEAK_LOCAL, STRONG = 0, 1, 2, 3
_BLUR_P = (1.0, 0.1, 0.5, 0.0)  # by kind
_SOLARIZE_P = (0.0, 0.2, 0.0, 0.0)
_SOLARIZE_LUT = [k if k < 128 else 255 - k for k in range(256)]  # PIL ImageOps.solarize(128)

# Helpers without per-sample conditionals are kept out of AutoGraph (`do_not_convert`):
# converting them adds build time and nothing else.


@do_not_convert
def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[float(lo), float(hi)])


@do_not_convert
def _resized_crop(image, shape, size: int, scale, debug: bool):
    """RandomResizedCrop, bicubic; window = (y0, x0, h, w) / (H, W) when debugging."""
    anchor, extent = fn.random_crop_generator(shape, random_area=list(scale), random_aspect_ratio=list(RRC_RATIO))
    anchor = fn.cast(anchor, dtype=types.FLOAT)
    extent = fn.cast(extent, dtype=types.FLOAT)
    crop = fn.resize(image, size=[size, size], roi_start=anchor, roi_end=anchor + extent, **RESIZE)
    window = None
    if debug:
        hw = fn.cast(shape, dtype=types.FLOAT)[0:2]
        window = fn.cat(anchor / hw, extent / hw)
    return crop, window


@pipeline_def
def cutter_pipeline(
    files: Sequence[str], num_global: int, num_local: int, cfg: AugmentConfig, decode_device: str, debug: bool = False
):
    """Outputs: position in `files`, num_global G-crops, num_local L-crops[, windows [crops, 4]].

    `files` is read in the given order: sharding and shuffling are the caller's.
    """
    jpegs, position = fn.readers.file(
        files=list(files),
        labels=list(range(len(files))),
        random_shuffle=False,
        name=READER_NAME,
    )
    image = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    shape = fn.peek_image_shape(jpegs)
    crops, windows = [], []
    for i in range(num_global + num_local):
        size, scale = (
            (cfg.global_size, cfg.global_crops_scale) if i < num_global else (cfg.local_size, cfg.local_crops_scale)
        )
        crop, window = _resized_crop(image, shape, size, scale, debug)
        crops.append(crop)
        windows.append(window)
    outputs = [position] + crops
    if debug:
        outputs.append(fn.stack(*windows))
    return tuple(outputs)


@do_not_convert
def _color(crop):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, then RandomGrayscale(p=0.2), as one color_twist."""
    on = fn.cast(fn.random.coin_flip(probability=0.8), dtype=types.FLOAT)
    brightness = 1.0 + on * (_uniform(0.6, 1.4) - 1.0)
    contrast = 1.0 + on * (_uniform(0.6, 1.4) - 1.0)
    saturation = 1.0 + on * (_uniform(0.8, 1.2) - 1.0)
    hue = on * _uniform(-36.0, 36.0)  # degrees: torchvision hue 0.1 of a full turn
    saturation = saturation * (1.0 - fn.cast(fn.random.coin_flip(probability=0.2), dtype=types.FLOAT))
    return fn.color_twist(crop, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)


_TAPS = np.arange(-6, 7, dtype=np.float32) ** 2  # 13 taps: 3 sigma of the largest sigma (2.0)


@do_not_convert
def _blur(crop):
    """Gaussian blur, sigma U(0.1, 2): two 1-D passes of `fn.filter` (3x cheaper than
    `fn.gaussian_blur` on the CPU, which matters as ~4 of the 14 crops of an image draw it)."""
    sigma = _uniform(0.1, 2.0)
    k = dmath.exp(types.Constant(_TAPS) / (sigma * sigma * -2.0))
    k = k / fn.reductions.sum(k)
    if crop.device == "gpu":
        k = k.gpu()
    return fn.filter(fn.filter(crop, fn.reshape(k, shape=[1, 13])), fn.reshape(k, shape=[13, 1]))


@do_not_convert
def _solarize(crop):
    return fn.lookup_table(crop, keys=list(range(256)), values=_SOLARIZE_LUT, dtype=types.UINT8)


@do_not_convert
def _normalize(crop):
    return fn.crop_mirror_normalize(
        crop,
        dtype=types.FLOAT,
        output_layout="CHW",
        mirror=fn.random.coin_flip(probability=0.5),
        mean=[255.0 * m for m in IMAGENET_MEAN],
        std=[255.0 * s for s in IMAGENET_STD],
    )


@do_not_convert
def _draw(kind, table):
    """A per-sample coin whose probability depends on the crop's recipe kind."""
    p = types.Constant(np.array(table, dtype=np.float32))[kind]
    return fn.random.uniform(range=[0.0, 1.0]) < p


@pipeline_def(enable_conditionals=True)
def augment_pipeline(cfg: AugmentConfig, size: int, device: str):
    """Inputs (fed per step): "crops" uint8 HWC size x size, "kinds" int32 recipe per crop.

    Output: normalised float32 CHW crops, in the input order.
    """
    crops = fn.external_source(name="crops", device=device, dtype=types.UINT8, ndim=3, layout="HWC")
    kind = fn.external_source(name="kinds", device="cpu", dtype=types.INT32, ndim=0)
    if kind == STRONG:  # random erasing follows in torch (erasing.py): far cheaper than on DALI's CPU
        out = _normalize(rand_augment(crops, cfg.policy, size, cfg.strong_ratio))
    else:
        img = _color(crops)
        if _draw(kind, _BLUR_P):
            img = _blur(img)
        if _draw(kind, _SOLARIZE_P):
            img = _solarize(img)
        out = _normalize(img)
    return out
