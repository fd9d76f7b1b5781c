"""train_fsdp.py end to end on CPU: flags, 2-rank FSDP runs, resume after SIGKILL, logs, NaN stop."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mugs.core import checkpoint as ckpt
from mugs.core.errors import EXIT_NONFINITE
from mugs.training.trainer import main as train_main
from train_helpers import launch_cmd, make_image_folder, run, train_cmd

pytestmark = pytest.mark.distributed  # torchrun runs: pyproject.toml's timeout_distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


def _final_state(out: Path) -> dict:
    path = ckpt.latest(str(out))
    assert path is not None, f"no checkpoint in {out}"
    ckpt.consolidate(path, out / "final.pt")
    return torch.load(out / "final.pt", weights_only=True)


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif torch.is_tensor(v):
            yield f"{prefix}{k}", v


def _assert_bitwise_equal(a: dict, b: dict):
    fa, fb = (
        dict(_flatten({k: a[k] for k in ("student", "teacher", "objective", "optimizer")})),
        dict(_flatten({k: b[k] for k in ("student", "teacher", "objective", "optimizer")})),
    )
    assert set(fa) == set(fb)
    diff = [k for k in fa if not torch.equal(fa[k], fb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--arch", "vit_huge"], "--arch"),
        (["--data_path", "/nonexistent/dir"], "does not exist"),
        (["--size_crops", "12"], "multiple of --patch_size"),
        (["--lr", "nan"], "--lr nan is out of range: must be > 0"),
        (["--lr", "-0.1"], "--lr -0.1 is out of range: must be > 0"),
        (["--size_crops", "96", "64"], "--size_crops 96 64: give one size"),
        (["--memory_size", "2", "--local_group_knn_top_n", "8"], "smaller than --local_group_knn_top_n"),
        (["--local_crops_scale", "0.5", "0.2"], "--local_crops_scale"),
        (["--use_bn_in_head", "maybe"], "true or false"),
    ],
)
def test_bad_flags_fail_at_start_with_one_clear_line(data, tmp_path, capsys, flags, needle):
    base = [
        "--data_path",
        str(data),
        "--output_dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--arch",
        "vit_tiny",
        "--batch_size_per_gpu",
        "8",
    ]
    try:
        code = train_main(base + flags)
    except SystemExit as e:  # argparse rejects malformed values itself
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert needle in err[-1]
    assert not (tmp_path / "checkpoints").exists()


def test_two_ranks_train_checkpoint_and_log(data, tmp_path):
    out = tmp_path / "run"
    r = run(train_cmd(2, 0, data, out, "--batch_size_per_gpu", "4", "--max_steps", "3"))
    assert r.returncode == 0, r.stderr[-12000:]
    meta = json.loads((ckpt.latest(str(out)) / "COMPLETE").read_text())
    assert meta["step"] == 3
    # progress with ETA on rank 0: stderr is a pipe here, so plain lines (the first and the last step), no bar
    assert re.search(r"^mugs: step 1/3 epoch 0 \| loss .* ETA .*mem ", r.stderr, re.M), r.stderr[-3000:]
    assert re.search(r"^mugs: step 3/3 .* img/s .* ETA 0:00:00 ", r.stderr, re.M) and "\r" not in r.stderr
    assert "reached --max_steps 3" in r.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "loss/total",
        "loss/instance",
        "loss/local_group",
        "loss/group",
        "sched/lr",
        "sched/weight_decay",
        "sched/teacher_momentum",
        "sched/teacher_temp",
        "data/weak_ratio",
        "perf/images_per_s",
        "perf/step_time_s",
    ):
        assert tag in tags, tag
    assert [e.step for e in ea.Scalars("loss/total")] == [1, 2, 3]
    assert all(e.value == e.value and e.value > 0 for e in ea.Scalars("loss/total"))
    log = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert log[-1]["event"] == "exit" and log[-1]["step"] == 3


def _wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists():
            return
        assert proc.poll() is None, "training ended before the checkpoint to kill at"
        time.sleep(0.2)
    raise AssertionError("checkpoint never appeared")


def _kill_process_tree(root: int) -> list:
    """SIGKILL `root` and every descendant at once (found through /proc); returns the pids killed."""
    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def test_resume_after_sigkill_and_after_crash_in_checkpoint_write_is_bitwise(data, tmp_path):
    flags = ("--batch_size_per_gpu", "4", "--max_steps", "5", "--ckpt_every_steps", "1")
    ref = tmp_path / "ref"
    r = run(train_cmd(2, 0, data, ref, *flags))
    assert r.returncode == 0, r.stderr[-12000:]

    # 1) SIGKILL the whole job once step 2's checkpoint is complete, then restart
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(2, 0, data, killed, *flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_for_checkpoint(killed, 2, proc)
    victims = _kill_process_tree(proc.pid)  # torchrun AND its workers (they run in sessions of their own)
    proc.wait()
    assert len(victims) >= 3, victims  # torchrun + 2 workers were alive and were killed
    killed_at = int(ckpt.latest(str(killed)).name.split("_")[1])
    assert killed_at < 5  # the job died mid-run: the restart below really resumes
    r = run(train_cmd(2, 0, data, killed, *flags))
    assert r.returncode == 0, r.stderr[-12000:]
    assert f"resumed from {killed / 'checkpoints' / f'step_{killed_at:08d}'} at step {killed_at}" in r.stderr
    _assert_bitwise_equal(_final_state(ref), _final_state(killed))

    # 2) crash while step 3's checkpoint is being written: it must not count, resume from step 2
    crashed = tmp_path / "crashed"
    # tests/hooks/sitecustomize.py
    hooks = f"{Path(__file__).parent / 'hooks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    r = run(train_cmd(2, 0, data, crashed, *flags), env={"MUGS_FAULT_CRASH_IN_SAVE": "3", "PYTHONPATH": hooks})
    assert r.returncode != 0
    assert list((crashed / "checkpoints").glob(".tmp-step_00000003.*"))  # the crashed write, unique to it
    assert ckpt.latest(str(crashed)).name == "step_00000002"
    r = run(train_cmd(2, 0, data, crashed, *flags))
    assert r.returncode == 0, r.stderr[-12000:]
    assert "step_00000002" in r.stderr
    _assert_bitwise_equal(_final_state(ref), _final_state(crashed))
    assert not list((crashed / "checkpoints").glob(".tmp-*"))


def test_nonfinite_loss_stops_naming_step_and_term_and_keeps_checkpoint(data, tmp_path):
    out = tmp_path / "nan"
    r = run(
        launch_cmd(
            1,
            0,
            data,
            out,
            "--batch_size_per_gpu",
            "8",
            "--max_steps",
            "6",
            "--ckpt_every_steps",
            "1",
            "--lr",
            "1e30",
            "--clip_grad",
            "0",
            "--warmup_epochs",
            "0",
        )
    )
    assert r.returncode == EXIT_NONFINITE, r.stderr[-3000:]  # the worker's code, passed on by mugs-train
    assert r.stderr.count("mugs: error: step ") == 1, r.stderr[-3000:]  # said once, as one line
    # the step and the term, in the step's own words (progress lines also say "step ", so match the message)
    assert re.search(r"step \d+: non-finite loss in (instance|local_group|group|total)", r.stderr), r.stderr[-3000:]
    last = ckpt.latest(str(out))
    assert last is not None and (last / "COMPLETE").exists()
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_two_rank_run_matches_one_process_with_the_same_global_batch(data, tmp_path):
    """Per-sample augmentation seeds make the crops independent of the rank layout, so the
    only differences left are the order of summation (fp32): 3 steps stay within 1e-4."""
    flags = ("--max_steps", "3", "--clip_grad", "0.5", "--lr", "0.01", "--warmup_epochs", "0")
    r1 = run(train_cmd(1, 0, data, tmp_path / "one", "--batch_size_per_gpu", "8", *flags))
    assert r1.returncode == 0, r1.stderr[-4000:]
    r2 = run(train_cmd(2, 0, data, tmp_path / "two", "--batch_size_per_gpu", "4", *flags))
    assert r2.returncode == 0, r2.stderr[-4000:]
    one, two = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    fa = dict(_flatten({k: one[k] for k in ("student", "teacher")}))
    fb = dict(_flatten({k: two[k] for k in ("student", "teacher")}))
    worst = max((fa[k].float() - fb[k].float()).abs().max().item() for k in fa)
    assert worst < 1e-4, worst
    moved = (
        (fa["student.backbone.blocks.0.mlp.fc1.weight"] - fa["teacher.backbone.blocks.0.mlp.fc1.weight"]).abs().max()
    )
    assert moved > 1e-4  # the comparison is not between two untouched initialisations
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = []
    for out in ("one", "two"):
        ea = EventAccumulator(str(tmp_path / out / "tb"))
        ea.Reload()
        losses.append([e.value for e in ea.Scalars("loss/total")])
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
