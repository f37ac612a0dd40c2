"""The distribution declares what `repa/` imports, and imports what it declares."""

import ast
import functools
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPA = Path(__file__).resolve().parents[1] / "repa"
PYPROJECT = REPA.parent / "pyproject.toml"

# declared packages that `repa/` reaches through another import name or package
REACHED_THROUGH = {"tensorboard": "torch.utils.tensorboard (TensorBoard logging)"}


@functools.cache
def imported_top_level_modules() -> dict[str, str]:
    """Every third-party top-level module imported anywhere in repa/ (lazy imports included),
    with one file that imports it."""
    found: dict[str, str] = {}
    for path in sorted(REPA.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "repa" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, str(path.relative_to(REPA.parent)))
    return found


def declared_distributions() -> set[str]:
    """pyproject.toml's dependencies as written (not an installed copy's, which may be stale)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    requirements = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # seconds: it reads every installed package's files


def distribution_of(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in installed_distributions().get(module, [])}


def test_every_import_of_repa_is_declared():
    declared = declared_distributions()
    undeclared = {
        module: where
        for module, where in imported_top_level_modules().items()
        if not distribution_of(module) & declared
    }
    assert not undeclared, f"imported by repa/ but not in pyproject's dependencies: {undeclared}"


def test_every_declared_dependency_is_imported():
    imported = set()
    for module in imported_top_level_modules():
        imported |= distribution_of(module)
    unused = declared_distributions() - imported - set(REACHED_THROUGH)
    assert not unused, f"declared in pyproject but never imported by repa/: {sorted(unused)}"


def test_the_scan_sees_lazy_imports():
    # a guard on the scanner itself: these are imported inside functions only
    modules = imported_top_level_modules()
    assert {"braceexpand", "psutil", "huggingface_hub", "einops", "torch"} <= set(modules)
