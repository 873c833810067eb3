"""The layout of the code as the import graph sees it (grimp, the graph import-linter checks its
contracts on): no import cycle among the modules of jem/ and stages/, however the contracts in
pyproject.toml are edited, and the library's root holds packages, not modules."""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _cycles(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    """Every direct import a -> b that closes a cycle: b leads back to a through some chain."""
    return sorted((a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                  if graph.chain_exists(importer=b, imported=a))


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
    assert ("jem.config.errors", "jem.method.models") in _cycles(graph)


def test_library_root_holds_packages_only():
    modules = sorted(p.name for p in (ROOT / "jem").glob("*.py"))
    packages = sorted(p.name for p in (ROOT / "jem").iterdir() if (p / "__init__.py").exists())
    assert modules == ["__init__.py"]
    assert packages == ["bench", "config", "data", "evaluation", "method", "runtime"]
