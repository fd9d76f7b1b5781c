"""#28's size rule: no non-test file over MAX_FILE_LINES lines and no function or method over
MAX_FUNCTION_LINES lines, so each file keeps one purpose and each function one job. A file or
function that grows past the limit fails here, named, instead of in a later review."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model", "training", "configs", "core", "eval", "apps", "benchmarks")
SCRIPTS = ("train_fsdp.py",)
MAX_FILE_LINES = 320
MAX_FUNCTION_LINES = 60


def _sources():
    """Every non-test Python file of the package folders, and the top-level scripts."""
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))
    for script in SCRIPTS:
        yield ROOT / script


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, line count) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


def oversized(path: Path, rel: str) -> dict[str, int]:
    """The size-rule breaches of one file: {"rel": lines} and {"rel:qualname": lines}."""
    source = path.read_text()
    found = {}
    lines = len(source.splitlines())
    if lines > MAX_FILE_LINES:
        found[rel] = lines
    for name, length in _functions(ast.parse(source)):
        if length > MAX_FUNCTION_LINES:
            found[f"{rel}:{name}"] = length
    return found


def _all_oversized() -> dict[str, int]:
    found = {}
    for path in _sources():
        found.update(oversized(path, path.relative_to(ROOT).as_posix()))
    return found


def test_no_file_or_function_over_the_limits():
    bad = _all_oversized()
    assert not bad, "\n".join(
        f"{k}: {v} lines (limit {MAX_FUNCTION_LINES if ':' in k else MAX_FILE_LINES})" for k, v in sorted(bad.items())
    )


def test_the_checker_sees_long_files_and_functions(tmp_path):
    """The rule can fail: a long file, a long method and a long nested function are each named."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    nested = "\n".join(f"        y{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    short = "def ok():\n" + "\n".join(f"    z{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    source = f"class A:\n  def m(self):\n{body}\n\ndef outer():\n    def inner():\n{nested}\n\n{short}\n"
    source += "\n" * (MAX_FILE_LINES + 1 - len(source.splitlines()))
    f = tmp_path / "big.py"
    f.write_text(source)
    found = oversized(f, "big.py")
    assert set(found) == {"big.py", "big.py:A.m", "big.py:outer", "big.py:outer.inner"}
    assert found["big.py:A.m"] == MAX_FUNCTION_LINES + 1
