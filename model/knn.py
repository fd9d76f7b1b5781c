"""Weighted k-NN on frozen CLS features: the ONE implementation behind `mugs-eval-knn` (eval/knn.py)
and the online monitor of a training run (training/knn_monitor.py).

Protocol (DINO/Mugs): features are the final-normed CLS token of the backbone, L2-normalised; each
query takes its k = 20 most cosine-similar bank images and neighbour j votes for its class with
weight exp(sim_j / T), T = 0.05 for ViT-S (and custom sizes), 0.04 for ViT-B/L (the paper's
eval_knn.sh). Top-1/top-5 are fractions in [0, 1].

It lives in model/ (the bottom layer) so that eval/ and training/, which may not import each other,
call the same code: extraction (`extract_features`, sharded over ranks, gathered on rank 0) and
classification (`knn_classify`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..core import dist
from ..core.errors import DataError

K = 20  # the paper's k
TEMPERATURE = {"vit_base": 0.04, "vit_large": 0.04}  # everything else: 0.05 (ViT-S)
Encoder = Callable[[torch.Tensor], torch.Tensor]  # images [B, 3, H, W] -> features [B, D]


def default_temperature(arch_name: str) -> float:
    return TEMPERATURE.get(arch_name, 0.05)


def cls_features(backbone, images: torch.Tensor) -> torch.Tensor:
    """[B, D]: the final-normed CLS token of a MugsViT (the relation block is not used)."""
    return backbone.forward_mugs(images).cls


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = K,
    temperature: float = 0.05,
    num_classes: int | None = None,
    chunk: int = 256,
) -> tuple[float, float]:
    """(top-1, top-5) of temperature-weighted k-NN voting; features must be L2-normalised.

    Top-5 counts the 5 best-voted classes (fewer when k or the class count is below 5)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    top_n = min(5, k, num_classes)
    train_t = train_features.t()
    top1 = top5 = 0
    for start in range(0, test_features.shape[0], chunk):
        feats = test_features[start : start + chunk]
        targets = test_labels[start : start + chunk]
        sim, idx = (feats @ train_t).topk(k, dim=1)
        votes = torch.zeros(feats.shape[0], num_classes, device=feats.device, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        pred = votes.topk(top_n, dim=1).indices
        hit = pred == targets.view(-1, 1)
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(dim=1).sum())
    n = max(test_features.shape[0], 1)
    return top1 / n, top5 / n


def _thread_batches(dataset: Dataset, index: Sequence[int], batch_size: int, threads: int) -> Iterator:
    """(images, None) batches of dataset[i] for i in index, decoded by `threads` threads (no worker
    processes, no random number drawn). A batch that fails to load raises when it is reached."""
    chunks = [index[s : s + batch_size] for s in range(0, len(index), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for chunk in chunks:
            yield torch.stack([item[0] for item in pool.map(dataset.__getitem__, chunk)]), None


@torch.no_grad()
def extract_features(
    encode: Encoder,
    dataset: Dataset,
    dim: int,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    threads: int = 0,
    lockstep: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> torch.Tensor | None:
    """[len(dataset), dim] float32 CPU features in dataset order on rank 0; None on the other ranks.

    Each rank encodes its strided shard (core.dist.shard); rows are gathered once to rank 0.
    Images come from a DataLoader with `num_workers` processes, or with `threads` > 0 from a thread
    pool in this process. `lockstep` (an FSDP-sharded encoder, whose forward is a collective): every
    rank runs the same number of forwards (shorter shards are padded with a repeated image whose
    features are dropped) and the ranks agree after loading each batch, so that an unreadable image on
    one rank raises DataError on every rank instead of leaving the others waiting."""
    n = len(cast(Sized, dataset))  # a map-style dataset with a length
    index = dist.shard(n)
    real = len(index)
    if lockstep:
        longest = -(-n // dist.world_size())
        index = index + [index[-1] if index else 0] * (longest - real)
    batches: Iterable[Any]
    if threads > 0:
        batches = _thread_batches(dataset, index, batch_size, threads)
    else:  # a dedicated generator: iterating a DataLoader draws its base seed from one
        batches = DataLoader(
            Subset(dataset, index),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            generator=torch.Generator(),
        )
    if progress is not None:
        batches = progress(batches)
    rows: list[torch.Tensor] = []
    it = iter(batches)
    for _ in range(-(-len(index) // batch_size)):
        images, failure = None, None
        try:
            images = next(it)[0]
        except Exception as e:  # noqa: BLE001 - any reader failure (unreadable image, vanished file)
            if not lockstep:
                raise
            failure = f"rank {dist.rank()}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        if lockstep:
            failure = dist.agree(failure)
            if failure is not None:
                raise DataError(failure)
        rows.append(encode(cast(torch.Tensor, images).to(device, non_blocking=True)).float())  # a failure raised above
    next(it, None)  # the end of the iteration: a progress bar shows its last batch and closes
    local = torch.cat(rows)[:real] if rows else torch.zeros(0, dim, device=device)
    return dist.gather_indexed_rows(local, torch.tensor(index[:real], dtype=torch.long), n)
