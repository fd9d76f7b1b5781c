"""The comparison loader: torchvision/PIL transforms in a torch DataLoader with worker processes.

Same output contract, sharding and epoch order as the DALI loader (sharding.py); for machines
without DALI and for the benchmark. Every sample's random draws are seeded from
(seed, epoch, dataset index), so a batch does not depend on workers or on where iteration
started: resuming at batch k gives exactly the batches an uninterrupted epoch would have.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..core.errors import DataError
from .augment_config import AugmentConfig
from .batch import MultiCropBatch
from .files import MAX_IMAGE_PIXELS, FileIndex
from .loader_base import MultiCropLoader, unreadable_advice
from .sharding import derive_seed
from .tv_transforms import MultiCropTransform


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed python, numpy and torch (CPU) RNGs for one sample, then restore them: with
    num_workers=0 this runs in the trainer's process, whose RNG streams must not move."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)


class _EpochShard(Dataset):
    """Item i = the i-th image this rank reads in the epoch, from position `start` on."""

    def __init__(
        self,
        index: FileIndex,
        order: np.ndarray,
        transform: MultiCropTransform,
        seed: int,
        epoch: int,
        rank: int = 0,
        skip_unreadable: bool = False,
    ):
        self.index, self.order, self.transform = index, order, transform
        self.seed, self.epoch, self.rank, self.skip_unreadable = seed, epoch, rank, skip_unreadable

    def __len__(self) -> int:
        return len(self.order)

    def _open(self, path: str) -> Image.Image:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                raise ValueError(f"{im.size[0]}x{im.size[1]} is more than {MAX_IMAGE_PIXELS} pixels")
            return im.convert("RGB")

    def __getitem__(self, i: int):
        idx = int(self.order[i])
        path = self.index.paths[idx]
        n = len(self.index)
        for k in range(n if self.skip_unreadable else 1):  # the next readable image in place of a bad one
            try:
                img = self._open(self.index.paths[(idx + k) % n])
                break
            except Exception as e:
                if k == 0:
                    first = f"{type(e).__name__}: {e}"
        else:
            advice = unreadable_advice(self.index.source)
            raise DataError(f"cannot decode {path} ({first}) (rank {self.rank}). {advice}")
        if k:
            print(
                f"mugs: rank {self.rank}: skipped unreadable {path} ({first}); read "
                f"{self.index.paths[(idx + k) % n]} in its place (epoch {self.epoch}; --skip_unreadable)",
                file=sys.stderr,
                flush=True,
            )
        with _seeded(derive_seed(self.seed, self.epoch, idx, 1)):  # the position's draws, whatever was read
            crops, weak = self.transform(img)
        return crops, weak, (idx + k) % n


class TorchvisionLoader(MultiCropLoader):
    backend = "torchvision"

    def __init__(
        self,
        index: FileIndex,
        aug: AugmentConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: Any = "cpu",
        num_workers: int = 4,
        dtype: torch.dtype = torch.float32,
        prefetch_factor: int = 2,
        skip_unreadable: bool = False,
    ):
        super().__init__(index, aug, batch_size, rank, world_size, seed, device, dtype)
        self.skip_unreadable = skip_unreadable
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.transform = MultiCropTransform(aug)

    def _iterate(self, epoch: int, start: int, extra: Any) -> Iterator[MultiCropBatch]:
        order = self.rank_order(epoch)[start * self.batch_size :]
        ds = _EpochShard(self.index, order, self.transform, self.seed, epoch, self.rank, self.skip_unreadable)
        batches = DataLoader(
            ds,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed),  # not the trainer's global RNG
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,  # None: DataLoader's default
        )
        n_global = 2 if self.aug.vanilla_weak_augmentation else 4
        for crops, weak, idx in batches:
            teacher = crops[:2]
            student = (teacher if self.aug.vanilla_weak_augmentation else crops[2:4]) + crops[n_global:]
            yield self._finish(teacher, student, weak.numpy(), range(len(idx)), idx.numpy())
