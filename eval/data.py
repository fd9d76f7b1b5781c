"""Images for evaluation: ImageFolder datasets and the protocol's transforms (plain torchvision/timm).

Evaluation views are the DINO/Mugs ones: bicubic resize of the short side to 256,
centre crop 224, ImageNet normalisation (both sizes are options so that tests
can use 32-px images). Linear-probe training views are Mugs' (`strong`): flip,
RandAugment rand-m9-mstd0.5-inc1 on the image, RandomResizedCrop(0.08-1, bicubic),
random erasing 0.25 (pixel noise); `simple` is DINO's RandomResizedCrop + flip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchvision import datasets, transforms

from ..core.errors import DataError, first_line
from ..pipeline.augment_config import IMAGENET_MEAN, IMAGENET_STD
from ..pipeline.labelled import eval_transform  # noqa: F401 - shared with the training run's k-NN monitor
from ..pipeline.tv_transforms import with_safe_posterize

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
BICUBIC = transforms.InterpolationMode.BICUBIC


def train_transform(crop: int = 224, kind: str = "strong") -> transforms.Compose:
    """Linear-probe training views: `strong` (Mugs' scripts) or `simple` (DINO's)."""
    if kind == "simple":
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(crop, interpolation=BICUBIC),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )
    if kind != "strong":
        raise ValueError(f"unknown training augmentation {kind!r} (strong or simple)")
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing

    hparams = dict(translate_const=int(crop * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in MEAN))
    randaug = with_safe_posterize(rand_augment_transform("rand-m9-mstd0.5-inc1", hparams))
    return transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            randaug,
            transforms.RandomResizedCrop(crop, scale=(0.08, 1.0), interpolation=BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
            RandomErasing(0.25, mode="pixel", max_count=1, device="cpu"),
        ]
    )


class _ClassSubset(datasets.ImageFolder):
    """ImageFolder restricted to some class folders (labels follow the given order)."""

    def __init__(self, root: str, classes: Sequence[str], **kw):
        self._wanted = list(classes)
        super().__init__(root, **kw)

    def find_classes(self, directory):
        found = {p.name for p in Path(directory).iterdir() if p.is_dir()}
        absent = [c for c in self._wanted if c not in found]
        if absent:
            raise DataError(
                f"{directory}: no class folder {', '.join(absent)} (found: {', '.join(sorted(found)[:10])})"
            )
        return self._wanted, {c: i for i, c in enumerate(self._wanted)}


def image_folder(root: str | Path, transform=None, classes: Sequence[str] | None = None) -> datasets.ImageFolder:
    """ImageFolder(root/<class>/<image>) with one-line errors for missing folders and empty data."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (expected {root}/<class>/<image>)")
    try:
        if classes:
            return _ClassSubset(str(root), classes, transform=transform)
        return datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:
        raise DataError(f"{root}: no images ({first_line(e)}; expected {root}/<class>/<image>)") from None


def train_val_dirs(train: str | None, val: str | None, data_path: str | None) -> tuple[Path, Path]:
    """--train/--val, or --data_path ROOT holding train/ and val/."""
    if train and val:
        return Path(train), Path(val)
    if data_path:
        return Path(data_path) / "train", Path(data_path) / "val"
    raise DataError("give --data_path ROOT (with ROOT/train and ROOT/val) or both --train DIR and --val DIR")


def check_same_classes(train: datasets.ImageFolder, val: datasets.ImageFolder) -> None:
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))[:5]
        only_v = sorted(set(val.classes) - set(train.classes))[:5]
        raise DataError(f"train and val class folders differ (only in train: {only_t}, only in val: {only_v})")
