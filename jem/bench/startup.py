"""Stage start-up: how long each stage's process takes before it does its own work.

    jem-bench --startup                       # the tiny-scale DAG, run in a scratch copy of this checkout
    jem-bench --startup --scale demo          # what `make demo` runs (minutes)
    JEM_TIMING_LOG=timing.jsonl make demo     # or time a run of your own ...
    jem-bench --startup --timing-log timing.jsonl   # ... and tabulate it

Every stage process records (``pipeline.tracking.mark``) the seconds from its start (interpreter and
imports included, by the operating system's record of the start; for a stage the fork server runs, the
start of the process DVC started, ``pipeline.forkserver``) to ``main`` (its entry point's
function is called: imports done), to ``work`` (params.yaml read and checked: its first line of
work, while MLflow loads in the background), to ``run`` (its MLflow run is open) and to its exit;
with ``JEM_TIMING_LOG`` set it appends them as one JSON line. DVC runs
the stages of one ``dvc repro`` one after the other, so each is measured alone. The table adds
each entry point's import time by ``python -X importtime`` (the median of three fresh processes)
and its heaviest packages. Nothing here imports the stages: they run as processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# the stages a `dvc repro` runs, in the order of the DAG (dvc.yaml)
KINDS = ("configure", "prepare", "gmm", "fid_ref", "inputs", "train", "sample", "evaluate", "fid", "robustness",
         "report")
OWN = ("stages", "pipeline", "jem", "encodings", "site", "_")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a ``JEM_TIMING_LOG`` (one per stage process)."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {n}: not a JSON line of JEM_TIMING_LOG") from None
        if not isinstance(record, dict) or "kind" not in record:
            raise ValueError(f"{path} line {n}: expected an object with 'kind', 'main_s', 'work_s', 'exit_s'")
        stage = str(record.get("stage") or record["kind"])
        record["module"] = record["kind"]  # the entry point (stages/<module>.py); kind: the DVC stage's name
        record["kind"] = stage.split("@")[0] if "@" in stage else record["kind"]
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no stage wrote a line; run the stages with JEM_TIMING_LOG={path}")
    return records


def import_times(stdout_err: str) -> tuple[float, dict[str, float]]:
    """From ``python -X importtime -c 'import stages.<kind>'``'s report: the entry module's import
    time (s) and the cumulative time of each third-party top-level package it pulled in."""
    total = 0.0
    packages: dict[str, float] = {}
    for line in stdout_err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)$", line)
        if not m:
            continue
        cumulative, name = int(m.group(1)) / 1e6, m.group(3)
        if name.startswith("stages.") and not m.group(2):
            total = cumulative
        if "." not in name and not name.startswith(OWN) and name not in sys.stdlib_module_names and cumulative >= 0.005:
            packages[name] = max(packages.get(name, 0.0), cumulative)
    return total, packages


def measure_imports(kind: str, root: Path, repeat: int = 3) -> tuple[float, dict[str, float]]:
    """The median import time of ``stages.<kind>`` over ``repeat`` fresh interpreters, run in ``root``."""
    runs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import stages.{kind}"], cwd=root,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"python -c 'import stages.{kind}' failed in {root}: {proc.stderr.strip()[-300:]}")
        runs.append(import_times(proc.stderr))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(records: list[dict[str, Any]], imports: dict[str, tuple[float, dict[str, float]]]) -> list[dict]:
    """One row per stage kind: instances, import time, and the medians and sum of the marks."""
    rows = []
    kinds = [k for k in KINDS if any(r["kind"] == k for r in records)]
    kinds += sorted({r["kind"] for r in records} - set(kinds))
    for kind in kinds:
        mine = [r for r in records if r["kind"] == kind]
        seconds, packages = imports.get(kind, (None, {}))
        heavy = sorted(packages.items(), key=lambda kv: -kv[1])[:3]
        rows.append({"stage": kind, "processes": len(mine), "imports_s": seconds,
                     "heaviest": ", ".join(f"{name} {s:.2f}" for name, s in heavy),
                     "main_s": _median([r.get("main_s") for r in mine]),
                     "work_s": _median([r.get("work_s") for r in mine]),
                     "run_s": _median([r.get("run_s") for r in mine]),
                     "exit_s": _median([r.get("exit_s") for r in mine]),
                     "exit_sum_s": sum(r.get("exit_s") or 0.0 for r in mine)})
    return rows


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | processes | imports (s) | heaviest imports (s) | start to main() (s) | start to first line "
             "of work (s) | start to MLflow run open (s) | whole process (s) | all its processes (s) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['processes']} | {_cell(r['imports_s'])} | {r['heaviest'] or '-'} | "
                     f"{_cell(r['main_s'])} | {_cell(r['work_s'])} | {_cell(r['run_s'])} | {_cell(r['exit_s'])} | "
                     f"{r['exit_sum_s']:.1f} |")
    other = [r for r in rows if r["stage"] != "train"]
    train = [r for r in rows if r["stage"] == "train"]
    lines += ["", f"stages other than train: {sum(r['processes'] for r in other)} processes, "
              f"{sum(r['exit_sum_s'] for r in other):.1f} s in all; train: "
              f"{sum(r['processes'] for r in train)} processes, {sum(r['exit_sum_s'] for r in train):.1f} s"]
    slowest = max((r for r in rows if r["work_s"] is not None), key=lambda r: r["work_s"], default=None)
    if slowest is not None:
        lines.append(f"slowest start (to the first line of work): {slowest['stage']} {slowest['work_s']:.2f} s")
    return "\n".join(lines)


def scratch_repro(root: Path, scale: str, log: Path, keep: Path | None = None) -> float:
    """``dvc repro`` of this checkout's files (what a fresh clone has) at ``scale`` in a scratch copy,
    every stage writing its marks to ``log``; returns the wall time."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    work = keep or Path(tempfile.mkdtemp(prefix="jem-startup-"))
    try:
        for rel in files:
            if (root / rel).is_file():
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / rel, work / rel)
        params = work / "params.yaml"
        text, n = re.subn(r"(?m)^scale:.*$", f"scale: {scale}", params.read_text(), count=1)
        if n != 1:
            raise ValueError(f"{root / 'params.yaml'}: no top-level 'scale:' line to set")
        params.write_text(text)
        env = {**os.environ, "JEM_TIMING_LOG": str(log), "DVC_NO_ANALYTICS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("MLFLOW_TRACKING_URI", None)  # the scratch copy's own mlflow.db
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
            subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout or []:
            tail = [*tail[-40:], line]
            if line.startswith("Running stage"):
                print(f"[startup] {line.strip()}", flush=True)
        if proc.wait() != 0:
            raise RuntimeError("dvc repro failed in the scratch copy:\n" + "".join(tail))
        return time.perf_counter() - start
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def run(scale: str, timing_log: Path | None, root: Path, keep: Path | None = None) -> int:
    """``jem-bench --startup``: print the per-stage start-up table."""
    wall = None
    if timing_log is None:
        log = Path(tempfile.mkdtemp(prefix="jem-timing-")) / "timing.jsonl"
        print(f"[startup] dvc repro at the {scale} scale in a scratch copy of {root} ...", flush=True)
        wall = scratch_repro(root, scale, log, keep)
    else:
        log = timing_log
    records = read_log(log)
    kinds = sorted({r["module"] for r in records})
    print(f"[startup] python -X importtime of {len(kinds)} entry points, three times each ...", flush=True)
    modules = {k: measure_imports(k, root) for k in kinds if (root / "stages" / f"{k}.py").exists()}
    imports = {r["kind"]: modules[r["module"]] for r in records if r["module"] in modules}
    print()
    print(format_table(summarise(records, imports)))
    if wall is not None:
        print(f"dvc repro: {wall:.0f} s wall time, {len(records)} stage processes")
    return 0
