"""The trainer's entry points: `build_loader(...)` and `build_loader_from_config(cfg, ...)`."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .augment_config import AugmentConfig
from .files import load_index
from .loader_base import MultiCropLoader


def build_loader(backend: str = "dali", data_path: str = "", batch_size: int = 64, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: Any = "cpu", num_threads: int = 4,
                 dtype: torch.dtype = torch.float32, global_size: int = 224, local_size: int = 96,
                 local_crops_number: int = 10, global_crops_scale: Tuple[float, float] = (0.25, 1.0),
                 local_crops_scale: Tuple[float, float] = (0.05, 0.25), prob: float = 0.5,
                 vanilla_weak_augmentation: bool = False, re_prob: float = 0.25,
                 timm_auto_augment_par: str = "rand-m9-mstd0.5-inc1", strong_ratio: float = 0.45,
                 debug: bool = False, device_id: Optional[int] = None) -> MultiCropLoader:
    """A multi-crop loader over an ImageFolder root or a mugs-scan-data file list.

    backend "dali": DALI pipelines (GPU decode when device is cuda; CPU graph otherwise),
    num_threads = DALI threads. backend "torchvision": PIL transforms, num_threads = DataLoader
    worker processes. `debug` (DALI) adds crop windows to each batch.
    """
    aug = AugmentConfig(
        global_size=global_size, local_size=local_size, local_crops_number=local_crops_number,
        global_crops_scale=tuple(global_crops_scale), local_crops_scale=tuple(local_crops_scale),
        prob=prob, vanilla_weak_augmentation=vanilla_weak_augmentation, re_prob=re_prob,
        timm_auto_augment_par=timm_auto_augment_par, strong_ratio=strong_ratio,
    )
    index = load_index(data_path)
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device, dtype=dtype)
    if backend == "dali":
        from .dali_loader import DaliLoader  # DALI is an optional dependency

        return DaliLoader(index, aug, num_threads=num_threads, device_id=device_id, debug=debug, **common)
    if backend == "torchvision":
        from .tv_loader import TorchvisionLoader

        return TorchvisionLoader(index, aug, num_workers=num_threads, **common)
    raise ValueError(f"unknown loader backend {backend!r} (dali or torchvision)")


def build_loader_from_config(cfg, rank: int, world_size: int, device: Any, dtype: torch.dtype) -> MultiCropLoader:
    """Map a MugsConfig (configs/options.py) onto build_loader."""
    return build_loader(
        backend=cfg.loader, data_path=cfg.data_path, batch_size=cfg.batch_size_per_gpu, rank=rank,
        world_size=world_size, seed=cfg.seed, device=device, num_threads=cfg.num_workers, dtype=dtype,
        global_size=cfg.img_size, local_size=int(cfg.size_crops[0]), local_crops_number=cfg.local_crops_number,
        global_crops_scale=tuple(cfg.global_crops_scale), local_crops_scale=tuple(cfg.local_crops_scale),
        prob=cfg.prob, vanilla_weak_augmentation=cfg.vanilla_weak_augmentation, re_prob=cfg.re_prob,
        timm_auto_augment_par=cfg.timm_auto_augment_par, strong_ratio=cfg.strong_ratio,
    )
