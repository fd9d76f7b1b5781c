"""Labelled images for the frozen-feature evaluations: the evaluation view, a map-style dataset over a
FileIndex (ImageFolder tree or mugs-scan-data file list, as the training loaders read them) and the
fixed per-class subset that `mugs-eval-knn --subset_per_class` and the training run's k-NN monitor
(`--knn_subset_per_class`) both take, so that the two pick the same images.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .augment_config import IMAGENET_MEAN, IMAGENET_STD
from .files import FileIndex

SUBSET_SEED = 0  # fixed: the subset does not depend on a run's --seed, so runs compare on the same images
BICUBIC = transforms.InterpolationMode.BICUBIC


def _geometry(resize: int, crop: int) -> list:
    return [transforms.Resize(resize, interpolation=BICUBIC), transforms.CenterCrop(crop)]


def _to_input() -> list:
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(resize: int = 256, crop: int = 224) -> transforms.Compose:
    """The DINO/Mugs evaluation view: bicubic resize of the short side, centre crop, ImageNet normalisation."""
    return transforms.Compose(_geometry(resize, crop) + _to_input())


def eval_view(img_size: int) -> tuple[int, int]:
    """(resize, crop) of the evaluation view at a training resolution: 256/224 at 224 px, scaled alike."""
    return round(img_size * 256 / 224), img_size


def subset_per_class(paths: Sequence[str], labels: Sequence[int], per_class: int) -> list[int]:
    """Indices of `per_class` images of each class (all of a smaller class; `per_class` <= 0: all images),
    in ascending index order. Chosen by a fixed seed among each class's paths in sorted order, so the
    choice depends only on the set of (path, label) pairs, not on how they were listed."""
    if per_class <= 0:
        return list(range(len(paths)))
    by_class = defaultdict(list)
    for i, (p, y) in enumerate(zip(paths, labels)):
        by_class[int(y)].append((str(p), i))
    keep = []
    for y in sorted(by_class):
        members = sorted(by_class[y])
        rng = random.Random(f"{SUBSET_SEED}:{y}:{len(members)}")  # its own generator: no global state drawn
        keep += [i for _, i in rng.sample(members, min(per_class, len(members)))]
    return sorted(keep)


class LabelledImages(Dataset):
    """(eval_transform view, label) of a FileIndex's images (optionally a subset of them), decoded with
    PIL as torchvision's ImageFolder does (RGB).

    `cache`: keep each image's resized and cropped pixels (uint8, crop x crop x 3 bytes: 150 KB at 224)
    after its first read, so that a set read again and again (the k-NN monitor's, every N epochs) is
    decoded once; ToTensor and Normalize run on the kept array, giving the very same tensor."""

    def __init__(self, index: FileIndex, view: tuple[int, int], keep: Sequence[int] = (), cache: bool = False):
        keep = list(keep) if keep else list(range(len(index)))
        self.paths = [index.paths[i] for i in keep]
        self.targets = [int(index.labels[i]) for i in keep]
        self.geometry = transforms.Compose(_geometry(*view))
        self.to_input = transforms.Compose(_to_input())
        self.cache: dict[int, np.ndarray] | None = {} if cache else None  # decoded geometry output by index

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        pixels = self.cache.get(i) if self.cache is not None else None
        if pixels is None:
            with open(self.paths[i], "rb") as f:
                pixels = np.asarray(self.geometry(Image.open(f).convert("RGB")), dtype=np.uint8).copy()
            if self.cache is not None:
                self.cache[i] = pixels
        return self.to_input(pixels), self.targets[i]
