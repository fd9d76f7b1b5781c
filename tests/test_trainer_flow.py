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
