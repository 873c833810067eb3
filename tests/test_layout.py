"""The layout of the code as the import graph sees it (grimp, the graph import-linter checks its
contracts on): no import cycle among the modules of jem/, pipeline/ and stages/, however the contracts in
pyproject.toml are edited, the library's root holds packages, not modules, dvc.yaml's code deps are
the stages' import closures, and the code stays readable in pieces: no function over 80 lines, no
entry point over 200."""

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
    return grimp.build_graph("jem", "pipeline", "stages", cache_dir=None)


def test_no_import_cycle_among_jem_pipeline_and_stages_modules():
    graph = _graph()
    assert {"jem.method.train", "stages.train", "pipeline.tracking"} <= graph.modules  # the graph is the real one
    assert graph.find_modules_directly_imported_by("stages.train") >= {"jem.method.train", "pipeline.tracking"}
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
    assert packages == ["bench", "config", "data", "evaluation", "method", "report", "runtime"]


# ---- dvc.yaml's code dependencies are the stages' import closures ---------------------------------
def import_closure(graph: grimp.ImportGraph, entry: str) -> set[str]:
    """The files of jem/, pipeline/ and stages/ that ``python -m <entry>`` may execute: every module it imports,
    directly or not (imports inside functions included), and the ``__init__`` of every package on
    the way (Python runs them when it imports a submodule)."""
    modules: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in modules:
            continue
        modules.add(module)
        todo += graph.find_modules_directly_imported_by(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    files = set()
    for module in modules:
        path = ROOT.joinpath(*module.split("."))
        files.add((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT).as_posix())
    return files


def _stage_definitions() -> dict[str, dict]:
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def test_every_stage_depends_on_exactly_the_code_its_entry_point_imports():
    """A module a stage imports but does not declare leaves results DVC calls up to date although the
    code would no longer produce them; one it declares but does not import reruns it for nothing."""
    import re

    graph = _graph()
    problems = []
    for name, stage in _stage_definitions().items():
        entry = re.search(r"python -m (stages\.\w+)", stage["cmd"])
        assert entry, f"{name}: its cmd runs no stages.<module> entry point: {stage['cmd']}"
        declared = {d for d in stage.get("deps", [])
                    if isinstance(d, str) and re.match(r"(jem|pipeline|stages)(/|$)", d)}
        assert all(d.endswith(".py") for d in declared), f"{name}: a code dependency names a folder: {declared}"
        closure = import_closure(graph, entry.group(1))
        if declared != closure:
            ordered = sorted(closure, key=lambda f: (not f.startswith("stages"), not f.startswith("pipeline"), f))
            problems.append(f"{name}: missing {sorted(closure - declared)}, not imported {sorted(declared - closure)}; "
                            "its code deps are:\n" + "\n".join(f"  - {f}" for f in ordered))
    assert not problems, "\n".join(problems)


def test_the_closure_follows_imports_inside_functions_and_package_inits():
    graph = _graph()
    closure = import_closure(graph, "stages.train")
    assert {"stages/__init__.py", "jem/__init__.py", "jem/runtime/__init__.py", "jem/runtime/distributed.py",
            "jem/method/train.py", "stages/train.py"} <= closure
    assert "jem/evaluation/inception.py" not in closure and "stages/report.py" not in closure
    graph.add_import(importer="stages.train", imported="jem.evaluation.inception")
    assert "jem/evaluation/inception.py" in import_closure(graph, "stages.train")


# ---- entry points a page, functions a screen ---------------------------------------------------
MAX_FUNCTION_LINES = 80  # a def from its first line to its last, docstring and nested defs included
MAX_STAGE_LINES = 200


def long_functions(folders: tuple[str, ...] = ("jem", "pipeline", "stages"),
                   limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` for every function or method longer than ``limit`` lines."""
    import ast

    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > limit:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_is_longer_than_a_screen():
    """A function a reader can hold at once; a longer one is split where its steps are."""
    assert long_functions() == []


def test_the_length_check_sees_a_long_function(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_functions(("pkg",)) == [f"pkg/m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_stages_hold_entry_points_of_a_page_each():
    """stages/ holds the entry points only: each at most a page, the library and the pipeline layer
    elsewhere (the import-linter contracts say which imports which)."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "stages").glob("*.py")}
    assert {name for name, n in sizes.items() if n > MAX_STAGE_LINES} == set()
    assert sum(sizes.values()) <= 1500
