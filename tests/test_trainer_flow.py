"""The trainer's control flow around checkpoints, in one process: resume messages go through the
Monitor (it exists before the resume), and a stop records its machine-read StopReason beside its words."""

import json
from pathlib import Path

import pytest

from mugs.training.exit_reason import StopReason
from train_helpers import make_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


def test_resume_warnings_go_through_the_monitor(make_run, monkeypatch):
    from mugs.training.monitor import Monitor

    first = make_run()
    first.checkpointer.save(0, keep_forever=False)
    first.checkpointer.save(1, keep_forever=False)  # then broken
    (Path(first.cfg.output_dir) / "checkpoints" / "step_00000001" / "__0_0.distcp").unlink()
    said = []
    monkeypatch.setattr(Monitor, "message", lambda self, text: said.append(text))
    second = make_run()
    second.start()  # the top of train(): the resume
    assert second.step == 0 and second.resumed_from.name == "step_00000000"
    assert any("checkpoint step_00000001 does not load" in m for m in said), said
    assert any("set aside step_00000001 as broken-step_00000001" in m for m in said), said


def test_a_stop_file_ends_the_loop_as_stop_file(make_run):
    run = make_run("--ckpt_every_steps", "0")
    run.stop.stop_file.touch()
    assert run.train() == 0
    assert run.exit_reason is StopReason.STOP_FILE and run.reason == "stopped by STOP file"
    log = [json.loads(line) for line in open(run.cfg.output_dir + "/log.txt")]
    assert [r for r in log if r.get("event") == "exit"] == [{"event": "exit", "reason": "stop_file", "step": 1}]


def test_a_stop_file_another_rank_saw_first_is_named_on_this_one(make_run):
    """Each rank samples its stop request before the step; the agreed flag may come from a rank that saw
    the STOP file when this one had not yet: this rank's exit record (what slurm/launch.sh reads to decide
    a requeue) still says stop_file, not other_rank. (Seen in CI: "a signal on another rank".)"""
    run = make_run("--ckpt_every_steps", "0")
    assert not run.stop.requested()  # this rank's sample, before the file existed
    run.stop.stop_file.touch()  # then another rank's sample saw it, and the step's flag says stop
    run.after_step(stop_now=True)
    assert run.exit_reason is StopReason.STOP_FILE and run.reason == "stopped by STOP file"
    run.stop.stop_file.unlink()
    other = make_run("--ckpt_every_steps", "0")  # a signal only another rank got: named as such
    other.after_step(stop_now=True)
    assert other.exit_reason is StopReason.OTHER_RANK and other.reason == "stopped by a signal on another rank"
