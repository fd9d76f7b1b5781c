"""The comparison loader: torchvision/PIL transforms in a torch DataLoader with worker processes.

Same output contract, sharding and epoch order as the DALI loader (sharding.py); for machines
without DALI and for the benchmark. Every sample's random draws are seeded from
(seed, epoch, dataset index), so a batch does not depend on workers or on where iteration
started: resuming at batch k gives exactly the batches an uninterrupted epoch would have.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..core.errors import DataError
from .augment_config import AugmentConfig
from .batch import MultiCropBatch
from .files import FileIndex
from .loader_base import MultiCropLoader
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

    def __init__(self, index: FileIndex, order: np.ndarray, transform: MultiCropTransform, seed: int, epoch: int):
        self.index, self.order, self.transform = index, order, transform
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        idx = int(self.order[i])
        path = self.index.paths[idx]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise DataError(
                f"cannot decode {path} ({type(e).__name__}: {e}). Run `mugs-scan-data <ImageFolder root> "
                f"--out LIST` and train on LIST to leave unreadable files out."
            ) from None
        with _seeded(derive_seed(self.seed, self.epoch, idx, 1)):
            crops, weak = self.transform(img)
        return crops, weak, idx


class TorchvisionLoader(MultiCropLoader):
    backend = "torchvision"

    def __init__(self, index: FileIndex, aug: AugmentConfig, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: Any = "cpu", num_workers: int = 4,
                 dtype: torch.dtype = torch.float32, prefetch_factor: int = 2):
        super().__init__(index, aug, batch_size, rank, world_size, seed, device, dtype)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.transform = MultiCropTransform(aug)

    def _iterate(self, epoch: int, start: int, extra: Any) -> Iterator[MultiCropBatch]:
        order = self.rank_order(epoch)[start * self.batch_size:]
        ds = _EpochShard(self.index, order, self.transform, self.seed, epoch)
        kw = dict(num_workers=self.num_workers, batch_size=self.batch_size, shuffle=False, drop_last=True,
                  pin_memory=self.device.type == "cuda",
                  generator=torch.Generator().manual_seed(self.seed))  # not the trainer's global RNG
        if self.num_workers > 0:
            kw["prefetch_factor"] = self.prefetch_factor
        n_global = 2 if self.aug.vanilla_weak_augmentation else 4
        for crops, weak, idx in DataLoader(ds, **kw):
            teacher = crops[:2]
            student = (teacher if self.aug.vanilla_weak_augmentation else crops[2:4]) + crops[n_global:]
            yield self._finish(teacher, student, weak.numpy(), range(len(idx)), idx.numpy())
