"""The multi-crop recipe's settings, validated once and shared by the DALI and torchvision loaders.

The augmentation view of a MugsConfig (`AugmentConfig.from_config`): names are the original
Mugs flags, defaults live in configs/options.py only. What the original
does with them (src/multicropdataset.py), which both loaders follow:
  * teacher: weak global recipe 1 and weak global recipe 2, one crop each;
  * student globals: with `vanilla_weak_augmentation` the teacher's two crops themselves;
    else, per image, two fresh weak crops (recipe 1, recipe 2) with probability `prob`
    (weak_flag = True), otherwise two independent strong crops;
  * each local crop independently weak with probability `prob`, else strong (the original
    uses `prob` here too, 0.5 by default; `vanilla_weak_augmentation` does not change this).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, replace

from ..configs.field_meta import range_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class RandAugmentPolicy:
    """timm's `rand-...` string: n ops per image, magnitude m (of 10) with noise std, increasing suite."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    increasing: bool = False

    @classmethod
    def parse(cls, spec: str) -> RandAugmentPolicy:
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"only RandAugment policies ('rand-...') are supported, got {spec!r}")
        policy = cls(magnitude=10.0)  # timm's default magnitude when 'm' is absent
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)([\d.]+)", part)
            if not m:
                raise ValueError(f"cannot read {part!r} in RandAugment policy {spec!r}")
            key, val = m.groups()
            if key == "m":
                policy = replace(policy, magnitude=float(val))
            elif key == "n":
                policy = replace(policy, num_ops=int(val))
            elif key == "mstd":
                policy = replace(policy, magnitude_std=float(val))
            elif key == "inc":
                policy = replace(policy, increasing=bool(int(val)))
            else:
                raise ValueError(f"RandAugment option {key!r} in {spec!r} is not supported (m, n, mstd, inc)")
        return policy


@dataclass(frozen=True)
class AugmentConfig:
    global_size: int  # --img_size
    local_size: int  # --size_crops
    local_crops_number: int
    global_crops_scale: tuple[float, float]
    local_crops_scale: tuple[float, float]
    prob: float
    vanilla_weak_augmentation: bool
    re_prob: float
    timm_auto_augment_par: str
    strong_ratio: float

    # this view's fields -> the MugsConfig flags whose ranges they take
    FLAGS = {
        "global_size": "img_size",
        "local_size": "size_crops",
        "global_crops_scale": "global_crops_scale",
        "local_crops_scale": "local_crops_scale",
        "prob": "prob",
        "re_prob": "re_prob",
        "strong_ratio": "strong_ratio",
    }

    @classmethod
    def from_config(cls, cfg) -> AugmentConfig:
        """The view of a MugsConfig (configs/options.py)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("global_size", "local_size")]
        return cls(global_size=cfg.img_size, local_size=cfg.local_crop_size, **{n: getattr(cfg, n) for n in names})

    def __post_init__(self) -> None:
        """Each field within the range its flag states (configs/options.py), then the view's own rules."""
        for name, flag in self.FLAGS.items():
            msg = range_error(flag, getattr(self, name))
            if msg is not None:
                raise ValueError(msg)
        if self.local_crops_number < 0:  # the loader takes 0 (tests); training needs >= 1 (its flag's range)
            raise ValueError("local_crops_number must be >= 0")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"--{name} {lo} {hi}: min must not exceed max")
            object.__setattr__(self, name, (float(lo), float(hi)))
        _ = self.policy  # validate the RandAugment string early

    @property
    def policy(self) -> RandAugmentPolicy:
        return RandAugmentPolicy.parse(self.timm_auto_augment_par)

    @property
    def student_weak_prob(self) -> float:
        """P(student globals weak): 1 if vanilla or prob >= 1, as in the original."""
        return 1.0 if self.vanilla_weak_augmentation or self.prob >= 1.0 else self.prob

    @property
    def local_weak_prob(self) -> float:
        return 1.0 if self.prob >= 1.0 else self.prob
