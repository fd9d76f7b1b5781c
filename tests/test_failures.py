"""Every failure of a 2-rank run through mugs-train is named in the last line: a full disk (one line
naming the folder and its free space, exit 4, the partial checkpoint removed, the previous one
resumes), a truncated JPEG mid-run (the file and the rank that read it, exit 2), a worker killed by
a signal (named as such, not the rank merely torn down with it)."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mugs.core import checkpoint as ckpt
from train_helpers import launch_cmd, make_image_folder, run

HOOKS = str(Path(__file__).parent / "hooks")  # tests/hooks/sitecustomize.py: injected faults
FLAGS = ("--batch_size_per_gpu", "4", "--ckpt_every_steps", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


def _last(r: subprocess.CompletedProcess) -> str:
    return r.stderr.strip().splitlines()[-1]


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (where this process may mount one: root, CI), else None."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.process
@pytest.mark.timeout(900)
@pytest.mark.parametrize("how", ["tmpfs", "enospc_on_rank_1"])
def test_full_disk_is_one_line_exit_4_and_the_previous_checkpoint_resumes(data, tmp_path, small_disk, how):
    if how == "tmpfs" and small_disk is None:
        pytest.skip("cannot mount a tmpfs here (not root); the injected ENOSPC covers the same path")
    out = (small_disk if how == "tmpfs" else tmp_path) / "run"
    r = run(launch_cmd(2, 0, data, out, *FLAGS, "--max_steps", "1"))
    assert r.returncode == 0, r.stderr[-6000:]
    size = sum(p.stat().st_size for p in ckpt.latest(str(out)).iterdir())
    env, filler = {}, None
    if how == "tmpfs":
        filler = _fill(small_disk, leave=size // 2)  # room for the logs, not for a checkpoint
    else:
        env = {"MUGS_FAULT_ENOSPC_IN_SAVE": "2", "PYTHONPATH": f"{HOOKS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run(launch_cmd(2, 0, data, out, *FLAGS, "--max_steps", "3"), env=env)
    last = _last(r)
    assert r.returncode == 4, r.stderr[-6000:]
    assert "Traceback" not in r.stderr and "CheckpointException" not in r.stderr, r.stderr[-6000:]
    assert re.search(
        r"^mugs-train: error: worker rank \d failed first \(exit 4\): cannot write checkpoint step 2 "
        rf"to {re.escape(str(out / 'checkpoints'))} \(.*No space left on device.*; [\d.]+ [MG]B free\)",
        last,
    ), last
    assert f"the last complete one ({out / 'checkpoints' / 'step_00000001'}) is intact" in last
    errors = [line for line in r.stderr.splitlines() if line.startswith("mugs: error:")]
    assert len(errors) == 1, errors  # the ranks agreed: rank 0 says it once, the launcher repeats it last
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]  # the partial one removed
    if filler is not None:
        filler.unlink()
    r = run(launch_cmd(2, 0, data, out, *FLAGS, "--max_steps", "3"))
    assert r.returncode == 0, r.stderr[-6000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000001'} at step 1" in r.stderr
    assert ckpt.latest(str(out)).name == "step_00000003"


@pytest.mark.process
@pytest.mark.timeout(600)
def test_truncated_jpeg_mid_run_names_the_file_and_the_rank_in_the_last_line(tmp_path):
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=8)
    victim = sorted(data.rglob("*.JPEG"))[3]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 3])
    r = run(launch_cmd(2, 0, data, tmp_path / "run", "--batch_size_per_gpu", "4", "--max_steps", "6"))
    last = _last(r)
    assert r.returncode == 2, r.stderr[-6000:]
    m = re.match(
        rf"mugs-train: error: worker rank (\d) failed first \(exit 2\): cannot decode {re.escape(str(victim))}", last
    )
    assert m, last
    said = [
        line
        for line in r.stderr.splitlines()
        if line.startswith(f"[rank{m.group(1)}]:mugs: error:") or line.startswith("mugs: error:")
    ]
    assert any(str(victim) in line for line in said), r.stderr[-4000:]  # the failing worker said it too


@pytest.mark.process
@pytest.mark.timeout(600)
def test_a_worker_killed_by_a_signal_is_named_not_the_rank_torn_down_with_it(data, tmp_path):
    out = tmp_path / "run"
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        launch_cmd(2, 0, data, out, "--batch_size_per_gpu", "4", "--epochs", "100", "--ckpt_every_steps", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )
    t0 = time.time()
    while not (out / "checkpoints" / "step_00000002" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[1][-4000:]
        time.sleep(0.1)
    workers = {}
    for p in Path("/proc").iterdir():
        try:
            env = (p / "environ").read_bytes().split(b"\0") if p.name.isdigit() else []
        except OSError:
            continue
        if any(x.startswith(b"TORCHELASTIC_RUN_ID") for x in env) and str(out).encode() in (p / "cmdline").read_bytes():
            rank = next(x for x in env if x.startswith(b"RANK=")).split(b"=")[1].decode()
            workers[rank] = int(p.name)
    os.kill(workers["1"], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("mugs-train: error: worker rank 1 was killed by SIGKILL"), last


def test_a_failed_write_on_an_almost_empty_disk_is_named_a_full_disk(monkeypatch, tmp_path):
    """torch's zip writer reports ENOSPC as 'unexpected pos N vs M': the line still says the disk is full."""
    import collections
    import shutil

    from mugs.core import checkpoint as ckpt

    usage = collections.namedtuple("usage", "total used free")
    zip_error = (
        "writing the shards: RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    )
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 1000, 1000))
    assert ckpt._write_failure(zip_error, tmp_path) == f"No space left on device ({zip_error}); 0.0 MB free"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 2**39, 2**39))
    assert ckpt._write_failure("Permission denied", tmp_path) == "Permission denied; 512.00 GB free"
