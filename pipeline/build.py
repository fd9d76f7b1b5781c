"""The trainer's entry points: `build_loader(aug, data, ...)` and `build_loader_from_config(cfg, ...)`."""

from __future__ import annotations

from typing import Any

import torch

from ..configs.views import LoaderConfig
from .augment_config import AugmentConfig
from .files import load_index
from .loader_base import MultiCropLoader


def build_loader(
    aug: AugmentConfig,
    data: LoaderConfig,
    *,
    rank: int,
    world_size: int,
    device: Any,
    dtype: torch.dtype,
    debug: bool = False,
    device_id: int | None = None,
) -> MultiCropLoader:
    """A multi-crop loader over an ImageFolder root or a mugs-scan-data file list.

    backend "dali": DALI pipelines (GPU decode when device is cuda; CPU graph otherwise),
    num_threads = DALI threads. backend "torchvision": PIL transforms, num_threads = DataLoader
    worker processes. `debug` (DALI) adds crop windows to each batch.
    """
    index = load_index(data.data_path)
    common = dict(
        batch_size=data.batch_size,
        rank=rank,
        world_size=world_size,
        seed=data.seed,
        device=device,
        dtype=dtype,
        skip_unreadable=data.skip_unreadable,
    )
    if data.backend == "dali":
        from .dali_loader import DaliLoader  # DALI is an optional dependency

        return DaliLoader(index, aug, num_threads=data.num_threads, device_id=device_id, debug=debug, **common)
    if data.backend == "torchvision":
        from .tv_loader import TorchvisionLoader

        return TorchvisionLoader(index, aug, num_workers=data.num_threads, **common)
    raise ValueError(f"unknown loader backend {data.backend!r} (dali or torchvision)")


def build_loader_from_config(cfg, rank: int, world_size: int, device: Any, dtype: torch.dtype) -> MultiCropLoader:
    """The loader a MugsConfig (configs/options.py) describes."""
    return build_loader(
        AugmentConfig.from_config(cfg), cfg.loader_view(), rank=rank, world_size=world_size, device=device, dtype=dtype
    )
