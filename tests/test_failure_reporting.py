"""Failure reporting (issue 25): any write failure of a run (TensorBoard, log.txt, config.json, as for a
checkpoint) is one line naming the folder and its free space, exit 4; mugs-train names the rank that failed
first by its own exit, never one torchrun terminated; ranks torn down after a peer's failure print no
backend traceback; a stop signal during a worker's start-up stops the run like one during training."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mugs.core.dist import peer_failure
from mugs.core.errors import EXIT_WRITE, OutputWriteError
from mugs.training import failure, monitor
from mugs.training.monitor import Monitor
from train_helpers import launch_cmd, make_image_folder, run

HOOKS = str(Path(__file__).parent / "hooks")  # tests/hooks/sitecustomize.py: injected faults


def _full_disk(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_under_log_txt_is_one_line_exit_4_naming_the_folder_and_free_space(tmp_path, monkeypatch):
    mon = Monitor(str(tmp_path), 10, 0, enabled=True, bar=False)
    monkeypatch.setattr(monitor, "open", _full_disk, raising=False)
    with pytest.raises(OutputWriteError) as e:
        mon.log({"step": 1})
    msg = str(e.value)
    assert e.value.exit_code == EXIT_WRITE == 4 and "\n" not in msg
    assert msg.startswith(f"cannot write log.txt to {tmp_path} (No space left on device; ") and " free)" in msg, msg
    monkeypatch.undo()
    mon.close()


def test_a_full_disk_under_tensorboard_is_one_line_exit_4(tmp_path, monkeypatch):
    from torch.utils.tensorboard import writer

    mon = Monitor(str(tmp_path), 10, 0, enabled=True, bar=False)
    monkeypatch.setattr(writer.FileWriter, "add_event", _full_disk)
    with pytest.raises(
        OutputWriteError,
        match=rf"^cannot write the TensorBoard events to {tmp_path / 'tb'} "
        r"\(No space left on device; [\d.]+ [MG]B free\)",
    ):
        mon.step(1, {"loss/total": 1.0})
    monkeypatch.undo()
    mon.close()


def test_closing_after_a_failure_keeps_the_first_error(tmp_path, monkeypatch):
    """A run that fails for another reason is not reported as a log failure by the monitor's close."""
    mon = Monitor(str(tmp_path), 10, 0, enabled=True, bar=False)
    monkeypatch.setattr(mon.writer, "close", _full_disk)
    with pytest.raises(ValueError, match="the run's own error"):
        try:
            raise ValueError("the run's own error")
        finally:
            mon.close()
    with pytest.raises(OutputWriteError):
        mon.close()


def _failed(code, record=None):
    data = None if record is None else {"message": {"extraInfo": {"mugs": record}}}
    return SimpleNamespace(exitcode=code, error_file_data=data)


def test_blame_names_the_rank_that_exited_not_the_one_torchrun_terminated():
    """The probe: rank 0 hit ENOSPC (a traceback, exit 1), torchrun then SIGTERMed rank 1; f9e9db5 named rank 1."""
    rank, code, why = failure.blame({0: _failed(1), 1: _failed(-signal.SIGTERM)})
    assert rank == 0 and why.startswith("worker rank 0 exited with code 1"), why


def test_blame_prefers_a_ranks_own_failure_over_one_that_saw_its_peer_fail():
    peer = {
        "message": "stopped because another rank failed (Connection closed by peer)",
        "exit_code": 1,
        "time": 10.0,
        "rank": 0,
        "peer": True,
    }
    own = {"message": "cannot write log.txt", "exit_code": 4, "time": 10.5, "rank": 1, "peer": False}
    assert failure.blame({0: _failed(1, peer), 1: _failed(4, own)})[:2] == (1, 4)
    # a rank killed by SIGKILL (out of memory) caused its peer's failure
    assert failure.blame({0: _failed(1, peer), 1: _failed(-signal.SIGKILL)})[0] == 1
    # only torn-down ranks left: the earliest peer is named, not a terminated one
    assert failure.blame({0: _failed(-signal.SIGTERM), 1: _failed(1, {**peer, "rank": 1})})[0] == 1


def test_a_peers_death_is_recognised_in_the_backends_words():
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
        "[127.0.0.1]:927. This is typically caused by a remote worker crashing."
    )
    assert peer_failure(gloo) == "Connection closed by peer [127.0.0.1]:927"
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_failure(ValueError("Connection closed by peer")) is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_tensorboard_full_disk_mid_run_names_rank_0_exit_4_and_no_traceback(data, tmp_path):
    """The probe: a disk that filled between checkpoints was 163 lines, 3 tracebacks, exit 1, and the last
    line blamed rank 1 'killed by SIGTERM'."""
    out = tmp_path / "run"
    env = {"MUGS_FAULT_ENOSPC_IN_TB": "2", "PYTHONPATH": f"{HOOKS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run(launch_cmd(2, 0, data, out, "--batch_size_per_gpu", "4", "--max_steps", "4"), env=env, timeout=280)
    assert r.returncode == 4, r.stderr[-6000:]
    assert "Traceback" not in r.stderr, r.stderr[-6000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"mugs-train: error: worker rank 0 failed first (exit 4): cannot write the TensorBoard "
        f"events to {out / 'tb'} (No space left on device; "
    ), last
    assert len([ln for ln in r.stderr.splitlines() if "error:" in ln]) == 2, r.stderr[
        -3000:
    ]  # rank 0's, the launcher's
    assert len(r.stderr.strip().splitlines()) <= 5, r.stderr[-3000:]


def _workers(launcher: int):
    kids = []
    for t in os.listdir(f"/proc/{launcher}/task"):
        try:
            kids += [int(c) for c in Path(f"/proc/{launcher}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    out = []
    for k in kids:
        try:
            if b"TORCHELASTIC_RUN_ID" in Path(f"/proc/{k}/environ").read_bytes():
                out.append(k)
        except OSError:
            pass
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_worker_start_up_stops_with_a_checkpoint(data, tmp_path, sig):
    """f9e9db5: SIGTERM while the workers imported torch killed them (exit 1, no checkpoint); SIGINT gave
    KeyboardInterrupt tracebacks."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        launch_cmd(2, 0, data, out, "--batch_size_per_gpu", "4", "--max_steps", "50"),
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    t0 = time.time()
    while not _workers(proc.pid):
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    time.sleep(0.2)  # the workers are importing torch
    os.kill(proc.pid, sig)  # mugs-train passes it to every worker
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-6000:]
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name} at step 1/" in err, err[-3000:]
    assert (out / "checkpoints" / "step_00000001" / "COMPLETE").exists()
    exits = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if '"exit"' in line]
    assert exits and exits[-1]["reason"] != "finished", exits


@pytest.mark.process
def test_the_early_handlers_stay_out_of_a_process_that_only_imports_the_trainer():
    code = (
        "import signal; from mugs.training import trainer, early_signals; "
        "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, early_signals.caught)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["True", "[]"], r.stderr[-2000:]
