"""Frozen-backbone features, sharded over ranks and gathered, with an optional on-disk cache.

Two kinds, as in the paper's evaluation scripts:
- k-NN: the final-normed CLS token of the last block;
- linear: the final-normed CLS tokens of the `n` last blocks, optionally followed
  by the mean of the last block's final-normed patch tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..core import dist
from ..core.safe_load import safe_torch_load
from ..model.knn import cls_features, extract_features  # noqa: F401 - cls_features: re-exported
from ..model.vit import MugsViT
from .cli import progress

FeatureFn = Callable[[MugsViT, torch.Tensor], torch.Tensor]


def block_features(
    backbone: MugsViT, images: torch.Tensor, n_last_blocks: int = 1, avgpool: bool = False
) -> torch.Tensor:
    """[B, D * (n + avgpool)]: CLS of each of the n last blocks (each final-normed) [+ mean patch token]."""
    outputs = []
    hooks = [
        blk.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for blk in backbone.blocks[-n_last_blocks:]
    ]
    try:
        backbone.forward_tokens(images)
    finally:
        for h in hooks:
            h.remove()
    normed = [backbone.norm(x) for x in outputs]
    feats = [x[:, 0] for x in normed]
    if avgpool:
        feats.append(normed[-1][:, 1:].mean(dim=1))
    return torch.cat(feats, dim=-1)


def loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, **kw) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        **kw,
    )


def extract(
    backbone: MugsViT,
    dataset: Dataset,
    fn: FeatureFn,
    dim: int,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    desc: str,
) -> torch.Tensor | None:
    """[len(dataset), dim] float32 CPU features in dataset order on rank 0; None on the other ranks
    (model/knn.py's extract_features, which the training run's k-NN monitor uses too)."""
    return extract_features(
        lambda images: fn(backbone, images),
        dataset,
        dim,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=lambda it: progress(it, desc),
    )


def fingerprint(**parts) -> str:
    """A stable hash of what the features depend on (checkpoint identity, images, views, kind)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def checkpoint_identity(path: Path) -> dict:
    """Path, size and mtime of the checkpoint's defining file: changes when it is rewritten."""
    target = path / "COMPLETE" if path.is_dir() else path
    st = target.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached(
    cache_dir: str | None, name: str, key: str, compute: Callable[[], torch.Tensor | None]
) -> tuple[torch.Tensor | None, bool]:
    """Features from `cache_dir/name-key.pt` when present (read by rank 0), else computed (and written
    by rank 0). The file name holds the key, so every rank takes the same branch."""
    if not cache_dir:
        return compute(), False
    path = Path(cache_dir) / f"{name}-{key}.pt"
    if path.is_file():
        return (safe_torch_load(path)["features"] if dist.is_main() else None), True
    feats = compute()
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, "features": feats}, tmp)
        os.replace(tmp, path)
    dist.barrier()
    return feats, False
