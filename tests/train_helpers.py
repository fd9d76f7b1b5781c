"""Small image folders and train_fsdp.py command lines shared by the trainer tests."""

import os
import subprocess
import sys
from pathlib import Path

from images import make_tree
from mugs.configs import presets
from mugs.core.ports import free_port  # noqa: F401 - the tests take it from here

ROOT = Path(__file__).resolve().parents[1]

# the tiny preset as explicit flags: they also override a SLURM template's Table-1 flags
TINY_FLAGS = presets.argv("tiny")


def make_image_folder(root: Path, classes: int = 2, per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """A tiny ImageFolder of valid RGB JPEGs (tests/images.py), returned as its root."""
    make_tree(str(root), classes=classes, per_class=per_class, seed=seed, h=size, w=size)
    return root


def train_cmd(nproc: int, port: int, data: Path, out: Path, *extra: str) -> list:
    """torchrun running train_fsdp.py on `nproc` ranks. port 0: a free one."""
    port = port or free_port()
    runner = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    return runner + [
        str(ROOT / "train_fsdp.py"),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        *TINY_FLAGS,
        *extra,
    ]


def run(cmd: list, timeout: int = 600, env: dict = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


def launch_cmd(nproc: int, port: int, data: Path, out: Path, *extra: str) -> list:
    """The same run through mugs-train (python -m mugs.training.launch), which checks first.
    port 0: a free one."""
    port = port or free_port()
    return [
        sys.executable,
        "-m",
        "mugs.training.launch",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        *TINY_FLAGS,
        *extra,
    ]


def logged_losses(out: Path) -> list:
    """(step, loss/total) of every step a run dir's TensorBoard events hold, in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars("loss/total")]


def plant_lease(out: Path, **fields) -> dict:
    """A lease as another run would have left it (core/lease.py's file), `fields` overriding its values."""
    import json
    import time

    from mugs.core import lease_owner

    now = time.time()
    owner = {
        "host": "node-17",
        "pids": [4242],
        "slurm_job_id": None,
        "start": now - 3600,
        "heartbeat": now,
        "token": "0" * 32,
        **fields,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / lease_owner.LEASE_FILE).write_text(json.dumps(owner))
    return owner
