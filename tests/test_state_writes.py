"""The step's state writes (queues, memories, their pointers) are bitwise the plain row-by-row writes,
on one process and on 2 ranks, in both pointer rules, through wrap-around, overflow and non-finite
steps, in few ops (issue 26)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import state_writes_worker as W
from mugs.benchmarks.op_counter import NO_KERNEL_OPS, OpCounter, op_name
from train_helpers import free_port


class _KernelOps(OpCounter):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if op_name(func) not in NO_KERNEL_OPS:
            self.names.append(op_name(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pointer", ["fixed", "original"])
@pytest.mark.parametrize("memory_size", [5, 16])  # 5: wraps every step; 16: the memories fill slowly
def test_update_state_is_the_row_by_row_reference_bitwise(pointer, memory_size):
    assert W.run(pointer, memory_size) == []


def test_update_state_takes_few_kernel_ops_and_never_asks_the_host():
    """One process, both losses with queues, no centre: 2 queue writes x 6, student memory 10,
    teacher memory 6 = 28 ops (65 with the centre's 5 before)."""
    obj = W.objective("fixed", 16)
    student, teacher, weak = W.outputs(0, 0, True)
    obj.update_state(student, teacher, weak, torch.tensor(True))
    with _KernelOps() as ops:
        obj.update_state(student, teacher, weak, torch.tensor(True))
    assert "_local_scalar_dense" not in ops.names and "item" not in ops.names, ops.names
    assert len(ops.names) <= 28, (len(ops.names), ops.names)


@pytest.mark.process
def test_two_ranks_write_what_the_reference_writes_from_all_ranks_rows(tmp_path):
    here = Path(__file__).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += [str(here / "state_writes_worker.py"), str(tmp_path / "out")]
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        found = json.loads((tmp_path / f"out.{r}.json").read_text())
        assert len(found) == 4 and all(v == [] for v in found.values()), found
