"""The original's multi-crop augmentation on PIL/torchvision (for the comparison loader).

Follows src/multicropdataset.py of the original: teacher = weak recipe 1 + weak recipe 2;
student globals = the teacher's crops (vanilla), or per image two weak crops with probability
`prob` else two strong crops; each local crop weak with probability `prob` else strong. The
strong branch is the original's order: flip, timm RandAugment on the full image, then
RandomResizedCrop (bicubic), normalise, random erasing (on normalised data, timm's intent).
RandAugment's translate is `strong_ratio` of the image it is applied to (timm translate_pct).
"""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from .augment_config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig


class GaussianBlur:
    def __init__(self, p: float, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def _weak(size: int, scale, blur_p: float, solarize_p: float = 0.0) -> T.Compose:
    ops = [
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
        GaussianBlur(blur_p),
    ]
    if solarize_p > 0:
        ops.append(Solarize(solarize_p))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def posterize(img: Image.Image, bits: int, **_) -> Image.Image:
    """timm's posterize, with bits=0 giving a black image as old Pillow did (new Pillow raises;
    PosterizeIncreasing reaches 0 bits when the level is clipped at 10)."""
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def with_safe_posterize(randaug):
    """timm's RandAugment transform with its posterize ops replaced by `posterize` (also used by eval)."""
    for op in randaug.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return randaug


def _rand_augment(aug: AugmentConfig):
    from timm.data.auto_augment import rand_augment_transform

    hparams = dict(translate_pct=aug.strong_ratio, img_mean=tuple(round(255 * m) for m in IMAGENET_MEAN))
    return with_safe_posterize(rand_augment_transform(aug.timm_auto_augment_par, hparams))


def _strong(size: int, scale, aug: AugmentConfig) -> T.Compose:
    from timm.data.random_erasing import RandomErasing

    ops = [
        T.RandomHorizontalFlip(0.5),
        _rand_augment(aug),
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    if aug.re_prob > 0:
        ops.append(RandomErasing(aug.re_prob, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(ops)


class MultiCropTransform:
    """image -> (crops in the original's order, minus the student globals under vanilla), weak_flag."""

    def __init__(self, aug: AugmentConfig):
        G, L = aug.global_size, aug.local_size
        self.aug = aug
        self.global1 = _weak(G, aug.global_crops_scale, 1.0)
        self.global2 = _weak(G, aug.global_crops_scale, 0.1, 0.2)
        self.global_strong = _strong(G, aug.global_crops_scale, aug)
        self.local_weak = _weak(L, aug.local_crops_scale, 0.5)
        self.local_strong = _strong(L, aug.local_crops_scale, aug)

    def __call__(self, img: Image.Image) -> tuple[list[torch.Tensor], bool]:
        aug = self.aug
        crops = [self.global1(img), self.global2(img)]
        weak = True
        if not aug.vanilla_weak_augmentation:
            weak = random.random() < aug.student_weak_prob
            if weak:
                crops += [self.global1(img), self.global2(img)]
            else:
                crops += [self.global_strong(img), self.global_strong(img)]
        for _ in range(aug.local_crops_number):
            crops.append(self.local_weak(img) if random.random() < aug.local_weak_prob else self.local_strong(img))
        return crops, weak
