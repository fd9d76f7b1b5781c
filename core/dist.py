"""Process groups, the device mesh and the few collectives the project uses, in one place.

Everything degrades to identity in a single process, so model, training and
evaluation code have one path whether launched by torchrun or plain `python`.
Nothing here writes to `os.environ`: a run without torchrun gets a one-process
group through an explicit TCP init on a free loopback port.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from .errors import NoDeviceError
from .ports import free_port


def _all_gather_single(out: torch.Tensor, x: torch.Tensor) -> None:
    """torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns, FutureWarning);
    torch 2.11 and 2.12, which setup.py supports, have only the old name."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x)


# ---------------------------------------------------------------- who am I
def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def shutdown() -> None:
    if initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a training worker with `code` without interpreter finalisation.

    Why: gloo's C++ threads (and DALI's) can outlive `destroy_process_group`; when Python tears
    itself down under them, one aborts ("terminate called without an active exception", SIGABRT)
    and a run that finished and saved is reported as a crash (seen in CI on a 2-rank run, once in
    ~40; pytorch/pytorch PR 179291 describes it). Everything that must reach disk (TensorBoard,
    log.txt, checkpoints, the lease) is closed before the worker's `main` returns, so only the
    console buffers are left to flush here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# what gloo and NCCL say when the other end of a collective is gone (its process exited or was killed)
_PEER_GONE = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "socket closed",
    "communicator was aborted",
    "remote process exited",
    "connection refused",
    "timed out",
)


def peer_failure(e: BaseException) -> str | None:
    """One line saying why a collective failed when `e` is another rank being gone (a rank torn down
    after a peer's failure says that instead of a backend traceback), else None."""
    text = str(e).strip()
    lower = text.lower()
    if not isinstance(e, RuntimeError) or not (isinstance(e, dist.DistError) or any(p in lower for p in _PEER_GONE)):
        return None
    last = next((line for line in reversed(text.splitlines()) if line.strip()), type(e).__name__)
    last = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(last.split()))  # gloo's [source.cc:line] prefix
    return last.split(". ")[0][:160]


def agree(failure: str | None) -> str | None:
    """The first rank's failure message on every rank if any rank failed, else None (one all-reduce
    of a flag; the messages are gathered only when something failed)."""
    if not initialized() or dist.get_world_size() == 1:
        return failure
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([0.0 if failure is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return None
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, failure)
    return next(m for m in messages if m is not None)


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (identity in one process)."""
    if not initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# ---------------------------------------------------------------- set-up
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    mesh: torch.distributed.device_mesh.DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """The WORLD_SIZE torchrun/SLURM set for this process (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise NoDeviceError("--device cuda but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _init_group(dev: torch.device, timeout_minutes: float) -> None:
    """Join torchrun's group (env:// rendezvous) or, without a launcher, make a group of one."""
    if initialized():
        return
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kw: dict[str, Any] = dict(timeout=datetime.timedelta(minutes=timeout_minutes))
    if dev.type == "cuda":
        kw["device_id"] = dev
    if "RANK" in os.environ:
        dist.init_process_group(backend, **kw)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, **kw)


def init_distributed(device: str, hsdp: bool = False, timeout_minutes: float = 30.0) -> DistInfo:
    """Training: join (or create a one-process) group, nccl on cuda, gloo on cpu, plus the device mesh.

    With `hsdp` the mesh is 2-D (replicate across nodes, shard within a node)."""
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local_rank)
    _init_group(dev, timeout_minutes)
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if hsdp and world > local_world:
        if world % local_world:
            raise ValueError(f"--hsdp needs equal processes per node: world {world}, per node {local_world}")
        mesh = init_device_mesh(dev.type, (world // local_world, local_world), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("shard",))
    return DistInfo(dist.get_rank(), world, local_rank, local_world, dev, mesh)


def pick_device(name: str = "auto") -> torch.device:
    """Evaluation: `auto` is cuda when visible, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return _device(name, int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device("cpu")


def init_eval(device: torch.device, timeout_minutes: float = 60.0) -> None:
    """Evaluation: join torchrun's group; nothing when not launched by torchrun (no mesh needed)."""
    if initialized() or launched_world_size() <= 1:
        return
    _init_group(device, timeout_minutes)


# ---------------------------------------------------------------- sharded tensors
def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of an FSDP2 (DTensor) parameter or gradient; plain tensors pass through."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


# ---------------------------------------------------------------- collectives
def shard(n: int) -> list[int]:
    """This rank's indices of 0..n-1 (strided, no padding, nothing repeated)."""
    return list(range(rank(), n, world_size()))


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 in rank order (no gradient)."""
    if world_size() == 1:
        return x
    out = x.new_empty((world_size() * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous())
    return out


@torch.no_grad()
def mean_over_ranks_(x: torch.Tensor) -> torch.Tensor:
    """Average `x` over ranks (one all-reduce) IN PLACE: for a tensor the caller made for it and owns,
    so no copy comes first (issue 26: one kernel op fewer per call at 2+ ranks). Returns `x`."""
    if world_size() > 1:
        dist.all_reduce(x)
        x.div_(world_size())
    return x


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (one all-reduce); identity in one process."""
    if initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def gather_indexed_rows(local: torch.Tensor, index: torch.Tensor, total: int, chunk: int = 8192) -> torch.Tensor | None:
    """Every rank's rows `local[i]` placed at `index[i]` of a [total, D] CPU tensor on rank 0 (None elsewhere).

    Ranks may hold different row counts (strided shards); rows are padded to the
    largest and all-gathered `chunk` rows at a time to bound device memory; only
    rank 0 keeps them (ImageNet x ViT-L features are ~5 GB)."""
    if not initialized():
        one = torch.zeros(total, *local.shape[1:], dtype=local.dtype)
        one[index.cpu()] = local.cpu()
        return one
    out: torch.Tensor | None = torch.zeros(total, *local.shape[1:], dtype=local.dtype) if is_main() else None
    dev = local.device
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=dev))
    most = int(max(c.item() for c in counts))
    pad = torch.zeros(most, *local.shape[1:], dtype=local.dtype, device=dev)
    pad[: local.shape[0]] = local
    idx = torch.full((most,), -1, dtype=torch.long, device=dev)
    idx[: local.shape[0]] = index.to(dev)
    for start in range(0, max(most, 1), chunk):
        rows, ids = pad[start : start + chunk].contiguous(), idx[start : start + chunk].contiguous()
        got_rows = [torch.empty_like(rows) for _ in range(world_size())]
        got_ids = [torch.empty_like(ids) for _ in range(world_size())]
        dist.all_gather(got_rows, rows)
        dist.all_gather(got_ids, ids)
        if out is not None:
            r, i = torch.cat(got_rows).cpu(), torch.cat(got_ids).cpu()
            keep = i >= 0
            out[i[keep]] = r[keep]
    return out
