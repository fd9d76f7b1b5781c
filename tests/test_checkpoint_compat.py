"""Checkpoints written by earlier code resume bitwise: tests/data/ckpt_v1 (README there) was written at
ca0b25f, before the checkpoint package split; resuming it must log the recorded losses exactly."""
import json
import sys
import shutil
from pathlib import Path

import pytest
import torch

from mugs.core.safe_load import read_dcp_metadata

from train_helpers import ROOT, free_port, logged_losses, run

pytestmark = pytest.mark.distributed  # a torchrun run: pytest.ini's timeout_distributed

V1 = Path(__file__).parent / "data" / "ckpt_v1"


def test_v1_checkpoint_resumes_bitwise(tmp_path):
    expected = json.loads((V1 / "expected.json").read_text())
    out = tmp_path / "run"
    shutil.copytree(V1 / "run", out)  # the run dir moved: --output_dir and --data_path changes are allowed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           f"--master_port={free_port()}", str(ROOT / "train_fsdp.py"), "--data_path", str(V1 / "images"),
           "--output_dir", str(out), *expected["flags"], "--max_steps", str(expected["resume_to"])]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and "step_00000002" in r.stderr, r.stderr[-2000:]
    got = {str(s): v for s, v in logged_losses(out)}
    assert got == expected["loss_total"]  # steps 3.. only: the resumed run logs nothing before them
    # and what today's code writes has the same keys: every DCP entry and every rank-file entry
    old, new = V1 / "run" / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000006"
    assert set(read_dcp_metadata(new / ".metadata").state_dict_metadata) == set(
        read_dcp_metadata(old / ".metadata").state_dict_metadata)
    assert list(torch.load(new / "rank_0.pt", weights_only=True)) == list(torch.load(old / "rank_0.pt", weights_only=True))
    exits = [r for r in map(json.loads, (out / "log.txt").read_text().splitlines()) if r.get("event") == "exit"]
    assert exits == [{"event": "exit", "reason": "max_steps", "step": expected["resume_to"]}]  # StopReason's value
