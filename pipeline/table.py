"""The runner behind ``python -m stages.table``: trains a paper table's variants at once, one worker per
device, then assembles the table.

Not a DVC stage: it drives ``dvc repro`` in this workspace. A table is a list of variants under
``tables`` in params.yaml; naming one sets ``variants`` to it (no other line of params.yaml changes).
Then, all in this workspace, so that ``dvc.lock`` records every stage:

1. ``dvc repro inputs_data``: the shared stages (configure, data, GMM), once;
2. ``dvc repro --single-item train@<v>-<seed>`` for every run (variant x seed), N at a time, each worker on its own
   device (``CUDA_VISIBLE_DEVICES``; on a CPU, N processes sharing the cores, each with torch's
   own thread count unless ``--threads``: the same arithmetic as a sequential ``dvc repro``);
3. ``dvc repro inputs_fid``, then ``sample``, ``evaluate``, ``robustness``, ``fid`` of each run,
   N runs at a time;
4. ``dvc repro``: the report and anything left.

DVC runs independent stages of one workspace side by side; a moment where another process holds
its lock is waited out. A stage DVC already computed with the same command, dependencies and
params is restored from its run cache instead of run again, so a variant trained on another
machine (``dvc pull --run-cache``) or by an earlier call is not retrained. A worker that fails
(or a run that diverges past its recovery) leaves the others' results; its variant is named in
one line with its log, and the same command again resumes it from its last checkpoint.

Several machines share a DVC remote: ``--shared`` computes the shared stages once, ``--only`` a
machine's variants; ``--push`` sends what was computed with its run cache (``dvc push
--run-cache``), ``--pull`` fetches every machine's run cache (``dvc pull --run-cache``) before
starting and reproduces with ``dvc repro --pull``, which downloads the outputs of each stage it
restores: the assembly (no ``--only``) restores each computed stage instead of running it again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jem.config.params import selected_seeds
from pipeline.common import StageError, load_params

# DVC's words when another process holds the repository lock or a stage's read/write lock
LOCKED = ("Unable to acquire lock", "is busy, it is being blocked by")
LOCK_WAIT_S = 3.0


@dataclass
class Task:
    name: str  # what the log and the messages call it
    stages: list[str]  # run one after the other, each `dvc repro --single-item`


def set_variants(path: Path, variants: list[str]) -> None:
    """``variants: [...]`` in params.yaml; every other line (comments, layout) stays as it is."""
    lines = path.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("variants:")]
    if len(starts) != 1:
        raise StageError(f"{path}: expected one top-level 'variants:' key, found {len(starts)}")
    end = starts[0] + 1
    value = lines[starts[0]].split(":", 1)[1].split("#", 1)[0].strip()
    if not value:  # a block list follows
        while end < len(lines) and lines[end].lstrip().startswith("- ") and lines[end][0] in " -":
            end += 1
    elif value.startswith("[") and "]" not in value:  # a flow list over several lines
        while end < len(lines) and "]" not in lines[end - 1]:
            end += 1
    lines[starts[0]:end] = [f"variants: [{', '.join(variants)}]\n"]
    path.write_text("".join(lines))


def dvc(args: list[str], env: dict[str, str], log: Path, say=print) -> int:
    """``dvc <args>``; waits out another process's lock (never a failure). Output to ``log``."""
    waited = False
    while True:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"$ dvc {' '.join(args)}\n{out}\n")
        if proc.returncode != 0 and any(word in out for word in LOCKED) and "Running stage" not in out:
            if not waited:
                say(f"[table] dvc {' '.join(args)}: another process holds a DVC lock; waiting")
                waited = True
            time.sleep(LOCK_WAIT_S)
            continue
        return proc.returncode


def slots(devices: str | None, per_device: int, workers: int | None) -> list[str | None]:
    """One entry per worker: the CUDA device it sees, or None (CPU)."""
    if devices:
        listed = [d.strip() for d in devices.split(",") if d.strip()]
        if not all(d.isdigit() for d in listed):
            raise StageError(f"--devices {devices!r}: expected CUDA device indices, e.g. 0,1,2,3")
        return [d for d in listed for _ in range(per_device)]
    return [None] * max(1, workers or 2)


def runs_of(variants: list[str], seeds: list[int]) -> list[str]:
    """Every run of the table, ``<variant>-<seed>`` (dvc.yaml's matrix suffix), variant by variant."""
    return [f"{v}-{s}" for v in variants for s in seeds]


def pick(variants: list[str], only: list[str], seeds: list[int] | None = None) -> list[str]:
    """The runs ``--only`` names: a variant (all its seeds), one run ``<variant>-<seed>``, or a 0-based
    index into ``runs_of`` (a SLURM array index: one task per run)."""
    seeds = seeds or [1]
    runs = runs_of(variants, seeds)
    picked: list[str] = []
    for item in (x.strip() for entry in only for x in entry.split(",") if x.strip()):
        if item.isdigit():
            if int(item) >= len(runs):
                raise StageError(f"--only {item}: the table has {len(runs)} runs "
                                 f"({len(variants)} variants x {len(seeds)} seeds; indices "
                                 f"0-{len(runs) - 1}, see --list)")
            chosen = [runs[int(item)]]
        elif item in variants:
            chosen = runs_of([item], seeds)
        elif item in runs:
            chosen = [item]
        else:
            raise StageError(f"--only {item}: not a variant or run of this table ({', '.join(variants)}; "
                             "a run is <variant>-<seed>, see --list)")
        picked += [r for r in chosen if r not in picked]
    return picked


def default_run_id(table: str | None) -> str:
    """One id per call; the tasks of one SLURM array job share theirs (so do their MLflow runs)."""
    name = table or "variants"
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job:
        return f"{name}-slurm{job}"
    return f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def runs_url(params: dict, scale: str, run_id: str) -> str | None:
    """The MLflow UI's runs table of this table run: the ``workflowType`` parameter opens it in the
    "Model training" view whatever the browser last chose (MLflow keeps the GenAI / Model training
    toggle in the browser, not in the experiment: mlflow#24498)."""
    from urllib.parse import quote

    try:
        from mlflow.tracking import MlflowClient

        from pipeline.store import tracking_root, tracking_uri

        uri, _ = tracking_uri(tracking_root(), params)
        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(f"jem-{scale}")
    except Exception:  # the table is done; a link it cannot make is no failure
        return None
    if experiment is None:
        return None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    search = quote(f"tags.table_run = '{run_id}'", safe="")
    return (f"{base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
            f"&searchFilter={search}")


_printing = threading.Lock()


def say(line: str) -> None:
    """One line to stdout, whole, whichever worker's thread prints it."""
    with _printing:
        print(line, flush=True)


def check_options(args: argparse.Namespace) -> None:
    """The flags that do not go together or take no such number, before anything is read."""
    if args.shared and args.only:
        raise StageError("--shared runs only the shared stages; give it without --only")
    if args.per_device < 1 or (args.workers is not None and args.workers < 1) or args.threads < 0:
        raise StageError("--per-device and --workers take an integer >= 1, --threads one >= 0")


def _unknown_table(name: str | None, tables: dict[str, Any]) -> StageError:
    return StageError(f"table {name!r} is not under `tables` in params.yaml; defined: "
                      f"{', '.join(sorted(tables)) or 'none'}")


def list_runs(params: dict[str, Any], table: str | None) -> None:
    """``--list``: the table's runs (the current ``variants`` without a table), one per line with its
    ``--only`` index. Before anything is written: a job script counts the array tasks with it."""
    tables = params.get("tables") or {}
    listed = tables.get(table) if table is not None else params["variants"]
    if listed is None:
        raise _unknown_table(table, tables)
    for i, r in enumerate(runs_of(listed, selected_seeds(params))):
        print(f"{i}\t{r}")


def choose_table(params: dict[str, Any], table: str | None) -> dict[str, Any]:
    """The params with ``variants`` set to the named table: params.yaml is rewritten (and read again)
    only where its ``variants`` differ."""
    if table is None:
        return params
    tables = params.get("tables") or {}
    if table not in tables:
        raise _unknown_table(table, tables)
    if list(params["variants"]) != list(tables[table]):
        set_variants(Path("params.yaml"), list(tables[table]))
        return load_params(tracking=False)
    return params


@dataclass
class Plan:
    """What one call runs, where, and where its logs go."""

    run_id: str  # the MLflow tag table_run of every run
    scale: str
    variants: list[str]
    seeds: list[int]
    mine: list[str]  # the runs this machine trains and evaluates
    partial: bool  # one machine's share (--shared, --only): no report
    workers: list[str | None]  # one entry per worker: its CUDA device, or None (CPU)
    env: dict[str, str]  # every dvc process's environment
    logs: Path
    repro: list[str]  # with --pull, the outputs restored from the run cache are downloaded


def plan_table(args: argparse.Namespace, params: dict[str, Any]) -> Plan:
    """This call's runs (all of the table's, or ``--only``'s), its workers, run id and logs."""
    variants = list(params["variants"])
    seeds = selected_seeds(params)
    mine = [] if args.shared else pick(variants, args.only, seeds) if args.only else runs_of(variants, seeds)
    partial = args.shared or bool(args.only)
    scale = str(params["scale"])
    workers = slots(args.devices, args.per_device, args.workers)
    run_id = args.run_id or default_run_id(args.table)
    return Plan(run_id=run_id, scale=scale, variants=variants, seeds=seeds, mine=mine, partial=partial,
                workers=workers, env={**os.environ, "JEM_TABLE_RUN": run_id}, logs=args.logs / scale / run_id,
                repro=["repro", "--pull"] if args.pull else ["repro"])


def announce(plan: Plan) -> None:
    say(f"[table] {plan.run_id}: {len(plan.variants)} variants x {len(plan.seeds)} seeds at scale {plan.scale}, "
        f"{len(plan.workers)} workers "
        f"({', '.join('cuda ' + w if w is not None else 'cpu' for w in plan.workers)}); logs in {plan.logs}/"
        + (f"; this machine: {', '.join(plan.mine) or 'the shared stages'}" if plan.partial else ""))


def run_shared(plan: Plan, pull: bool) -> None:
    """``--pull``'s fetch of the other machines' run cache, then the shared stages, once."""
    if pull:
        say("[table] dvc pull --run-cache: what the other machines pushed")
        if dvc(["pull", "--run-cache", "--allow-missing"], plan.env, plan.logs / "transfer.log", say):
            raise StageError(f"dvc pull --run-cache failed (is a default DVC remote set? dvc remote list); "
                             f"see {plan.logs / 'transfer.log'}")
    if dvc([*plan.repro, "inputs_data"], plan.env, plan.logs / "shared.log", say):
        raise StageError(f"the shared stages (configure, prepare, gmm, inputs_data) failed; "
                         f"see {plan.logs / 'shared.log'}")


class Pool:
    """The workers: each task goes to the first free one, in its own ``dvc`` process on the worker's device."""

    def __init__(self, plan: Plan, threads: int) -> None:
        self.plan = plan
        self.threads = threads  # torch CPU threads per worker; 0: torch's own
        self.free = list(range(len(plan.workers)))
        self.lock = threading.Lock()

    def run(self, task: Task) -> tuple[Task, int, Path]:
        """The task's stages one after the other, up to the first that fails: (task, exit status, log)."""
        with self.lock:
            slot = self.free.pop()
        env = dict(self.plan.env)
        device = self.plan.workers[slot]
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        log = self.plan.logs / f"{task.name}.log"
        try:
            start = time.time()
            say(f"[table] {task.name}: started ({'cuda ' + device if device is not None else 'cpu'})")
            code = 0
            for stage in task.stages:
                code = dvc([*self.plan.repro, "--single-item", stage], env, log, say)
                if code:
                    break
            say(f"[table] {task.name}: {'done' if code == 0 else f'FAILED (exit {code})'} "
                f"in {time.time() - start:.0f} s")
            return task, code, log
        finally:
            with self.lock:
                self.free.append(slot)

    def phase(self, tasks: list[Task]) -> list[tuple[Task, int, Path]]:
        """Every task, as many at a time as there are workers; the ones that failed."""
        with ThreadPoolExecutor(max_workers=len(self.plan.workers)) as ex:
            return [r for r in ex.map(self.run, tasks) if r[1] != 0]


def train_and_evaluate(plan: Plan, pool: Pool) -> list[tuple[Task, int, Path]]:
    """The trainings, then the reference statistics, then each trained run's evaluation: the tasks that failed."""
    failed = pool.phase([Task(f"train@{r}", [f"train@{r}"]) for r in plan.mine])
    if dvc([*plan.repro, "inputs_fid"], plan.env, plan.logs / "shared.log", say):
        raise StageError(f"the reference statistics (fid_ref, inputs_fid) failed; see {plan.logs / 'shared.log'}")
    trained = [r for r in plan.mine if f"train@{r}" not in {t.name for t, _, _ in failed}]
    failed += pool.phase([Task(f"evaluation@{r}", [f"sample@{r}", f"evaluate@{r}", f"robustness@{r}", f"fid@{r}"])
                          for r in trained])
    return failed


def push(plan: Plan) -> str | None:
    """``--push``: what this machine computed, with its run cache, to the default remote. A remote that
    cannot be reached fails no run: the line that says what was not pushed (None when all was)."""
    say("[table] dvc push --run-cache: this machine's outputs and their run cache")
    log = plan.logs / "transfer.log"
    if not dvc(["push", "--run-cache"], plan.env, log, say):
        return None
    last = log.read_text().rsplit("$ dvc push --run-cache", 1)[-1]
    errors = [line.removeprefix("ERROR: ") for line in last.splitlines() if line.startswith("ERROR: ")]
    # DVC's last line counts the files; its first says why (after "failed to transfer '<hash>' - ")
    reason = "; ".join(dict.fromkeys(e.split(" - ", 1)[-1] for e in (errors[-1:] + errors[:1]))) or f"see {log}"
    share = ", ".join(plan.mine) + " and the shared stages" if plan.mine else "the shared stages"
    return (f"dvc push --run-cache failed ({reason}): not pushed: the outputs "
            f"and run cache of {share}; all kept here. When the remote answers, the same command with --push "
            f"sends them (nothing is recomputed); log: {log}")


def report_failures(plan: Plan, failed: list[tuple[Task, int, Path]], unpushed: str | None) -> None:
    """Each failed task in one line with its log (and what was not pushed), then exit status 1."""
    if unpushed:
        print(f"error: {unpushed}", file=sys.stderr)
    for task, code, log in failed:
        print(f"error: {task.name} failed (exit {code}); its log: {log}", file=sys.stderr)
    print(f"error: {len(failed)} of {len(plan.mine)} runs failed; the others' results are kept. Run the same "
          "command again: finished stages are up to date, a training resumes from its last checkpoint",
          file=sys.stderr)
    raise SystemExit(1)


def assemble(plan: Plan, params: dict[str, Any]) -> None:
    """``dvc repro``: the report and anything left; then the link to the table run's MLflow runs."""
    if dvc(plan.repro, plan.env, plan.logs / "assembly.log", say):
        raise StageError(f"the assembly (dvc repro: the report) failed; see {plan.logs / 'assembly.log'}")
    say(f"[table] {plan.run_id}: every stage up to date; the report is in reports/{plan.scale}/")
    url = runs_url(params, plan.scale, plan.run_id)
    if url:
        say(f"[table] its MLflow runs (mlflow ui, then): {url}")


def run_table(args: argparse.Namespace) -> None:
    """``python -m stages.table`` with its parsed command line (stages/table.py)."""
    check_options(args)
    params = load_params(tracking=False)
    if args.list:
        list_runs(params, args.table)
        return
    params = choose_table(params, args.table)
    plan = plan_table(args, params)
    announce(plan)
    run_shared(plan, args.pull)
    failed = train_and_evaluate(plan, Pool(plan, args.threads))
    unpushed = push(plan) if args.push else None  # what did finish is worth sharing even when a variant failed
    if failed:
        report_failures(plan, failed, unpushed)
    if plan.partial:
        say(f"[table] {plan.run_id}: {', '.join(plan.mine) or 'the shared stages'} up to date"
            + ("; pushed" if args.push and not unpushed else "") + f". The report waits for the whole table: "
            f"python -m stages.table {args.table or ''} --pull".replace("  ", " "))
    else:
        assemble(plan, params)
    if unpushed:  # the local results and the report are kept; only the transfer is left to do
        raise StageError(unpushed)
