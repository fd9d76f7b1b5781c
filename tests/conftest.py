"""Fixtures shared across test files: a small JPEG tree, the package installed from its wheel, and a
real trainer Run built in this process."""

import _posixsubprocess
import os
import shutil
import signal
import site
import subprocess
import sys
from pathlib import Path

import pytest

from images import make_tree

ROOT = Path(__file__).resolve().parents[1]
# The tiers (pyproject.toml's markers; each has its own time limit there). A test without one of these
# markers is in the fast unit tier (`-m unit`), which starts no other process: `no_process_in_unit_tier`.
TIME_LIMIT_TIERS = ("process", "distributed", "slurm", "quickstart")
# one-off system probes that libraries run on first import (ctypes.util.find_library runs `ldconfig -p`):
# not a process the test starts, and which test meets them first depends on the order
LIBRARY_PROBES = {"ldconfig"}


def pytest_addoption(parser):
    for tier in TIME_LIMIT_TIERS:
        parser.addini(f"timeout_{tier}", f"time limit in seconds of tests marked {tier} (pytest-timeout)")


def pytest_collection_modifyitems(config, items):
    """A tier's marker sets the test's pytest-timeout limit (the longest of its tiers); an explicit
    @pytest.mark.timeout wins. A test in none of them is marked `unit`."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIME_LIMIT_TIERS):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("timeout") is not None:
            continue
        limits = [
            float(config.getini(f"timeout_{t}"))
            for t in TIME_LIMIT_TIERS
            if item.get_closest_marker(t) is not None and config.getini(f"timeout_{t}")
        ]
        if limits:
            item.add_marker(pytest.mark.timeout(max(limits)))


@pytest.fixture(autouse=True)
def no_process_in_unit_tier(request, monkeypatch):
    """A unit-tier test that starts a process (subprocess, multiprocessing, os.fork) fails, naming what it
    started: such a test belongs to the `process` tier (or a slower one), with that tier's time limit."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    started = []

    def recorder(name, real):
        def record(*args, **kwargs):
            argv = args[0] if args and isinstance(args[0], (list, tuple)) else ()
            if not (argv and os.path.basename(os.fsdecode(argv[0])) in LIBRARY_PROBES):
                started.append(name)
            return real(*args, **kwargs)

        return record

    for module, name in (
        (subprocess, "_fork_exec"),
        (_posixsubprocess, "fork_exec"),
        (os, "fork"),
        (os, "posix_spawn"),
        (os, "posix_spawnp"),
        (os, "system"),
    ):
        if getattr(module, name, None) is not None:
            monkeypatch.setattr(module, name, recorder(f"{module.__name__}.{name}", getattr(module, name)))
    yield
    if started:
        pytest.fail(
            f"a unit-tier test started {len(started)} process(es) ({', '.join(sorted(set(started)))}): "
            "mark it @pytest.mark.process",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tree16(tmp_path_factory):
    """2 classes x 8 valid 48x64 JPEGs."""
    root = str(tmp_path_factory.mktemp("tree16"))
    return root, make_tree(root, classes=2, per_class=8)


def _clean_env() -> dict:
    """The environment without anything that points Python at the source tree."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _package_dirs() -> list:
    """The running interpreter's package folders, whatever it is (a venv, a conda env, the system Python):
    its site-packages (also those of a venv inside the checkout, as `python3 -m venv .venv` makes) and
    the other existing folders on its sys.path outside the checkout (not tests/, not the sources)."""
    sites = list(site.getsitepackages()) + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    others = [d for d in sys.path if d and not (Path(d).resolve() == ROOT or ROOT in Path(d).resolve().parents)]
    out = []
    for d in sites + others:
        if os.path.isdir(d) and str(Path(d).resolve()) not in out:  # not '', zip files, editable path hooks
            out.append(str(Path(d).resolve()))
    return out


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """A venv holding mugs installed NON-editable from a wheel built from a copy of the tracked files.

    The venv sees the packages of the interpreter running the tests (torch, DALI, timm: a `.pth` file
    lists its package folders, so this works from a venv, a conda env or the system Python alike) but not
    the work tree; the fixture checks that `mugs` is imported from the venv. Returns (venv bin dir, env)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    env = _clean_env()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    wheel = next((tmp / "dist").glob("mugs-*.whl"))
    venv = tmp / "venv"
    # not --system-site-packages: from inside a venv that would link the BASE interpreter's packages
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bindir = venv / "bin"
    subprocess.run(
        [str(bindir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        env=env,
        timeout=300,
    )
    # only now the running interpreter's packages (after the install: its editable mugs must not count as
    # installed); plain folder lines, so its .pth files (the editable mugs finder) do not run in the venv
    site_dir = Path(
        subprocess.run(
            [str(bindir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip()
    )
    (site_dir / "_mugs_test_parent_packages.pth").write_text("\n".join(_package_dirs()) + "\n")
    where = subprocess.run(
        [str(bindir / "python"), "-c", "import mugs.model, mugs.apps, torch; print(mugs.model.__file__)"],
        cwd=tmp,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), f"mugs imported from {where}, not from the wheel in {venv}"
    return bindir, env


@pytest.fixture
def make_run(data, tmp_path):
    """A real trainer Run (one process, gloo), as `python -m mugs.training.trainer` builds it, on the
    requesting module's `data` folder with the tiny preset: `make_run(*extra_flags)`."""
    from mugs.configs.flags import parse_config
    from mugs.core.dist import init_distributed, shutdown
    from mugs.training.stop import STOP_SIGNALS, StopRequest
    from mugs.training.trainer import Run
    from train_helpers import TINY_FLAGS

    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    made = []

    def make(*extra):
        cfg = parse_config(
            [
                "--data_path",
                str(data),
                "--output_dir",
                str(tmp_path / "run"),
                *TINY_FLAGS,
                "--batch_size_per_gpu",
                "2",
                "--epochs",
                "2",
                *extra,
            ]
        )
        (tmp_path / "run").mkdir(exist_ok=True)
        run = Run(cfg, init_distributed("cpu"), StopRequest(cfg.output_dir), [])
        made.append(run)
        return run

    try:
        yield make
    finally:
        for run in made:
            run.mon.close()
        shutdown()
        for s, h in handlers.items():
            signal.signal(s, h)
