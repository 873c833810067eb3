"""The layout of the code as the import graph sees it (grimp, the graph import-linter checks its
contracts on): no import cycle among the modules of jem/ and stages/, however the contracts in
pyproject.toml are edited, and the library's root holds packages, not modules."""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle's modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def _graph() -> grimp.ImportGraph:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return grimp.build_graph("jem", "stages", cache_dir=None)


def test_no_import_cycle_among_jem_and_stages_modules():
    graph = _graph()
    assert {"jem.method.train", "stages.train", "stages.tracking"} <= graph.modules  # the graph is the real one
    assert graph.find_modules_directly_imported_by("stages.train") >= {"jem.method.train", "stages.tracking"}
    assert _cycles(graph) == []


def test_cycle_finder_sees_a_cycle():
    """The check above would see a cycle: one added import (config -> method) closes one."""
    graph = _graph()
    graph.add_import(importer="jem.config.errors", imported="jem.method.models")
    cycles = _cycles(graph)
    assert cycles and all("jem.config.errors" in c and "jem.method.models" in c for c in cycles)


def test_library_root_holds_packages_only():
    modules = sorted(p.name for p in (ROOT / "jem").glob("*.py"))
    packages = sorted(p.name for p in (ROOT / "jem").iterdir() if (p / "__init__.py").exists())
    assert modules == ["__init__.py"]
    assert packages == ["bench", "config", "data", "evaluation", "method", "runtime"]
