"""benchmarks/gpu_suite.sh where there is no GPU (CI): one clear line, at once; its summary helpers on CPU records."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mugs.benchmarks import gpu_summary

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.process
def test_suite_without_gpu_exits_at_once_with_one_line():
    if torch.cuda.is_available():
        import pytest

        pytest.skip("a GPU is visible: the suite would run")
    before = set((ROOT / "benchmarks" / "results").rglob("*"))
    t0 = time.perf_counter()
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert time.perf_counter() - t0 < 30
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_suite: error: no CUDA GPU visible"), r.stderr
    assert set((ROOT / "benchmarks" / "results").rglob("*")) == before  # nothing written


@pytest.mark.process
def test_step_module_runs_as_installed_package():
    r = subprocess.run(
        [sys.executable, "-m", "mugs.benchmarks.step", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "--compare" in r.stdout and "--batch_size_per_gpu" in r.stdout


CONFIG = dict(loader="dali", arch="vit_small", batch_size_per_gpu=32, max_steps=30, precision="bf16", compile=True)


def _args(out, steps=30, loader="dali", **kw):
    """The suite's train-record arguments; the run's settings go where the trainer writes them (config.json)."""
    (Path(out) / "config.json").write_text(json.dumps({**CONFIG, "max_steps": steps, "loader": loader}))
    base = dict(
        output_dir=str(out), gpu="G", killed="after_step_10", resumed_at=10, exit_code=0, first_s=1.0, total_s=2.0
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_train_record_ok_only_for_a_real_mid_run_resume_to_the_last_step(tmp_path):
    ck = tmp_path / "checkpoints" / "step_00000030"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text(json.dumps({"step": 30}))
    (tmp_path / "log.txt").write_text(json.dumps({"event": "exit", "reason": "finished", "step": 30}) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as w:
        for s in range(1, 31):
            w.add_scalar("loss/total", 5.0 - s / 30, s)
            w.add_scalar("perf/images_per_s", 100.0 + s, s)
    rec = gpu_summary.train_record(_args(tmp_path))
    assert rec["ok"] and rec["final_step"] == 30 and rec["losses_finite"]
    assert (rec["arch"], rec["batch_size_per_gpu"], rec["steps"], rec["precision"]) == ("vit_small", 32, 30, "bf16")
    assert rec["images_per_s_median"] == 100 + 17  # steps 4..30
    assert not gpu_summary.train_record(_args(tmp_path, resumed_at=30))["ok"]  # resumed after the end: no resume
    assert not gpu_summary.train_record(_args(tmp_path, resumed_at=0))["ok"]
    assert not gpu_summary.train_record(_args(tmp_path, exit_code=1))["ok"]
    assert not gpu_summary.train_record(_args(tmp_path, steps=40))["ok"]  # stopped short of the steps asked for
    # a torchvision-fed run's images/s is the CPU loader's, and the record says so
    assert not rec["loader_bound"] and gpu_summary.train_record(_args(tmp_path, loader="torchvision"))["loader_bound"]
