"""The output dir at start: a lease stamped further in the future than the stale limit is clock skew
(taken over with a note, not a day-long block); lease contents that do not read (random bytes, a
directory or a FIFO under its name: never opened) are one line; a filesystem without hard links still
takes the lease (an O_EXCL create); `checkpoints` or a `step_N` that is not a directory is refused
before any worker starts (one line, exit 2) instead of failing the first save."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from mugs.core import checkpoint as ckpt
from mugs.core import lease, lease_owner
from mugs.core.errors import CheckpointError, OwnerError
from mugs.training import launch
from train_helpers import TINY_FLAGS, make_image_folder, plant_lease


@pytest.mark.timeout(30)
def test_a_heartbeat_a_day_in_the_future_is_clock_skew_taken_over_with_a_note(tmp_path):
    out = tmp_path / "out"
    plant_lease(out, heartbeat=time.time() + 86400)
    notes = []
    held = lease.acquire(out, log=notes.append)
    try:
        assert lease_owner.read_owner(out)["token"] == held.token
        assert len(notes) == 1 and "took over" in notes[0] and "clock skew" in notes[0], notes
        assert "86400 s in the future" in notes[0] or "86399 s in the future" in notes[0], notes
    finally:
        held.release()


@pytest.mark.timeout(30)
def test_a_heartbeat_slightly_ahead_is_still_a_live_owner(tmp_path):
    out = tmp_path / "out"
    plant_lease(out, heartbeat=time.time() + lease_owner.stale_after_s() / 2)  # within the limit: clocks merely differ
    with pytest.raises(OwnerError, match="in use by another run"):
        lease.acquire(out)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", ["random_bytes", "wrong_types", "directory", "fifo"])
def test_lease_contents_that_do_not_read_are_one_line(tmp_path, what):
    out = tmp_path / "out"
    out.mkdir()
    f = out / lease_owner.LEASE_FILE
    if what == "random_bytes":
        f.write_bytes(bytes(range(128, 256)) * 4)
    elif what == "wrong_types":
        f.write_text(json.dumps({"host": "x", "heartbeat": "yesterday", "pids": ["a"]}))
    elif what == "directory":
        f.mkdir()
    else:
        os.mkfifo(f)
    for check in (lease.peek, lease.acquire):
        with pytest.raises(OwnerError) as e:
            check(out)
        msg = str(e.value)
        assert "\n" not in msg and str(out) in msg, msg
        if what in ("directory", "fifo"):
            assert ("a directory" if what == "directory" else "a FIFO") in msg and "remove it" in msg, msg
        else:
            assert "in use by another run" in msg and "does not read as one" in msg, msg


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP])
def test_a_filesystem_without_hard_links_takes_the_lease_exclusively(tmp_path, monkeypatch, code):
    def no_links(src, dst, *a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "out"
    first = lease.acquire(out)
    try:
        assert lease_owner.read_owner(out)["token"] == first.token
        with pytest.raises(OwnerError, match="in use by another run"):  # still exclusive
            lease.acquire(out)
        assert sorted(p.name for p in out.iterdir()) == [lease_owner.LEASE_FILE, lease.LOCK_FILE]  # no temporary left
    finally:
        first.release()
    assert lease_owner.read_owner(out) is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["checkpoints_file", "step_file"])
def test_checkpoints_or_a_step_that_is_not_a_directory_is_refused_at_start(data, tmp_path, capsys, what):
    out = tmp_path / "run"
    root = ckpt.checkpoint_root(out)
    if what == "checkpoints_file":
        out.mkdir()
        root.write_text("not a folder")
        bad = root
    else:
        root.mkdir(parents=True)
        bad = root / "step_00000004"
        bad.write_text("")
    with pytest.raises(CheckpointError, match="not a directory"):
        ckpt.check_root(out)
    flags = [
        "--check_only",
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        *TINY_FLAGS,
        "--batch_size_per_gpu",
        "4",
    ]
    assert launch.main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: not a directory" in err[0], err


@pytest.mark.process
@pytest.mark.timeout(60)
def test_a_fifo_lease_does_not_hang_the_launchers_check(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / lease_owner.LEASE_FILE)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mugs.training.launch",
            "--check_only",
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            *TINY_FLAGS,
            "--batch_size_per_gpu",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert r.returncode == 2 and "a FIFO" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
