"""Imports run one way: configs/core/model/pipeline at the bottom, training and eval above them
(neither imports the other), apps and benchmarks on top; nothing below imports what is above."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"configs": 0, "core": 0, "model": 0, "pipeline": 0, "training": 1, "eval": 1, "apps": 2, "benchmarks": 2}
ALLOWED_SIDEWAYS = {
    ("configs", "core"),
    ("model", "configs"),
    ("model", "core"),
    ("pipeline", "configs"),
    ("pipeline", "core"),
}  # the bottom layer's own order: core -> configs -> model/pipeline


def _imported_packages(path: Path, package: str):
    """The mugs top-level packages a module imports (absolute `mugs.X` or relative `..X`)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("mugs."):
                yield node.module.split(".")[1], node.lineno
            elif node.level >= 2 and node.module:
                yield node.module.split(".")[0], node.lineno
            elif node.level == 1:
                yield package, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mugs."):
                    yield alias.name.split(".")[1], node.lineno


@pytest.mark.parametrize("package", sorted(LEVEL))
def test_package_imports_only_downwards(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for target, line in _imported_packages(path, package):
            if target == package or target not in LEVEL:
                continue
            down = LEVEL[target] < LEVEL[package]
            if not down and (package, target) not in ALLOWED_SIDEWAYS:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, bad


def test_the_checker_sees_a_violation(tmp_path):
    """The rule can fail: an eval module importing training is reported."""
    f = tmp_path / "bad.py"
    f.write_text("from ..training.trainer import main\nfrom mugs.apps import quickstart\n")
    assert sorted(t for t, _ in _imported_packages(f, "eval")) == ["apps", "training"]
