"""Process-group and device-mesh set-up for torchrun, SLURM and plain `python` runs."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str, hsdp: bool = False, timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or, without torchrun, create a one-process) group: nccl on cuda, gloo on cpu.

    With `hsdp` the mesh is 2-D (replicate across nodes, shard within a node)."""
    if "RANK" not in os.environ:  # plain `python train_fsdp.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": dev} if device == "cuda" else {}))
    if hsdp and world > local_world:
        if world % local_world:
            raise ValueError(f"--hsdp needs equal processes per node: world {world}, per node {local_world}")
        mesh = init_device_mesh(dev.type, (world // local_world, local_world), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("shard",))
    return DistInfo(rank, world, local_rank, local_world, dev, mesh)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
