"""Process group for the evaluation commands: torchrun -> one rank per process; plain python -> no group.

Unlike training there is no device mesh: evaluation only shards the images and
gathers features or counts.
"""
from __future__ import annotations

import datetime
import os
from typing import List, Optional

import torch
import torch.distributed as dist

from .errors import EvalError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EvalError("--device cuda but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init(device: torch.device) -> None:
    """Join torchrun's group (nccl on cuda, gloo on cpu); nothing when not launched by torchrun."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(n: int) -> List[int]:
    """This rank's indices of 0..n-1 (strided, no padding, nothing repeated)."""
    return list(range(rank(), n, world()))


def all_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def gather_rows(local: torch.Tensor, index: torch.Tensor, total: int, chunk: int = 8192) -> Optional[torch.Tensor]:
    """Every rank's rows `local[i]` placed at `index[i]` of a [total, D] CPU tensor on rank 0 (None elsewhere).

    Ranks may hold different row counts (strided shards); rows are padded to the
    largest and all-gathered `chunk` rows at a time to bound device memory; only
    rank 0 keeps them (ImageNet x ViT-L features are ~5 GB)."""
    if not dist.is_initialized():
        out = torch.zeros(total, *local.shape[1:], dtype=local.dtype)
        out[index.cpu()] = local.cpu()
        return out
    out = torch.zeros(total, *local.shape[1:], dtype=local.dtype) if is_main() else None
    dev = local.device
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=dev))
    most = int(max(c.item() for c in counts))
    pad = torch.zeros(most, *local.shape[1:], dtype=local.dtype, device=dev)
    pad[: local.shape[0]] = local
    idx = torch.full((most,), -1, dtype=torch.long, device=dev)
    idx[: local.shape[0]] = index.to(dev)
    for start in range(0, max(most, 1), chunk):
        rows, ids = pad[start:start + chunk].contiguous(), idx[start:start + chunk].contiguous()
        got_rows = [torch.empty_like(rows) for _ in range(world())]
        got_ids = [torch.empty_like(ids) for _ in range(world())]
        dist.all_gather(got_rows, rows)
        dist.all_gather(got_ids, ids)
        if out is not None:
            r, i = torch.cat(got_rows).cpu(), torch.cat(got_ids).cpu()
            keep = i >= 0
            out[i[keep]] = r[keep]
    return out
