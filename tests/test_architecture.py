"""The design's rules that code review alone would let slip: which package may import which, one error tree, sizes.

Layers (docs/architecture.md): `agent` may use `drivers`, `engines` and `common`; `drivers` and `engines` use only
themselves and `common`, never `agent` or each other; `common` uses nothing of ours.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import agent
from agent.errors import ThoxError

REPO = Path(__file__).resolve().parents[1]
OURS = ("agent", "drivers", "engines", "common")
ALLOWED = {
    "agent": {"agent", "drivers", "engines", "common"},
    "drivers": {"drivers", "common"},
    "engines": {"engines", "common"},
    "common": {"common"},
}


def imported_packages(source: str, module_parts: tuple[str, ...]) -> set[tuple[str, int]]:
    """Our top-level packages a module imports (anywhere in it: functions and TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's own package
                base = module_parts[: len(module_parts) - node.level]
                names = [".".join(base + ((node.module,) if node.module else ()))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in OURS:
                found.add((top, node.lineno))
    return found


@pytest.mark.parametrize("package", OURS)
def test_imports_point_one_way(package: str) -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {top}"
        for path in sorted((REPO / package).rglob("*.py"))
        for top, line in sorted(imported_packages(path.read_text(), path.relative_to(REPO).with_suffix("").parts))
        if top not in ALLOWED[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_layering_check_sees_forbidden_imports() -> None:
    # The rule must be able to fail: imports hidden in a function or spelled relative are seen.
    source = "def f() -> None:\n    from agent.errors import ThoxError\nfrom ...drivers import base\n"
    assert imported_packages(source, ("engines", "text", "probe")) == {("agent", 2), ("drivers", 3)}


def test_every_agent_exception_roots_in_thox_error() -> None:
    strays = []
    for info in pkgutil.walk_packages(agent.__path__, "agent."):
        if info.name.endswith("__main__"):
            continue  # runs the CLI when imported
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException) and not issubclass(cls, ThoxError):
                strays.append(f"{info.name}.{name}")
    assert not strays, f"exceptions outside agent.errors.ThoxError: {strays}"


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def oversized(source: str, where: str) -> list[str]:
    """A module over MAX_MODULE_LINES, and every function (def to its last line) over MAX_FUNCTION_LINES."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{where}: {lines} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno} {node.name}() {length} lines")
    return found


@pytest.mark.parametrize("package", OURS)
def test_modules_and_functions_stay_small(package: str) -> None:
    # Small modules and functions are what keep the next feature's change local; split by job when one grows.
    found = [
        problem
        for path in sorted((REPO / package).rglob("*.py"))
        for problem in oversized(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert not found, "\n".join(found)


def test_the_size_check_sees_a_long_function() -> None:
    long_function = "def f() -> None:\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert oversized(long_function, "probe.py") == [f"probe.py:1 f() {MAX_FUNCTION_LINES + 1} lines"]
    assert oversized("x = 1\n" * (MAX_MODULE_LINES + 1), "big.py") == [f"big.py: {MAX_MODULE_LINES + 1} lines"]
