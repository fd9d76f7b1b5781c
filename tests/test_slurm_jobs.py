"""`sbatch slurm/vit_large_250ep.sh`, unchanged, on a real single-host SLURM: overrides only (sbatch
options and environment), a tiny CPU model over 2 gloo processes. Checks that a job trains and
checkpoints, and that USR1 makes it save, requeue itself and resume from the saved step."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mugs.core import checkpoint as ckpt
from slurm_cluster import LocalSlurm, missing
from test_slurm_templates import TABLE1
from train_helpers import TINY_FLAGS, free_port, make_image_folder

pytestmark = pytest.mark.slurm  # jobs on a local SLURM: pyproject.toml's timeout_slurm

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "slurm/vit_large_250ep.sh"
# the template asks for 5 nodes x 8 GPUs: here one node and no GPU; GPUS_PER_NODE=2 CPU processes (gloo)
SBATCH_OVERRIDES = ["--nodes=1", "--gpus-per-node=0"]


@pytest.fixture(scope="session")
def slurm():
    """One cluster per test session: `.ci/slurm-up.sh`'s if MUGS_SLURM_DIR names a live one, else our own."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    shared = os.environ.get("MUGS_SLURM_DIR")
    if shared and LocalSlurm(Path(shared)).is_up():
        yield LocalSlurm(Path(shared))
        return
    cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix="mugs-slurm-")))  # short path: socket names are limited
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("slurm-imgs"), classes=2, per_class=16)


def sbatch(slurm, logs: Path, out: Path, data: Path, extra: list, *opts: str) -> subprocess.CompletedProcess:
    """Submit the template as a user would: from the repo root, settings in the environment."""
    env = {
        **slurm.env,
        "DATA_PATH": str(data),
        "OUTPUT_DIR": str(out),
        "GPUS_PER_NODE": "2",
        "EXTRA_ARGS": " ".join(TINY_FLAGS + ["--batch_size_per_gpu", "4", *extra]),
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "NCCL_IB_HCA": "mlx5_test",
    }
    cmd = ["sbatch", *opts, *SBATCH_OVERRIDES, f"--output={logs}/slurm-%x-%j.out", TEMPLATE]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def job_log(logs: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("slurm-mugs-vit_large_250ep-*.out")))


def job_field(slurm, job: int, key: str) -> str:
    m = re.search(rf"\b{key}=(\S+)", slurm.run("scontrol", "show", "job", "-o", str(job), check=False).stdout)
    return m.group(1) if m else ""


def exits(out: Path) -> list:
    """The trainer's exit records, one per run (log.txt, JSON lines)."""
    return [r for r in map(json.loads, (out / "log.txt").read_text().splitlines()) if r.get("event") == "exit"]


def ckpt_step(out: Path) -> int:
    last = ckpt.latest(str(out))
    assert last is not None, f"no complete checkpoint in {out}"
    return int(json.loads((last / "COMPLETE").read_text())["step"])


def test_template_job_trains_and_checkpoints(slurm, data, tmp_path):
    out = tmp_path / "run"
    r = sbatch(slurm, tmp_path, out, data, ["--max_steps", "3"], "--wait")
    log = job_log(tmp_path)
    assert r.returncode == 0, f"{r.stderr}\n{log[-6000:]}\n{slurm.log_tail()}"
    assert ckpt_step(out) == 3 and exits(out)[-1]["reason"] == "max_steps"
    assert "1 nodes x 2 processes" in log and "--nproc_per_node=2" in log
    assert "NCCL_IB_HCA=mlx5_test" in log and "NCCL_DEBUG=WARN" in log  # site settings pass, defaults apply
    # the job's stderr is a file: plain progress lines (step, epoch, losses, img/s, ETA, memory), no bar
    for step in (1, 3):
        assert re.search(rf"mugs: step {step}/3 epoch 0 \| loss \d.* img/s .* ETA \S+ \| mem ", log), log[-6000:]
    assert "\r" not in log
    cfg = json.loads((out / "config.json").read_text())
    # the template's Table-1 flags reached the trainer; EXTRA_ARGS (last) overrode model size and batch
    want = TABLE1["vit_large_250ep"][4]  # the test suite's own statement of Table 1
    for key in (
        "lr",
        "min_lr",
        "weight_decay",
        "weight_decay_end",
        "group_teacher_temp",
        "group_warmup_teacher_temp_epochs",
        "norm_last_layer",
    ):
        assert cfg[key] == want[key], key
    assert (cfg["arch"], cfg["batch_size_per_gpu"], cfg["device"]) == ("custom", 4, "cpu")
    assert not (out / "STOP").exists()


def test_usr1_saves_requeues_and_resumes(slurm, data, tmp_path):
    out, total = tmp_path / "run", 12
    r = sbatch(
        slurm,
        tmp_path,
        out,
        data,
        ["--epochs", "20", "--max_steps", str(total), "--ckpt_every_steps", "2"],
        "--parsable",
    )
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.strip().split(";")[0])
    try:
        t0 = time.time()  # signal once training is under way: its first checkpoint is complete
        while not (out / "checkpoints" / "step_00000002" / "COMPLETE").exists():
            assert time.time() - t0 < 180, f"no progress\n{job_log(tmp_path)[-6000:]}"
            assert job_field(slurm, job, "JobState") in ("PENDING", "RUNNING"), job_log(tmp_path)[-6000:]
            time.sleep(0.2)
        slurm.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@300 does near the limit
        while job_field(slurm, job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            assert time.time() - t0 < 420, f"job did not finish\n{job_log(tmp_path)[-6000:]}"
            time.sleep(1)
    finally:
        slurm.run("scancel", str(job), check=False)
    log = job_log(tmp_path)
    assert job_field(slurm, job, "JobState") == "COMPLETED", f"{log[-6000:]}\n{slurm.log_tail()}"
    assert job_field(slurm, job, "Restarts") == "1" and job_field(slurm, job, "ExitCode") == "0:0"
    first, second = exits(out)[-2:]
    assert first["reason"] == "stop_file" and 2 <= first["step"] < total, first
    assert second == {"event": "exit", "reason": "max_steps", "step": total}
    saved = first["step"]
    assert "got SIGUSR1 (restart 0)" in log and "requeueing job" in log and "restart 1:" in log
    assert re.search(rf"resumed from \S+step_{saved:08d} at step {saved}\b", log), log[-6000:]
    assert ckpt_step(out) == total and not (out / "STOP").exists()
