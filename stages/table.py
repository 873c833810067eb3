"""Train a paper table's variants at once, one worker per device, then assemble the table.

    python -m stages.table sadajem_table1 --devices 0,1,2,3      # four GPUs, one variant each at a time
    python -m stages.table sadajem_table1 --devices 0,1 --per-device 2
    python -m stages.table --workers 2                           # this machine's CPU, the current `variants`
    python -m stages.table sadajem_table1 --only 3 --pull --push # one variant of several machines' (SLURM array)
    python -m stages.table sadajem_table1 --pull                 # the assembly: restores, computes what is left

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

from jem.config.params import selected_seeds
from pipeline.common import StageError, load_params, main_guard

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

        from pipeline.tracking import tracking_root, tracking_uri

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", nargs="?", help="a name under `tables` in params.yaml (default: the current variants)")
    ap.add_argument("--devices", help="CUDA device indices, e.g. 0,1,2,3 (default: none, the CPU)")
    ap.add_argument("--per-device", type=int, default=1, help="workers per listed device (default 1)")
    ap.add_argument("--workers", type=int, help="CPU workers when no --devices (default 2)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads per worker (default 0: torch's own, as a sequential dvc repro, so the "
                    "results are bit-identical to it; on a CPU, the cores / workers avoids oversubscription, "
                    "but CPU sums then add up in another order)")
    ap.add_argument("--logs", type=Path, default=Path("logs"), help="where each worker's log goes (default logs/)")
    ap.add_argument("--only", action="append", default=[], metavar="VARIANT",
                    help="train and evaluate only these runs: a variant (all its seeds), a run <variant>-<seed>, or "
                    "a 0-based index from --list; comma-separated or repeated (e.g. $SLURM_ARRAY_TASK_ID); not "
                    "the report: one machine's share")
    ap.add_argument("--shared", action="store_true",
                    help="only the shared stages (data, GMM, FID reference statistics): run once before --only tasks")
    ap.add_argument("--pull", action="store_true",
                    help="first fetch what other machines pushed (dvc pull --run-cache from the default DVC remote)")
    ap.add_argument("--push", action="store_true",
                    help="at the end push the outputs and their run cache (dvc push --run-cache) to the default remote")
    ap.add_argument("--list", action="store_true",
                    help="print the table's runs (variants x seeds), one per line with its --only index, and stop")
    ap.add_argument("--run-id", help="the MLflow tag table_run of every run (default: table name and time, or "
                    "the SLURM array job id)")
    args = ap.parse_args()
    if args.shared and args.only:
        raise StageError("--shared runs only the shared stages; give it without --only")
    if args.per_device < 1 or (args.workers is not None and args.workers < 1) or args.threads < 0:
        raise StageError("--per-device and --workers take an integer >= 1, --threads one >= 0")

    params = load_params(tracking=False)
    tables = params.get("tables") or {}
    if args.list:  # before anything is written: a job script counts the array tasks with it
        listed = tables.get(args.table) if args.table is not None else params["variants"]
        if listed is None:
            raise StageError(f"table {args.table!r} is not under `tables` in params.yaml; defined: "
                             f"{', '.join(sorted(tables)) or 'none'}")
        for i, r in enumerate(runs_of(listed, selected_seeds(params))):
            print(f"{i}\t{r}")
        return
    if args.table is not None:
        if args.table not in tables:
            raise StageError(f"table {args.table!r} is not under `tables` in params.yaml; defined: "
                             f"{', '.join(sorted(tables)) or 'none'}")
        if list(params["variants"]) != list(tables[args.table]):
            set_variants(Path("params.yaml"), list(tables[args.table]))
            params = load_params(tracking=False)
    variants = list(params["variants"])
    seeds = selected_seeds(params)
    mine = [] if args.shared else pick(variants, args.only, seeds) if args.only else runs_of(variants, seeds)
    partial = args.shared or bool(args.only)  # one machine's share: no report
    scale = str(params["scale"])
    workers = slots(args.devices, args.per_device, args.workers)
    run_id = args.run_id or default_run_id(args.table)
    base = {**os.environ, "JEM_TABLE_RUN": run_id}
    logs = args.logs / scale / run_id
    printing = threading.Lock()

    def say(line: str) -> None:
        with printing:
            print(line, flush=True)

    say(f"[table] {run_id}: {len(variants)} variants x {len(seeds)} seeds at scale {scale}, {len(workers)} workers "
        f"({', '.join('cuda ' + w if w is not None else 'cpu' for w in workers)}); logs in {logs}/"
        + (f"; this machine: {', '.join(mine) or 'the shared stages'}" if partial else ""))
    if args.pull:
        say("[table] dvc pull --run-cache: what the other machines pushed")
        if dvc(["pull", "--run-cache", "--allow-missing"], base, logs / "transfer.log", say):
            raise StageError(f"dvc pull --run-cache failed (is a default DVC remote set? dvc remote list); "
                             f"see {logs / 'transfer.log'}")
    repro = ["repro", "--pull"] if args.pull else ["repro"]  # outputs restored from the run cache: downloaded
    if dvc([*repro, "inputs_data"], base, logs / "shared.log", say):
        raise StageError(f"the shared stages (configure, prepare, gmm, inputs_data) failed; see {logs / 'shared.log'}")

    free = list(range(len(workers)))
    pool_lock = threading.Lock()

    def run(task: Task) -> tuple[Task, int, Path]:
        with pool_lock:
            slot = free.pop()
        env = dict(base)
        device = workers[slot]
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        log = logs / f"{task.name}.log"
        try:
            start = time.time()
            say(f"[table] {task.name}: started ({'cuda ' + device if device is not None else 'cpu'})")
            code = 0
            for stage in task.stages:
                code = dvc([*repro, "--single-item", stage], env, log, say)
                if code:
                    break
            say(f"[table] {task.name}: {'done' if code == 0 else f'FAILED (exit {code})'} "
                f"in {time.time() - start:.0f} s")
            return task, code, log
        finally:
            with pool_lock:
                free.append(slot)

    def phase(tasks: list[Task]) -> list[tuple[Task, int, Path]]:
        with ThreadPoolExecutor(max_workers=len(workers)) as ex:
            return [r for r in ex.map(run, tasks) if r[1] != 0]

    failed = phase([Task(f"train@{r}", [f"train@{r}"]) for r in mine])
    if dvc([*repro, "inputs_fid"], base, logs / "shared.log", say):
        raise StageError(f"the reference statistics (fid_ref, inputs_fid) failed; see {logs / 'shared.log'}")
    trained = [r for r in mine if f"train@{r}" not in {t.name for t, _, _ in failed}]
    failed += phase([Task(f"evaluation@{r}", [f"sample@{r}", f"evaluate@{r}", f"robustness@{r}", f"fid@{r}"])
                     for r in trained])
    if args.push:  # what did finish is worth sharing even when a variant failed
        say("[table] dvc push --run-cache: this machine's outputs and their run cache")
        if dvc(["push", "--run-cache"], base, logs / "transfer.log", say):
            raise StageError(f"dvc push --run-cache failed; see {logs / 'transfer.log'}")
    if failed:
        for task, code, log in failed:
            print(f"error: {task.name} failed (exit {code}); its log: {log}", file=sys.stderr)
        print(f"error: {len(failed)} of {len(mine)} runs failed; the others' results are kept. Run the same "
              "command again: finished stages are up to date, a training resumes from its last checkpoint",
              file=sys.stderr)
        raise SystemExit(1)
    if partial:
        say(f"[table] {run_id}: {', '.join(mine) or 'the shared stages'} up to date"
            + ("; pushed" if args.push else "") + f". The report waits for the whole table: "
            f"python -m stages.table {args.table or ''} --pull".replace("  ", " "))
        return
    if dvc(repro, base, logs / "assembly.log", say):
        raise StageError(f"the assembly (dvc repro: the report) failed; see {logs / 'assembly.log'}")
    say(f"[table] {run_id}: every stage up to date; the report is in reports/{scale}/")
    url = runs_url(params, scale, run_id)
    if url:
        say(f"[table] its MLflow runs (mlflow ui, then): {url}")


if __name__ == "__main__":
    main_guard(main)
