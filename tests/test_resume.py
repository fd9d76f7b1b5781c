"""Every way a run ends resumes exactly: --max_steps, SIGUSR1 to mugs-train, Ctrl-C; onto another
process count with the same global batch; and a resume with other settings is refused in one line."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mugs.core import checkpoint as ckpt
from mugs.pipeline.sharding import epoch_permutation
from pipeline_helpers import loader as pipeline_loader
from train_helpers import free_port, launch_cmd, logged_losses, make_image_folder, run, train_cmd

pytestmark = pytest.mark.distributed  # torchrun runs: pyproject.toml's timeout_distributed

DALI = ("--loader", "dali", "--num_workers", "1", "--batch_size_per_gpu", "2")  # 32 images / (2 x 2) = 8 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=16)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted 2-rank DALI epoch (8 steps)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run(launch_cmd(2, 0, data, out, *DALI, "--max_steps", "8"))
    assert r.returncode == 0, r.stderr[-6000:]
    return logged_losses(out)


def _assert_continues(out: Path, reference: list) -> None:
    """The interrupted-and-resumed run logged each step once, with the reference's losses bit for bit."""
    got = logged_losses(out)
    assert [s for s, _ in got] == list(range(1, len(reference) + 1)), "a step was logged twice or skipped"
    assert got == reference


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before " + str(path)
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _processes_mentioning(text: str) -> list:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and text in (p / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def _interrupt(cmd: list, out: Path, sig: signal.Signals, to_last_worker: bool = False) -> subprocess.CompletedProcess:
    """Start the run, send `sig` to the mugs-train process (or to one of its workers)
    once step 2's checkpoint is complete."""
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    _wait_for(out / "checkpoints" / "step_00000002" / "COMPLETE", proc)
    if to_last_worker:
        workers = sorted(p for p in _processes_mentioning(str(out)) if p != proc.pid)
        os.kill(workers[-1], sig)
    else:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _exit_step(out: Path) -> int:
    log = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    return [r for r in log if r.get("event") == "exit"][-1]["step"]


def test_max_steps_then_resume_is_bitwise(data, tmp_path, reference):
    out = tmp_path / "run"
    r = run(launch_cmd(2, 0, data, out, *DALI, "--max_steps", "3"))
    assert r.returncode == 0, r.stderr[-6000:]
    # the exit checkpoint carries the DALI readers' position (it did not: the loop closed the loader first)
    per_rank = torch.load(ckpt.latest(str(out)) / "rank_1.pt", weights_only=True)
    assert per_rank["loader"]["batches_consumed"] == 3  # the position is the whole loader state
    r = run(launch_cmd(2, 0, data, out, *DALI, "--max_steps", "8"))  # --max_steps may change
    assert r.returncode == 0, r.stderr[-6000:]
    assert "resume: --max_steps was 3, is 8" in r.stderr
    _assert_continues(out, reference)


def test_sigusr1_to_mugs_train_saves_exits_cleanly_and_resumes_bitwise(data, tmp_path, reference):
    out = tmp_path / "run"
    cmd = launch_cmd(2, 0, data, out, *DALI, "--max_steps", "8", "--ckpt_every_steps", "2")
    r = _interrupt(cmd, out, signal.SIGUSR1)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "stopped by SIGUSR1" in r.stderr
    stopped = _exit_step(out)
    assert 2 <= stopped < 8 and ckpt.latest(str(out)).name == f"step_{stopped:08d}"
    assert not _processes_mentioning(str(out)), "workers outlived mugs-train"
    r = run(launch_cmd(2, 0, data, out, *DALI, "--max_steps", "8", "--ckpt_every_steps", "2"))
    assert r.returncode == 0, r.stderr[-6000:]
    _assert_continues(out, reference)


def test_sigterm_to_one_worker_stops_every_rank_with_a_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    r = _interrupt(
        launch_cmd(2, 0, data, out, *DALI, "--max_steps", "8", "--ckpt_every_steps", "2"),
        out,
        signal.SIGTERM,
        to_last_worker=True,
    )
    assert r.returncode == 0, r.stderr[-6000:]
    stopped = _exit_step(out)
    assert 2 < stopped < 8 and ckpt.latest(str(out)).name == f"step_{stopped:08d}"
    assert "stopped by" in r.stderr


def test_sigusr1_to_plain_torchrun_leaves_no_worker_training_unsupervised(data, tmp_path):
    """SIGUSR1 kills plain torchrun (its default action); its workers notice, save and exit."""
    out = tmp_path / "run"
    cmd = train_cmd(2, free_port(), data, out, *DALI, "--max_steps", "8", "--ckpt_every_steps", "2")
    r = _interrupt(cmd, out, signal.SIGUSR1)
    assert r.returncode == -signal.SIGUSR1
    t0 = time.time()
    while _processes_mentioning(str(out)):
        assert time.time() - t0 < 120, "workers outlived torchrun"
        time.sleep(0.2)
    stopped = _exit_step(out)
    assert 2 < stopped < 8 and ckpt.latest(str(out)).name == f"step_{stopped:08d}"


def test_resume_with_other_model_settings_is_refused_naming_each(data, tmp_path):
    out = tmp_path / "run"
    r = run(launch_cmd(1, 0, data, out, "--batch_size_per_gpu", "4", "--max_steps", "1"))
    assert r.returncode == 0, r.stderr[-6000:]
    # same shapes (silently resumed before) and other shapes (a size-mismatch traceback before)
    r = run(launch_cmd(1, 0, data, out, "--batch_size_per_gpu", "4", "--num_heads", "4", "--embed_dim", "64"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--num_heads was 2, is 4" in last and "--embed_dim was 32, is 64" in last
    r = run(launch_cmd(1, 0, data, out, "--batch_size_per_gpu", "4", "--epochs", "5"))
    assert r.returncode == 2 and "--epochs was 3, is 5" in r.stderr.strip().splitlines()[-1]
    # another process count must keep the global batch: the refusal names the value that does
    r = run(launch_cmd(2, 0, data, out, "--batch_size_per_gpu", "4", "--check_only"))
    assert r.returncode == 2 and "use --batch_size_per_gpu 2" in r.stderr.strip().splitlines()[-1]
    r = run(launch_cmd(2, 0, data, out, "--batch_size_per_gpu", "2", "--num_workers", "3", "--check_only"))
    assert r.returncode == 0 and "1 -> 2 processes" in r.stderr and "--num_workers was 0, is 3" in r.stderr
    assert json.loads((out / "config.json").read_text())["num_heads"] == 2  # a refused resume wrote nothing


def test_resume_onto_other_process_counts_continues_the_global_order(data, tmp_path):
    """2 -> 1 and 1 -> 2 processes at global batch 4 (torchvision crops are seeded per sample, so
    the runs match the 1-process reference up to fp32 summation order)."""
    ref = tmp_path / "ref"
    r = run(launch_cmd(1, 0, data, ref, "--batch_size_per_gpu", "4", "--max_steps", "6"))
    assert r.returncode == 0, r.stderr[-6000:]
    reference = logged_losses(ref)

    two_one = tmp_path / "two_one"
    r = run(launch_cmd(2, 0, data, two_one, "--batch_size_per_gpu", "2", "--max_steps", "3"))
    assert r.returncode == 0, r.stderr[-6000:]
    r = run(launch_cmd(1, 0, data, two_one, "--batch_size_per_gpu", "4", "--max_steps", "6"))
    assert r.returncode == 0, r.stderr[-6000:]
    assert "2 -> 1 processes" in r.stderr and "at step 3" in r.stderr

    one_two = tmp_path / "one_two"  # stopped by Ctrl-C (SIGINT to mugs-train) this time
    r = _interrupt(
        launch_cmd(1, 0, data, one_two, "--batch_size_per_gpu", "4", "--max_steps", "6", "--ckpt_every_steps", "2"),
        one_two,
        signal.SIGINT,
    )
    assert r.returncode == 0 and "stopped by SIGINT" in r.stderr, r.stderr[-6000:]
    assert _exit_step(one_two) < 6
    r = run(launch_cmd(2, 0, data, one_two, "--batch_size_per_gpu", "2", "--max_steps", "6"))
    assert r.returncode == 0, r.stderr[-6000:]
    for out in (two_one, one_two):
        got = logged_losses(out)
        assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6], f"{out.name}: a step was logged twice or skipped"
        assert [v for _, v in got] == pytest.approx([v for _, v in reference], abs=1e-4)


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_two_rank_position_resumes_on_one_rank_without_repeats_or_skips(data, backend):
    """The samples of one epoch, 3 steps on 2 ranks then the rest on 1 rank: each image of the cut
    permutation exactly once."""
    kw = dict(seed=3, num_threads=1, global_size=32, local_size=16, local_crops_number=1)
    seen, states = [], []
    for rank in range(2):
        loader = pipeline_loader(backend, data, batch_size=2, rank=rank, world_size=2, **kw)
        loader.set_epoch(1)
        it = iter(loader)
        for _ in range(3):
            seen += next(it).paths
        states.append(loader.state_dict())
        it.close()
    one = pipeline_loader(backend, data, batch_size=4, **kw)
    one.load_state_dict(states[0])
    one.set_epoch(1)
    rest = [p for batch in one for p in batch.paths]
    assert len(rest) == (len(one) - 3) * 4
    paths = one.index.paths
    expected = [paths[i] for i in epoch_permutation(len(paths), 3, 1)[: len(one) * 4]]
    assert sorted(seen + rest) == sorted(expected) and len(set(seen + rest)) == len(expected)
    assert rest == expected[12:]  # and in the global order: step k covers perm[4k:4k+4]
