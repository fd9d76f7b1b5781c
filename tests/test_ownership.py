"""One owner per output dir: a second launch is refused in one line naming the owner and the first run
goes on untouched; a stale lease, or one of this very SLURM job (requeued), is taken over; a run that
lost its lease publishes no checkpoint; temporary checkpoint names are unique per writer."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval_helpers as H
from mugs.core import checkpoint as ckpt
from mugs.core import lease, lease_owner
from mugs.core.errors import OwnerError
from train_helpers import free_port, launch_cmd, logged_losses, make_image_folder, plant_lease, run, train_cmd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


# ---------------------------------------------------------------- the lease itself (one process)
@pytest.mark.timeout(30)
def test_a_live_lease_refuses_a_second_owner_naming_the_first(tmp_path):
    first = lease.acquire(tmp_path / "out")
    try:
        with pytest.raises(OwnerError) as e:
            lease.acquire(tmp_path / "out")
        msg = str(e.value)
        assert "\n" not in msg and "in use by another run" in msg
        assert f"host {socket.gethostname()} pid {os.getpid()}" in msg and ".mugs-owner" in msg
        assert lease_owner.read_owner(tmp_path / "out")["token"] == first.token  # the first owner untouched
    finally:
        first.release()
    assert lease_owner.read_owner(tmp_path / "out") is None  # released: the next run may take it
    lease.acquire(tmp_path / "out").release()


@pytest.mark.timeout(30)
def test_the_launchers_check_refuses_what_taking_the_lease_refuses(tmp_path, monkeypatch):
    """`peek` (mugs-train's check before it starts anything) and `acquire` agree: a fresh lease that
    does not parse is a live owner to both, whether or not this process carries a lease token."""
    out = tmp_path / "out"
    out.mkdir()
    (out / lease_owner.LEASE_FILE).write_text("{half a lease")
    monkeypatch.delenv(lease.TOKEN_ENV, raising=False)
    for check in (lease.peek, lease.acquire):
        with pytest.raises(OwnerError, match="in use by another run"):
            check(out)
    monkeypatch.setenv(lease.TOKEN_ENV, "0" * 32)  # a token of our own is not the unreadable lease's
    with pytest.raises(OwnerError, match="in use by another run"):
        lease.peek(out)
    plant_lease(out, token="0" * 32)  # the launcher's own lease, as its worker sees it: not a refusal
    lease.peek(out)


@pytest.mark.process
@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["old_heartbeat", "same_slurm_job", "dead_pid_on_this_host"])
def test_a_stale_lease_is_taken_over_with_a_message(tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    if how == "old_heartbeat":
        plant_lease(out, heartbeat=time.time() - lease_owner.stale_after_s() - 5)
        why = "heartbeat is"
    elif how == "same_slurm_job":
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        plant_lease(out, slurm_job_id="777")
        why = "this SLURM job (777), requeued"
    else:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        plant_lease(out, host=socket.gethostname(), pids=[dead.pid])
        why = "processes on this host are gone"
    notes = []
    held = lease.acquire(out, log=notes.append)
    try:
        assert len(notes) == 1 and "took over the lease" in notes[0] and why in notes[0], notes
        assert "node-17" in notes[0] or socket.gethostname() in notes[0]
        assert lease_owner.read_owner(out)["token"] == held.token
    finally:
        held.release()


@pytest.mark.timeout(30)
def test_a_run_that_lost_its_lease_publishes_nothing(tmp_path):
    """Its heartbeat found another owner: the save removes its partial write and raises OwnerError."""
    cfg = H.tiny_cfg()
    out = tmp_path / "run"
    H.save_run(out, cfg, step=6)
    held = lease.acquire(out)
    try:
        plant_lease(out, token="f" * 32)  # taken over (as by a run that judged us stale)
        with pytest.raises(OwnerError, match="no longer owns it"):
            H.save_run(out, cfg, step=7)
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000006"]
    finally:
        held.release()
    assert lease_owner.read_owner(out)["token"] == "f" * 32  # not ours: release leaves it


@pytest.mark.process
@pytest.mark.timeout(60)
def test_temporary_checkpoint_names_are_unique_per_writer(tmp_path, monkeypatch):
    """Two writers of the same step never share a directory (each write's name carries host, pid and
    a random part); a crashed writer's leftover is removed once its process is gone."""
    cfg = H.tiny_cfg()
    out = tmp_path / "run"
    made = []
    real_mkdir = Path.mkdir

    def spy(self, *a, **k):
        if self.name.startswith(ckpt.TMP_PREFIX) and self.name not in made:  # (DCP makes it again)
            made.append(self.name)
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", spy)
    H.save_run(out, cfg, step=6)
    H.save_run(out, cfg, step=6)
    assert len(made) == 2 and made[0] != made[1], made
    host, pid = made[0].split(".")[-3], made[0].split(".")[-2]
    assert made[0].startswith(".tmp-step_00000006.") and socket.gethostname().endswith(host) and pid == str(os.getpid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = out / "checkpoints" / f".tmp-step_00000007.{socket.gethostname()}.{dead.pid}.abcd1234"
    live = out / "checkpoints" / f".tmp-step_00000007.{socket.gethostname()}.{os.getpid()}.live0000"
    leftover.mkdir(), live.mkdir()
    H.save_run(out, cfg, step=8)
    assert not leftover.exists() and live.exists()  # a live writer's directory is never removed


# ---------------------------------------------------------------- two launches into one output dir
@pytest.mark.process
@pytest.mark.timeout(600)
def test_second_launch_is_refused_and_the_first_run_is_untouched(data, tmp_path):
    out = tmp_path / "run"
    # runs until STOP: 10,000 steps (13 min at the fastest pace seen, 0.08 s/step); 100 epochs (200 steps)
    # were over before the STOP file on a fast day, and the run ended "finished" instead
    flags = ("--batch_size_per_gpu", "4", "--epochs", "5000", "--ckpt_every_steps", "5")
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        launch_cmd(2, 0, data, out, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e
    )
    try:
        t0 = time.time()
        while not (out / "checkpoints" / "step_00000005" / "COMPLETE").exists():
            assert first.poll() is None, first.communicate()[1][-6000:]
            assert time.time() - t0 < 300
            time.sleep(0.1)
        owner = lease_owner.read_owner(out)
        assert owner is not None and first.pid in owner["pids"]
        # mugs-train: refused by the launcher's check, before any worker starts
        second = run(launch_cmd(2, 0, data, out, *flags), timeout=120)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert "in use by another run" in lines[-1] and f"pid {first.pid}" in lines[-1]
        # plain torchrun: rank 0's worker takes the lease and refuses, every rank stops
        third = run(train_cmd(2, free_port(), data, out, *flags), timeout=300)
        assert third.returncode != 0
        errors = [line for line in third.stderr.splitlines() if "mugs: error:" in line]
        assert len(errors) == 1 and "in use by another run" in errors[0], third.stderr[-3000:]
        assert first.poll() is None, "the first run stopped while the others were refused"
        (out / "STOP").touch()  # the first run saves and exits 0
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-6000:]
    steps = [s for s, _ in logged_losses(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 5  # no step trained or logged twice
    assert "stopped by STOP file" in stderr, stderr[-2000:]
    assert lease_owner.read_owner(out) is None  # the run released it on the way out


@pytest.mark.process
@pytest.mark.timeout(300)
def test_launch_over_a_stale_lease_takes_it_over(data, tmp_path):
    out = tmp_path / "run"
    plant_lease(out, heartbeat=time.time() - 10 * lease_owner.STALE_AFTER_S)
    r = run(launch_cmd(1, 0, data, out, "--batch_size_per_gpu", "4", "--max_steps", "1"), timeout=240)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "took over the lease" in r.stderr and "node-17" in r.stderr
    assert ckpt.latest(str(out)).name == "step_00000001" and lease_owner.read_owner(out) is None
