"""The tools check where they will write before the work starts (one line, exit 2), print plain progress
lines where stderr is not a terminal, and start no more loader workers than the cores they may use."""

import os
import sys

import pytest

from mugs.eval import attention, cli, export, knn, linear, tsne
from mugs.training import consolidate


@pytest.fixture
def under_a_file(tmp_path):
    """A path whose folder is a file: no write can succeed there (also as root)."""
    (tmp_path / "f").write_text("x")
    return tmp_path / "f" / "result"


def _cases(tmp, out):
    missing = str(tmp / "missing")  # a checkpoint / data that does not exist: the work would fail on it first
    return [
        ("export", export.main, [missing, "--out", str(out)], "--out"),
        ("consolidate", consolidate.main, [missing, "--out", str(out)], "--out"),
        ("knn --out", knn.main, [missing, "--data_path", missing, "--out", str(out)], "--out"),
        ("knn --cache", knn.main, [missing, "--data_path", missing, "--cache", str(out)], "--cache"),
        ("attention", attention.main, [missing, "--checkpoint", missing, "--out", str(out)], "--out"),
        ("linear", linear.main, [missing, "--data_path", missing, "--output_dir", str(out)], "--output_dir"),
        ("tsne", tsne.main, ["--checkpoint", missing, "--data", missing, "--out", str(out)], "--out"),
    ]


@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _cases(__import__("pathlib").Path("."), "o")])
def test_an_unwritable_output_is_refused_before_the_work(case, tmp_path, under_a_file, capsys):
    """f9e9db5: each read the checkpoint first (mugs-eval-knn ran the whole evaluation) and then failed to
    write with a 22-40-line traceback; here the unreadable checkpoint would fail first if the output were
    not checked first."""
    name, main, argv, flag = _cases(tmp_path, under_a_file)[case]
    assert main(argv) == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {flag} {under_a_file}" in err[0] and "not writable" in err[0], err
    assert not (tmp_path / "missing").exists()


def test_progress_is_plain_lines_off_a_terminal_and_a_bar_on_one(monkeypatch, capsys):
    lines = list(cli.progress(list(range(25)), "features (train)"))
    assert lines == list(range(25))
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0] == "features (train): 1/25 batches, 0.0 s"
    assert err.splitlines()[-1].startswith("features (train): 25/25 batches") and len(err.splitlines()) <= 13
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    from tqdm import tqdm

    assert isinstance(cli.progress([1, 2], "x"), tqdm)


def test_loader_workers_default_to_the_cores_this_process_may_use(monkeypatch):
    """f9e9db5 started 10 workers per process on a 2-core machine."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for tool in (knn, linear, tsne):
        assert tool.parser().parse_args(_minimal(tool)).num_workers == 2, tool
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cli.default_workers() == cli.MAX_WORKERS == 10


def _minimal(tool):
    return {knn: ["ck"], linear: ["ck"], tsne: ["--checkpoint", "ck", "--data", "d", "--out", "o.png"]}[tool]
