"""The quickstart's yardstick: weighted k-NN top-1 on the held-out split, of a backbone's features,
of the raw pixels and of the network as training initialises it (the before/after of the headline)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..configs.flags import parse_config
from ..model.knn import K


def knn_accuracy(backbone, train_dir: Path, val_dir: Path, size: int, k: int = K, temperature: float = 0.05) -> float:
    """Top-1 of weighted k-NN on the backbone's CLS features (mugs-eval-knn's protocol, k 20, T 0.05)."""
    from ..eval.data import eval_transform, image_folder
    from ..eval.features import cls_features, extract

    tf = eval_transform(size, size)
    train, val = image_folder(train_dir, tf), image_folder(val_dir, tf)
    backbone.eval()
    feats = []
    for name, ds in (("train", train), ("val", val)):
        f = extract(
            backbone,
            ds,
            cls_features,
            backbone.embed_dim,
            batch_size=256,
            num_workers=0,
            device=torch.device("cpu"),
            desc=f"k-NN features ({name})",
        )
        assert f is not None  # one process, rank 0: extract returns the features
        feats.append(F.normalize(f, dim=1))
    return _top1(feats, train, val, k, temperature)


def pixel_knn_accuracy(train_dir: Path, val_dir: Path, size: int, k: int = K, temperature: float = 0.05) -> float:
    """The same k-NN on raw pixels (the normalised eval view, flattened): what features must beat."""
    from ..eval.data import eval_transform, image_folder

    tf = eval_transform(size, size)
    train, val = image_folder(train_dir, tf), image_folder(val_dir, tf)
    feats = [F.normalize(torch.stack([ds[i][0].flatten() for i in range(len(ds))]), dim=1) for ds in (train, val)]
    return _top1(feats, train, val, k, temperature)


def _top1(feats, train, val, k: int, temperature: float) -> float:
    """k-NN top-1 of the held-out features `feats[1]` against the training ones `feats[0]`."""
    from ..model.knn import knn_classify

    top1, _ = knn_classify(
        feats[0],
        torch.tensor(train.targets),
        feats[1],
        torch.tensor(val.targets),
        k,
        temperature,
        num_classes=len(train.classes),
    )
    return top1


def initial_backbone(flags: list[str]):
    """The network exactly as train_fsdp.py initialises it (same seed, same build order)."""
    from ..model.network import build_network

    cfg = parse_config(flags)
    torch.manual_seed(cfg.seed)
    return build_network(cfg.model_view(), teacher=False).backbone
