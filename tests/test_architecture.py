"""The package's shape (docs/ARCHITECTURE.md), checked on the source: imports point one way and form no
cycle, functions stay short, and architecture facts or plug-in names are not tested for outside their
owners. Static (ast): imports inside functions count too; registry entries are strings and do not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "abqcli"
MAX_FUNCTION_LINES = 80
TRAINING = ("abqcli.quant.calibrate", "abqcli.quant.transforms", "abqcli.quant.loss", "abqcli.quant.methods",
            "abqcli.quant.checkpoint", "abqcli.recipe", "abqcli.pipeline")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it (`from a.b import c` counts `a.b.c` when that
    is a module, else `a.b`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in modules else node.module for name in names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules(graph):
    assert cycles(graph) == []


def test_btc_never_imports_training_code(graph):
    bad = {name: sorted(m for m in deps if m.startswith(TRAINING))
           for name, deps in graph.items() if name.startswith("abqcli.btc")}
    assert {name: deps for name, deps in bad.items() if deps} == {}


def test_quant_never_imports_btc(graph):
    bad = {name: sorted(m for m in deps if m.startswith("abqcli.btc"))
           for name, deps in graph.items() if name.startswith("abqcli.quant")}
    assert {name: deps for name, deps in bad.items() if deps} == {}


def test_no_function_longer_than_80_lines():
    long = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


@pytest.mark.parametrize("pattern, owner", [
    (r"\.family\s*==", "abqcli.models"),
    (r"backend\s*==\s*['\"]cupy['\"]", "abqcli.btc.backends"),
    (r"method\s*==\s*['\"]abq['\"]", "abqcli.quant.methods"),
    (r"['\"]abq-packed['\"]\s+in\b", "abqcli.formats"),
])
def test_no_string_dispatch_outside_the_owner(pattern, owner):
    """An architecture family, a backend, a method or a format is asked of its plug-in, not compared by name."""
    offenders = [name for name, path in module_files().items()
                 if not name.startswith(owner) and re.search(pattern, path.read_text())]
    assert offenders == []
