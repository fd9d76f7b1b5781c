"""Helpers shared by the pipeline tests (their image-tree fixture is in conftest.py)."""

import numpy as np
import torch

from mugs.configs.options import MugsConfig
from mugs.pipeline import build_loader
from mugs.pipeline.augment_config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig

SMALL = dict(global_size=32, local_size=16, local_crops_number=2)
# the loader's own names for MugsConfig fields
FLAG = {
    "global_size": "img_size",
    "batch_size": "batch_size_per_gpu",
    "num_threads": "num_workers",
    "backend": "loader",
}
RUNTIME = ("rank", "world_size", "device", "dtype", "debug", "device_id")  # build_loader's per-process arguments
# normalised values a [0, 255] pixel can take, per channel
LOW = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
HIGH = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)


def loader(backend, root, batch_size=4, **kw):
    """build_loader on MugsConfig's defaults with SMALL crops and `kw` (loader or MugsConfig names)."""
    args = dict(SMALL, backend=backend, data_path=str(root), batch_size=batch_size, num_threads=2)
    args.update(kw)
    run = dict(rank=0, world_size=1, device="cpu", dtype=torch.float32)
    run.update({k: args.pop(k) for k in RUNTIME if k in args})
    if "local_size" in args:
        args["size_crops"] = [args.pop("local_size")]
    cfg = MugsConfig(**{FLAG.get(k, k): v for k, v in args.items()})
    return build_loader(AugmentConfig.from_config(cfg), cfg.loader_view(), **run)


def in_pixel_range(t: torch.Tensor, tol: float = 1e-3) -> bool:
    t = t.float()
    return bool(((t >= LOW - tol) & (t <= HIGH + tol)).all())


def first_batches(ld, epoch=0, n=None):
    ld.set_epoch(epoch)
    out = []
    for i, b in enumerate(ld):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def same_batch(a, b) -> bool:
    return (
        a.paths == b.paths
        and torch.equal(a.weak_flags, b.weak_flags)
        and all(torch.equal(x, y) for x, y in zip(a.crops, b.crops))
    )


__all__ = ["loader", "in_pixel_range", "first_batches", "same_batch", "SMALL", "np"]
