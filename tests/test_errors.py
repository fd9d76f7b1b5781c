"""One error tree (core/errors.py), one way every command ends (core/cli.py), one table of exit codes (README)."""

import ast
import builtins
import re
from pathlib import Path

import pytest

from mugs.core import errors
from mugs.core.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "core", "model", "pipeline", "training", "eval", "apps", "benchmarks")
BUILTIN_ERRORS = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))
    yield ROOT / "train_fsdp.py"


def test_every_error_class_is_in_the_one_tree():
    """No module but core/errors.py derives its own error from a built-in exception: a new kind of
    failure joins the tree (and so gets its exit code and one line) instead of starting another."""
    stray = []
    for path in _sources():
        if path == ROOT / "core" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & BUILTIN_ERRORS:
                    stray.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not stray, stray


def test_each_error_carries_its_exit_code():
    user = (errors.ConfigError, errors.DataError, errors.CheckpointError, errors.OwnerError, errors.NoDeviceError)
    assert all(issubclass(c, errors.InputError) and c.exit_code == errors.EXIT_USER == 2 for c in user)
    assert issubclass(errors.NonFiniteLossError, errors.RunError) and errors.NonFiniteLossError.exit_code == 3
    assert issubclass(errors.CheckpointWriteError, errors.RunError) and errors.CheckpointWriteError.exit_code == 4
    assert issubclass(errors.OutputWriteError, errors.RunError) and errors.OutputWriteError.exit_code == 4
    assert issubclass(errors.InputError, errors.MugsError) and issubclass(errors.RunError, errors.MugsError)


def _raise(e):
    def main():
        raise e

    return main


@pytest.mark.parametrize(
    "error,code",
    [
        (errors.ConfigError("--lr nan must be a finite number >= 0"), 2),
        (errors.DataError("x.JPEG: cannot decode"), 2),
        (errors.NonFiniteLossError("loss nan at step 3"), 3),
        (errors.CheckpointWriteError("cannot write step 2"), 4),
    ],
)
def test_run_cli_says_an_error_in_one_line_with_its_code(capsys, error, code):
    assert run_cli(_raise(error), "mugs-x") == code
    assert capsys.readouterr().err == f"mugs-x: error: {error}\n"


def test_run_cli_keeps_a_multi_line_message_on_one_line(capsys):
    assert run_cli(_raise(errors.CheckpointError("a.pt: refused\nsee the README")), "mugs-x") == 2
    assert capsys.readouterr().err == "mugs-x: error: a.pt: refused see the README\n"


def test_run_cli_passes_codes_through_and_exits_130_on_ctrl_c(capsys):
    assert run_cli(lambda: None, "mugs-x") == 0
    assert run_cli(lambda: 1, "mugs-x") == 1
    assert run_cli(_raise(KeyboardInterrupt()), "mugs-x") == 130
    assert "Traceback" not in capsys.readouterr().err


def test_run_cli_lets_a_bug_show_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0, "mugs-x")


def _calls(tree, name):
    return any(
        isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == name for n in ast.walk(tree)
    )


def _console_scripts():
    setup = (ROOT / "setup.py").read_text()
    found = re.findall(r'"(mugs-[\w-]+)=mugs\.(\w+)\.(\w+):main"', setup)
    assert len(found) >= 11, found
    return [(name, ROOT / package / f"{module}.py") for name, package, module in found] + [
        ("python -m mugs.configs.table1", ROOT / "configs" / "table1.py"),
        ("python -m mugs.training.trainer", ROOT / "training" / "trainer.py"),
        ("python -m mugs.benchmarks.step", ROOT / "benchmarks" / "step.py"),
    ]


@pytest.mark.parametrize("name,path", _console_scripts(), ids=lambda x: getattr(x, "name", x))
def test_every_command_ends_through_run_cli(name, path):
    """Its `main` calls run_cli (the evaluation tools' `main = tool_main(...)` through eval/cli.py's `run`,
    which does)."""
    body = ast.parse(path.read_text()).body
    if path.parent.name == "eval":
        main = next(n for n in body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "main")
        assert _calls(main, "tool_main"), f"{name}: {path.relative_to(ROOT)} main is not tool_main(...)"
        cli = {
            n.name: n for n in ast.parse((ROOT / "eval" / "cli.py").read_text()).body if isinstance(n, ast.FunctionDef)
        }
        assert _calls(cli["tool_main"], "run") and _calls(cli["run"], "run_cli")
        return
    main = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert _calls(main, "run_cli"), f"{name}: {path.relative_to(ROOT)} main() does not call run_cli"


def test_the_readme_states_every_exit_code_once():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.*)$", readme, re.M))
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert codes == {int(c) for c in rows}, rows.keys()
    table = "\n".join(rows.values())
    for cls in (
        errors.InputError,
        errors.ConfigError,
        errors.DataError,
        errors.CheckpointError,
        errors.OwnerError,
        errors.NoDeviceError,
        errors.NonFiniteLossError,
        errors.CheckpointWriteError,
        errors.OutputWriteError,
    ):
        assert f"`{cls.__name__}`" in table, cls.__name__
    assert len(re.findall(r"\*Exit codes\*|^## Exit codes", readme, re.M)) == 1
