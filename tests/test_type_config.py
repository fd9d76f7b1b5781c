"""mypy checks the packages under the names they are installed as (`mugs.eval`, ...): pyproject.toml points
it at .mypy/mugs, one relative link per checked package folder. Checked as bare folders (`eval`, `model`),
every cross-package import (`from ..eval.load import load_backbone`) went past the top-level package, so
mypy typed it Any and checked nothing across packages. Here: the links name every installed package but
benchmarks/, each is its own folder, and pyproject.toml checks them under those names."""

import ast
import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: mypy's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINKS = ROOT / ".mypy" / "mugs"
UNCHECKED = {"benchmarks"}  # its legacy_dali reference code uses DALI's dynamic attributes


def _installed_packages() -> set[str]:
    """The `mugs.X` folders setup.py installs (its PACKAGES read, not run: setup.py calls setup())."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PACKAGES"]:
            return {name.split(".")[1] for name in ast.literal_eval(node.value)}
    raise AssertionError("setup.py has no PACKAGES")


def test_mypy_checks_every_installed_package_but_benchmarks():
    assert {p.name for p in LINKS.iterdir()} == _installed_packages() - UNCHECKED


def test_each_link_is_its_package_folder_relatively():
    for link in LINKS.iterdir():
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), link  # a clone anywhere works
        assert link.resolve() == ROOT / link.name


def test_pyproject_checks_the_packages_under_their_installed_names():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert cfg["files"] == [".mypy/mugs"]
    assert cfg["mypy_path"] == "$MYPY_CONFIG_FILE_DIR/.mypy"  # module names start at .mypy: mugs.eval.load
    assert cfg["explicit_package_bases"] is True  # mugs has no __init__.py (a namespace package, setup.py)
