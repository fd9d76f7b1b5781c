"""A worker that finished and saved exits with its own code even when interpreter teardown would
abort. CI once saw a finished 2-rank run fail because rank 1 hit SIGABRT ("terminate called without
an active exception") while Python finalised under gloo's threads; an atexit abort stands in for it."""

import sys

import pytest

from train_helpers import ROOT, TINY_FLAGS, make_image_folder, run

ABORT_AT_TEARDOWN = """import atexit, os, runpy, sys
atexit.register(os.abort)  # what a C++ thread dying during finalisation does to the process
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
runpy.run_path(target, run_name="__main__") if kind == "path" else runpy.run_module(target, run_name="__main__")
"""


@pytest.mark.parametrize(
    "entry",
    [("path", str(ROOT / "train_fsdp.py")), ("module", "mugs.training.trainer")],
    ids=["train_fsdp.py", "python -m mugs.training.trainer"],
)
@pytest.mark.process
def test_a_finished_worker_exits_zero_even_if_teardown_would_abort(entry, tmp_path):
    data = make_image_folder(tmp_path / "imgs")
    script = tmp_path / "abort_at_teardown.py"
    script.write_text(ABORT_AT_TEARDOWN)
    out = tmp_path / "run"
    r = run(
        [
            sys.executable,
            str(script),
            *entry,
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            *TINY_FLAGS,
            "--batch_size_per_gpu",
            "4",
            "--max_steps",
            "1",
        ],
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reached --max_steps 1" in r.stderr
    assert (out / "checkpoints").is_dir()
