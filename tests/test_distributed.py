"""FSDP2 over 2 gloo processes matches one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _torchrun(nproc: int, out: Path, steps: int, global_batch: int, port: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(HERE / "fsdp_worker.py"), str(out), str(steps), str(global_batch)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_two_rank_fsdp_matches_single_process(tmp_path):
    _torchrun(1, tmp_path / "one", 3, 8, 29631)
    _torchrun(2, tmp_path / "two", 3, 8, 29632)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(one) == set(two)
    # parameters after 3 AdamW steps, EMA teacher, queues, memories and centre: fp32 reduction-order noise only
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst < 5e-5, worst
    l1, l2 = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    for a, b in zip(l1, l2):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
    # and the run really trained: the student moved away from the teacher's start
    assert (one["student.backbone.blocks.0.attn.qkv.weight"] - one["teacher.backbone.blocks.0.attn.qkv.weight"]).abs().max() > 1e-4
