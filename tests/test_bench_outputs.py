"""A benchmark run by a user writes where --out says, by default under runs/ (ignored): never a tracked file."""

import subprocess
from pathlib import Path

import pytest

from mugs.benchmarks import loader, step, step_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.process
def test_default_outputs_are_ignored_paths_under_runs():
    defaults = [Path(loader.RESULTS), step_records.DEFAULT_OUT, Path(step.parse_args([])[0].out[0])]
    for path in defaults:
        assert not path.is_absolute() and path.parts[:2] == ("runs", "benchmarks"), path
        r = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)  # 0: ignored
        assert r.returncode == 0, f"{path} is not ignored by git"
        assert not subprocess.run(
            ["git", "ls-files", str(path)], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(), f"{path} is tracked"
