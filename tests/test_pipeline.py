"""End to end: the real `dvc repro` at the tiny scale in a temporary copy of the repository."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.outputs import read_metrics

from .conftest import TINY_VARIANTS, free_port, rest_api, run_ok, tracking_server


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


# the stages that write what the others declare they read: settings (configure) and input fingerprints
CHEAP = {"configure", "inputs_data", "inputs_fid"}


@pytest.fixture
def repo(tiny_workspace) -> tuple[Path, dict[str, str]]:
    """This test's copy of the tiny pipeline that `dvc repro` built once for the whole run (conftest)."""
    return tiny_workspace


@pytest.mark.e2e(cost=35)
def test_dvc_repro_runs_every_stage_and_reruns_only_what_changed(tiny_pipeline, repo):
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    stages = set(run_ok([*dvc, "stage", "list", "--name-only"], path, env).split())
    params = yaml.safe_load((path / "params.yaml").read_text())
    variants = params["variants"]
    per_variant = ("train", "sample", "evaluate", "fid", "robustness")
    assert {f"{s}@{v}-1" for s in per_variant for v in variants} | {"report"} <= stages

    first = tiny_pipeline.log  # the one `dvc repro` of this test run, from an empty workspace
    assert _ran(first) == stages, f"not run: {stages - _ran(first)}"
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert set(lock["stages"]) == stages
    for v in variants:
        metrics = read_metrics(path / "metrics" / "tiny" / "eval" / f"{v}/seed1.json")
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1
        assert (path / "models" / "tiny" / v / "seed1" / "final.pt").exists()
        assert (path / "plots" / "tiny" / "train" / v / "seed1" / "curves.png").exists()
        assert set(metrics["ood"]) == {"log_px", "max_prob", "grad_norm"}
        assert all(0 <= a <= 1 for d in metrics["ood"].values() for a in d.values())
        assert set(metrics["ood"]["log_px"]) == {"svhn", "interp", "cifar100", "celeba"}
        fid = read_metrics(path / "metrics" / "tiny" / "fid" / f"{v}/seed1.json")
        if v == "softmax":
            assert fid["status"] == "not applicable"
        else:  # no Inception weights offline: said so, with the reason, and no number
            assert fid["status"] == "unavailable" and "weights/pt_inception" in fid["reason"]
            assert "buffer" not in fid
        rob = read_metrics(path / "metrics" / "tiny" / "robustness" / f"{v}/seed1.json")
        assert 0 <= rob["pgd_linf"]["8/255"] <= 1 and 0 <= rob["pgd_l2"]["0.5"] <= 1
        assert rob["bpda"]["status"] == ("not applicable" if v == "softmax" else "ok")
    reports = path / "reports" / "tiny"
    report = (reports / "README.md").read_text()
    assert all(f"| {v} " in report for v in variants)
    for table in ("sadajem_table1", "sadajem_table3", "jempp_table5", "robustness", "summary"):
        assert (reports / f"{table}.csv").exists() and (reports / f"{table}.tex").exists()
    figures = {p.name for p in (reports / "figures").glob("*.png")}
    assert {"landscape_shared_y.png", "landscape_per_model.png", "robustness_PGD_linf.png"} <= figures
    assert all(f"reliability_{v}.png" in figures and f"learning_curves_{v}.png" in figures for v in variants)
    assert "samples_sadajem_k5_best_px.png" in figures
    table1 = pd.read_csv(reports / "sadajem_table1.csv")
    assert not [c for c in table1.columns if c.endswith("diff")]  # the tiny scale: no difference column
    assert (path / "samples" / "tiny" / "sadajem_k5" / "seed1" / "conditional.png").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jem-tiny")
    everything = client.search_runs([experiment.experiment_id], max_results=1000)
    runs = [r for r in everything if "dvc_stage" in r.data.tags]
    parents = {r.info.run_name: r for r in everything if "dvc_stage" not in r.data.tags}
    names = [r.info.run_name for r in runs]
    assert sorted(names) == sorted(stages - CHEAP), "one MLflow run per stage (configure and inputs_* log none)"
    assert set(parents) == {*variants, "datasets"}, "one parent run per variant, one for the data stages"
    for r in runs:
        assert r.info.status == "FINISHED"
        tags = r.data.tags
        assert tags["dvc_stage"] == r.info.run_name and tags["scale"] == "tiny"
        assert tags["stage"] == r.info.run_name.split("@")[0]
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"])
        assert tags["mlflow.source.git.commit"] == tags["git_commit"].removesuffix("-dirty")
        assert tags["mlflow.source.name"] == f"stages/{tags['stage']}.py" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["dvc_exp"] == "workspace"
        group = (tags["variant"] if tags["stage"] in per_variant else
                 "datasets" if tags["stage"] in ("prepare", "gmm", "fid_ref") else None)
        assert tags.get("mlflow.parentRunId") == (parents[group].info.run_id if group else None), r.info.run_name
        if tags["stage"] in per_variant:
            assert f"{tags['variant']}-{tags['seed']}" == r.info.run_name.split("@")[1] and tags["seed"] == "1"
            assert tags["dataset"] == "cifar10"
    train = next(r for r in runs if r.info.run_name == "train@sadajem_k5-1")
    assert train.data.params["sampler.kind"] == "sgld" and "train/loss" in train.data.metrics
    assert len(client.get_metric_history(train.info.run_id, "train/loss")) >= 2

    second = run_ok([*dvc, "repro"], path, env)
    assert not _ran(second), f"a second repro reran {_ran(second)}"
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == len(everything)
    # a second seed: test_each_edit_reruns_exactly_the_stages_that_read_what_changed["a second seed"] (what it
    # flags), tests/test_report.py (the report over two seeds), test_a_family_edit_retrains_only_its_variant_...
    # (a rerun's MLflow run under its variant's existing parent)


def _leaves(tree: object) -> Iterator[object]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def _state(path: Path, variant: str) -> dict:
    import torch

    return torch.load(path / "models" / "tiny" / variant / "seed1" / "final.pt", map_location="cpu", weights_only=True)


# what the stages of one run write, under <folder>/tiny/: forgetting them (and DVC's run cache) leaves a
# workspace whose data stages are done and whose runs were never trained
RUN_OUTPUTS = ("models", "checkpoints", "samples", "metrics/tiny/train", "metrics/tiny/eval", "metrics/tiny/fid",
               "metrics/tiny/robustness", "plots/tiny/train", "plots/tiny/eval", "plots/tiny/robustness")


def _forget_runs(path: Path, variants: tuple[str, ...], env: dict[str, str], scores_cached: bool = False) -> None:
    """``variants`` never trained in this copy: their stages' outputs, dvc.lock entries and entries in
    DVC's run cache gone (the data stages and the other variants stay done), the change committed. With
    ``scores_cached`` only the trainings' run-cache entries go: the scoring stages (sample, evaluate, fid,
    robustness) stay in the run cache, as a lab's shared cache keeps them, so once a training reproduces the
    sequential repro's weights DVC restores its scores instead of computing them again."""
    for folder in RUN_OUTPUTS:
        root = path / folder if folder.count("/") else path / folder / "tiny"
        for v in variants:
            for p in (root / v, root / f"{v}.json"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    for entry in (path / ".dvc" / "cache" / "runs").glob("*/*/*"):  # runs/<key>/<outputs>: what DVC can restore
        outs = [Path(o["path"]).parts for o in yaml.safe_load(entry.read_text()).get("outs", [])]
        if any(v in parts for parts in outs for v in variants) and (
                not scores_cached or any(parts[0] == "models" for parts in outs)):  # a training's: models/
            shutil.rmtree(entry.parent)  # the stage's key: DVC expects an entry in every key it lists
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    lock["stages"] = {k: v for k, v in lock["stages"].items()
                      if not (k.split("@")[0] in PER_VARIANT and k.split("@")[1].rsplit("-", 1)[0] in variants)}
    (path / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", f"forget {', '.join(variants)}"]):
        run_ok(cmd, path, env)


def _kill(work: Path, command: str) -> bool:
    """SIGKILL the processes running ``command`` in ``work`` (not another test's, run beside this one)."""
    killed = False
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if command in cmdline and Path(os.readlink(proc / "cwd")) == work.resolve():
                os.kill(int(proc.name), signal.SIGKILL)
                killed = True
        except (OSError, ValueError):  # not a process, or gone
            continue
    return killed


def _scores_restored(log: str, run: str) -> bool:
    """Whether a table task's log shows DVC restoring every scoring stage of ``run`` from its run cache."""
    return all(f"Stage '{s}@{run}' is cached - skipping run" in log for s in PER_VARIANT[1:])


def _table_run(output: str) -> str:
    """The table run a `stages.table` call names in its first "[table] <id>: ..." line."""
    return output.split("[table] ", 1)[1].split(":", 1)[0]


@pytest.mark.e2e(cost=105)
def test_a_table_trains_its_variants_two_at_a_time_as_a_sequential_repro_would(tiny_pipeline, repo):
    """`python -m stages.table --workers 2` in a copy whose runs were never trained (their scores still in
    the run cache, as a lab's shared cache keeps them): both train at once, and the longer one is killed
    once it has written a checkpoint. One line names its variant and log; the other's results are kept,
    its scores restored from the run cache once its weights are the sequential repro's. The same command
    again (with --push to a remote that does not answer) resumes the killed one from its checkpoint, does
    not retrain the finished one, restores the resumed run's scores, runs the report, and says in one line
    what was not pushed; a later --push sends it all. The weights and metrics are the sequential `dvc
    repro`'s (the shared pipeline's), every stage is in dvc.lock, `dvc status` is clean, and each call's
    MLflow runs carry its table run. (Scoring stages computed by two workers writing one mlflow.db:
    test_queued_experiments_run_two_at_a_time_and_lose_no_mlflow_run; computed in turn: the shared build.)"""

    import torch

    work, env = repo
    sequential = tiny_pipeline.path
    dvc = [sys.executable, "-m", "dvc"]
    _forget_runs(work, V, env, scores_cached=True)
    table = [sys.executable, "-m", "stages.table", "--workers", "2"]  # torch's own threads, as the sequential repro
    proc = subprocess.Popen(table, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = work / "checkpoints" / "tiny" / "sadajem_k5" / "seed1"
    deadline = time.time() + 600
    while not any(checkpoints.glob("step-*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert _kill(work, "stages.train --variant sadajem_k5"), "no training process to kill"
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 1, stdout + stderr
    assert "train@sadajem_k5-1: started" in stdout and "train@softmax-1: started" in stdout, stdout
    failed = [line for line in stderr.splitlines() if line.startswith("error: train@")]
    assert len(failed) == 1 and "train@sadajem_k5-1 failed" in failed[0], stderr
    log = Path(work / failed[0].rsplit("its log: ", 1)[1])
    assert log.exists() and "Running stage 'train@sadajem_k5-1'" in log.read_text()
    assert (work / "models" / "tiny" / "softmax" / "seed1" / "final.pt").exists()
    assert not (work / "models" / "tiny" / "sadajem_k5" / "seed1").exists(), "no partial outputs"
    first_id = _table_run(stdout)

    # the same command again, with --push to a remote that does not answer: nothing lost, nothing recomputed
    port = free_port()  # nothing listens there
    run_ok([*dvc, "remote", "add", "-d", "lab", f"http://127.0.0.1:{port}/dvc"], work, env)
    proc = subprocess.run([*table, "--push"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    again = proc.stdout
    assert proc.returncode == 2 and "every stage up to date" in again, again + proc.stderr  # the report too
    [unpushed] = proc.stderr.strip().splitlines()
    assert unpushed.startswith("error: dvc push --run-cache failed (") and "Cannot connect to host" in unpushed
    assert ("not pushed: the outputs and run cache of softmax-1, sadajem_k5-1 and the shared stages; all kept "
            "here. When the remote answers, the same command with --push sends them") in unpushed, unpushed
    second_id = _table_run(again)
    logs = work / "logs" / "tiny" / second_id
    assert "Running stage" not in (logs / "train@softmax-1.log").read_text()  # finished: not retrained
    assert "resumed from checkpoints/tiny/sadajem_k5/seed1/step-" in (logs / "train@sadajem_k5-1.log").read_text()
    for call, run in ((first_id, "softmax-1"), (second_id, "sadajem_k5-1")):  # each trained run's scores: restored
        scored = (work / "logs" / "tiny" / call / f"evaluation@{run}.log").read_text()
        assert not _ran(scored) and _scores_restored(scored, run), scored
    assert "Data and pipelines are up to date" in run_ok([*dvc, "status"], work, env)
    remote = work.parent / "remote"  # the remote answers again (here: moved to a folder); a later --push sends all
    run_ok([*dvc, "remote", "modify", "lab", "url", str(remote)], work, env)
    assert "; pushed." in run_ok([*table, "--shared", "--push"], work, env)  # the cheapest call that pushes
    assert "Cache and remote 'lab' are in sync" in run_ok([*dvc, "status", "--cloud"], work, env)
    stages = set(run_ok([*dvc, "stage", "list", "--name-only"], work, env).split())
    assert set(yaml.safe_load((work / "dvc.lock").read_text())["stages"]) == stages
    for v in V:  # two at a time, one killed and resumed: the sequential repro's weights, buffer and metrics
        ours, reference = _state(work, v), _state(sequential, v)
        assert all(torch.equal(ours["model"][k], t) for k, t in reference["model"].items()), v
        if reference.get("buffer") is not None:
            assert torch.equal(ours["buffer"]["samples"], reference["buffer"]["samples"])
        for kind in ("eval", "robustness"):
            a, b = (read_metrics(p / "metrics" / "tiny" / kind / f"{v}/seed1.json") for p in (work, sequential))
            assert a == b, (v, kind)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("jem-tiny").experiment_id],
                                          max_results=1000) if "table_run" in r.data.tags]
    by_call = {i: sorted(r.info.run_name for r in runs if r.data.tags["table_run"] == i) for i in (first_id, second_id)}
    assert by_call[first_id] == ["train@sadajem_k5-1", "train@softmax-1"], by_call  # scores restored: no run
    assert by_call[second_id] == ["report", "train@sadajem_k5-1"], by_call
    assert len(runs) == sum(map(len, by_call.values()))  # parallel writers lost no run, none untagged
    assert all(r.info.status == "FINISHED" for r in runs if r.info.run_name != "train@sadajem_k5-1"
               or r.data.tags["table_run"] == second_id)


@pytest.mark.e2e(cost=80)
def test_a_table_split_over_slurm_jobs_is_assembled_from_their_run_cache_without_recomputing(tiny_pipeline, repo,
                                                                                              tmp_path):
    """README "A table over several machines": `examples/slurm/submit_table.sh` (sbatch stood in for by
    tests/fake_sbatch.py, which runs each job at once and an array's tasks side by side) submits the shared
    stages, one array task per run, each in its own clone, and the report. The origin is the shared
    pipeline with softmax never trained (its scores still in the run cache), pushed to the remote with its
    run cache: the shared job restores the shared stages and computes none; softmax's task restores them,
    trains only its run and restores its scores once the weights are the sequential repro's; sadajem_k5's
    task restores its run and computes nothing; the assembly restores every stage and runs only the
    report; its weights and metrics are the sequential repro's."""

    import torch
    from mlflow.tracking import MlflowClient

    origin, env = repo
    sequential = tiny_pipeline.path
    dvc = [sys.executable, "-m", "dvc"]
    remote, bin_dir = tmp_path / "dvc-remote", tmp_path / "bin"
    params = yaml.safe_load((origin / "params.yaml").read_text())
    params["tables"]["pair"] = list(params["variants"])  # softmax, sadajem_k5
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # every output to the remote (softmax's scores among them: `dvc push --run-cache` sends the outputs of the
    # stages in dvc.lock, not of run-cache entries alone), then softmax forgotten but its scores' run cache kept
    for cmd in ([*dvc, "remote", "add", "-d", "shared", str(remote)], [*dvc, "push"]):
        run_ok(cmd, origin, env)
    _forget_runs(origin, ("softmax",), env, scores_cached=True)  # commits the table and the remote too
    run_ok([*dvc, "push", "--run-cache"], origin, env)  # run cache: the shared stages, sadajem_k5, softmax's scores
    bin_dir.mkdir()
    fake = Path(__file__).parent / "fake_sbatch.py"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nexec {sys.executable} {fake} "$@"\n')
    (bin_dir / "sbatch").chmod(0o755)
    submitted = tmp_path / "sbatch.jsonl"
    slurm_env = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "JEM_PYTHON": sys.executable,
                 "FAKE_SBATCH_LOG": str(submitted)}

    out = run_ok(["bash", "examples/slurm/submit_table.sh", "pair", "--partition=gpu"], origin, slurm_env)
    jobs = [json.loads(line) for line in submitted.read_text().splitlines()]
    outputs = "\n".join(Path(o).read_text()[-2000:] for j in jobs for o in j["outputs"])
    assert [j["cmd"][-1] for j in jobs] == ["shared", "variant", "assemble"], out
    assert all(code == 0 for j in jobs for code in j["codes"]), outputs
    assert [j["opts"].get("array") for j in jobs] == [None, "0-1", None]
    assert [j["opts"].get("dependency") for j in jobs] == [None, f"afterok:{jobs[0]['id']}",
                                                           f"afterok:{jobs[1]['id']}"]
    assert all(j["opts"]["partition"] == "gpu" for j in jobs)
    run_id = jobs[0]["opts"]["export"].split("JEM_RUN_ID=")[1]
    assert run_id.startswith("pair-slurm") and all(j["opts"]["export"] == jobs[0]["opts"]["export"] for j in jobs)

    shared = origin / ".slurm" / "pair" / "shared" / "logs" / "tiny" / run_id
    assert (shared / "shared.log").exists() and not {s for log in shared.glob("*.log") for s in _ran(log.read_text())}
    tasks = {}
    for index, variant in enumerate(V):
        work = origin / ".slurm" / "pair" / str(index)
        tasks[variant] = {s for log in (work / "logs" / "tiny" / run_id).glob("*.log") for s in _ran(log.read_text())}
        ours = _state(work, variant)  # computed or restored: in the task's clone either way
        assert all(torch.equal(ours["model"][k], t) for k, t in _state(sequential, variant)["model"].items())
    # the untrained run: trained in its own task, nothing shared or of another run computed, its scores restored
    assert tasks["softmax"] == {"train@softmax-1"}, tasks
    scored = (origin / ".slurm" / "pair" / "0" / "logs" / "tiny" / run_id / "evaluation@softmax-1.log").read_text()
    assert _scores_restored(scored, "softmax-1"), scored
    client = MlflowClient(tracking_uri=f"sqlite:///{origin / '.slurm' / 'pair' / '0' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jem-tiny").experiment_id], f"tags.table_run = '{run_id}'")
    assert {r.info.run_name for r in runs} == {"train@softmax-1"}
    assert not tasks["sadajem_k5"], tasks  # in the remote already: restored, nothing run again

    logs = origin / "logs" / "tiny" / run_id
    ran = {s for log in logs.glob("*.log") for s in _ran(log.read_text())}
    assert ran == {"report"}, ran  # every other stage restored from the jobs' run cache
    assert "Data and pipelines are up to date" in run_ok([*dvc, "status"], origin, env)  # .slurm/ is not ours
    for v in V:
        ours, reference = _state(origin, v), _state(sequential, v)
        assert all(torch.equal(ours["model"][k], t) for k, t in reference["model"].items()), v
        for kind in ("eval", "robustness"):
            a, b = (read_metrics(p / "metrics" / "tiny" / kind / f"{v}/seed1.json") for p in (origin, sequential))
            assert a == b, (v, kind)
    assert (origin / "reports" / "tiny" / "summary.csv").exists()


@pytest.mark.e2e(cost=13)
def test_mlflow_ui_and_dvc_views_read_the_runs_as_their_users_expect(repo, tmp_path):
    """After `dvc repro`: through a real tracking server's REST API, the experiment opens in the
    runs view, a train run has its dataset inputs and its model (loadable through the server's
    artifact proxy), stage runs nest under their variant; `dvc metrics show` holds only numbers
    and `dvc plots show` draws every defined plot without errors."""
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    shown = json.loads(run_ok([*dvc, "metrics", "show", "--json"], path, env).strip().splitlines()[-1])
    [workspace] = shown.values()  # one revision: the workspace
    files = workspace["data"]
    assert {f"metrics/tiny/{s}/{v}/seed1.json" for s in ("train", "eval", "fid", "robustness")
            for v in ("softmax", "sadajem_k5")} == set(files)
    values = list(_leaves({k: f["data"] for k, f in files.items()}))
    assert values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), \
        [v for v in values if not isinstance(v, (int, float))]
    assert "error" not in json.dumps(shown)

    proc = subprocess.run([*dvc, "plots", "show", "--json", "-o", str(tmp_path / "dvc_plots")], cwd=path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    plots = json.loads(proc.stdout)
    assert not plots.get("errors"), plots.get("errors")
    defined = yaml.safe_load((path / "dvc.yaml").read_text())["plots"]
    ids = [next(iter(p)) for p in defined if isinstance(p, dict) and "/" not in next(iter(p))]
    for plot_id in ids:  # each overlays both variants
        rendered = plots["data"][plot_id][0]["content"]["data"]["values"]
        assert {row["field"] for row in rendered} == {"softmax", "sadajem_k5"}, plot_id
    ood = [k for k in plots["data"] if k.startswith("reports/tiny/plots/ood/")]
    assert len(ood) == 6 and all(plots["data"][k] for k in ood)  # 2 variants x 3 scores, none empty

    with tracking_server(path, env) as url:
        experiment = rest_api(url, "experiments/get-by-name?experiment_name=jem-tiny")["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # the runs ("Model training") view
        # the README's link (and stages.table's) lands on the runs table because the served UI takes the
        # GenAI / Model training toggle from the URL's workflowType (mlflow#24498) and the filter from searchFilter
        with urllib.request.urlopen(f"{url}/", timeout=30) as page:
            main_js = re.search(r'src="([^"]*static/js/main\.[0-9a-f]+\.js)"', page.read().decode())
        assert main_js, "the MLflow UI's page names no main script"
        with urllib.request.urlopen(f"{url}/{main_js.group(1)}", timeout=30) as script:
            bundle = script.read().decode()
        assert re.search(r'\.get\("workflowType"\)', bundle) and '"machine_learning"' in bundle
        assert '"mlflow.workflowType"' in bundle and '"/experiments/:experimentId/runs"' in bundle
        assert experiment["artifact_location"] == "mlflow-artifacts:/jem-tiny"  # nothing absolute stored
        runs = rest_api(url, "runs/search",
                        {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        train = by_name["train@sadajem_k5-1"]
        run_tags = {t["key"]: t["value"] for t in train["data"]["tags"]}
        assert run_tags["mlflow.parentRunId"] == by_name["sadajem_k5"]["info"]["run_id"]
        inputs = {d["dataset"]["name"]: d for d in train["inputs"]["dataset_inputs"]}
        assert set(inputs) == {"cifar10/train", "cifar10/val"}
        train_set = inputs["cifar10/train"]
        assert {t["key"]: t["value"] for t in train_set["tags"]}["mlflow.data.context"] == "training"
        assert json.loads(train_set["dataset"]["source"])["uri"] == "data/tiny/cifar10/train.npz"
        assert json.loads(train_set["dataset"]["profile"])["features_shape"] == [256, 3, 16, 16]  # the tiny scale
        assert train_set["dataset"]["digest"]
        evaluate = by_name["evaluate@sadajem_k5-1"]
        assert [d["dataset"]["name"] for d in evaluate["inputs"]["dataset_inputs"]] == ["cifar10/test"]

        models = rest_api(url, "logged-models/search", {"experiment_ids": [experiment["experiment_id"]]})["models"]
        trained = [m for m in models if m["info"]["source_run_id"] == train["info"]["run_id"]]
        assert len(trained) == 1 and trained[0]["info"]["status"] == "LOGGED_MODEL_READY"
        assert [o["model_id"] for o in train["outputs"]["model_outputs"]] == [trained[0]["info"]["model_id"]]

        import mlflow
        import numpy as np
        import torch

        from jem.data.datasets import load_split
        from jem.evaluation.metrics import predict_logits
        from jem.method.models import load_model

        mlflow.set_tracking_uri(url)
        served = mlflow.pytorch.load_model(f"models:/{trained[0]['info']['model_id']}")  # via the artifact proxy
        images, _ = load_split(path / "data" / "tiny" / "cifar10" / "test.npz")
        ours, _ = load_model(path / "models" / "tiny" / "sadajem_k5" / "seed1" / "final.pt")
        x = torch.from_numpy(images[:5]).float() / 127.5 - 1
        with torch.no_grad():
            np.testing.assert_allclose(served(x).numpy(), predict_logits(ours, torch.from_numpy(images[:5])).numpy(),
                                       rtol=1e-4, atol=1e-4)


def _set(tree: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _params_edit(changes: dict[str, object]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        params = yaml.safe_load(text)
        for key, value in changes.items():
            _set(params, key, value)
        return yaml.safe_dump(params, sort_keys=False)
    return edit


V = TINY_VARIANTS  # softmax, sadajem_k5
PER_VARIANT = ("train", "sample", "evaluate", "fid", "robustness")
SETTINGS_RERUN = CHEAP  # a params edit that changes some instance's settings: configure, then the fingerprints
# (what is edited, how, the cheap and data stages `dvc repro inputs_data inputs_fid` runs, what `dvc status`
# then flags: the expensive stages `dvc repro` would run next)
# the one edit whose full rerun is checked end to end (test_a_family_edit_retrains_only_its_variant_...)
FAMILY_EDIT = _params_edit({"families.sadajem.sampler.step_size": 0.9})
EDITS = [
    ("a method key", "params.yaml", _params_edit({"methods.sadajem_k5.optim": {"rho": 0.3}}),
     SETTINGS_RERUN, {"train@sadajem_k5-1"}),
    ("a key of this scale", "params.yaml", _params_edit({"scales.tiny.variant.train.log_every": 2}),
     SETTINGS_RERUN, {"train@softmax-1", "train@sadajem_k5-1"}),
    ("a key of another scale", "params.yaml", _params_edit({"scales.demo.variant.model.width": 2}),
     {"configure"}, set()),
    ("a stage-section key", "params.yaml", _params_edit({"evaluate.ece_bins": 10}),
     SETTINGS_RERUN, {"evaluate@softmax-1", "evaluate@sadajem_k5-1"}),
    ("a family's entry of a stage-section table", "params.yaml", _params_edit({"evaluate.input_noise.sadajem": 0.01}),
     SETTINGS_RERUN, {"evaluate@sadajem_k5-1"}),
    ("a generative-only key of a softmax variant's family", "params.yaml",
     _params_edit({"families.softmax.sampler": {"steps": 3}}), {"configure"}, set()),
    ("another dataset role (the near-OOD set)", "params.yaml", _params_edit({"datasets.cifar100.tiny.seed": 5}),
     SETTINGS_RERUN | {"prepare@cifar100", "gmm@cifar100", "fid_ref@cifar100"},
     {"evaluate@softmax-1", "evaluate@sadajem_k5-1"}),
    ("a module training imports", "jem/method/models.py", lambda text: text + "# an edit\n",
     {"fid_ref@cifar10", "fid_ref@cifar100"},  # a data stage that imports it too: rerun, its outputs the same
     {f"{s}@{v}-1" for s in PER_VARIANT for v in V}),
    ("a module only evaluation imports", "jem/evaluation/ood.py", lambda text: text + "# an edit\n",
     set(), {"evaluate@softmax-1", "evaluate@sadajem_k5-1"}),
    ("a second seed", "params.yaml", _params_edit({"seeds": [1, 2]}),  # only the new runs, and the report
     SETTINGS_RERUN, {f"{s}@{v}-2" for s in PER_VARIANT for v in V} | {"report"}),
    ("a comment in params.yaml", "params.yaml", lambda text: text.replace("\nvariants:", "\n# a note\nvariants:", 1),
     set(), set()),
    ("the order of params.yaml's keys", "params.yaml",
     lambda text: yaml.safe_dump(yaml.safe_load(text), sort_keys=True), set(), set()),
]


@pytest.fixture
def dvc_here(repo, monkeypatch, capfd) -> Callable[..., str]:
    """`dvc ARGS` in this test's copy through DVC's own command line (``dvc.cli.main``), in this process:
    the same commands, parsing and stage processes, without an interpreter's start-up per call."""
    path, env = repo
    monkeypatch.chdir(path)
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import colorama
    from dvc.cli import main

    for name in ("deinit", "reinit"):  # dvc.ui's JSON output swaps sys.stdout back to colorama's first stream
        monkeypatch.setattr(colorama, name, lambda: None)
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_objects", "dvc_data")]

    def dvc(*args: str) -> str:
        log = io.StringIO()  # DVC's messages: its console handlers hold the stream of their import
        handler = logging.StreamHandler(log)
        saved = [logger.handlers for logger in loggers]
        for logger in loggers:
            logger.handlers = [handler]
        capfd.readouterr()
        try:  # and what it prints: sys.stdout may still be the wrapper colorama put on an older stream
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                code = main(list(args))
        finally:
            for logger, handlers in zip(loggers, saved, strict=True):
                logger.handlers = handlers
        captured = capfd.readouterr()
        out = log.getvalue() + captured.out + captured.err
        assert code == 0, f"dvc {' '.join(args)} failed ({code}):\n{out[-6000:]}"
        return out
    return dvc


@pytest.mark.e2e(cost=15)
@pytest.mark.parametrize(("what", "file", "edit", "ran", "flagged"), EDITS, ids=[e[0] for e in EDITS])
def test_each_edit_reruns_exactly_the_stages_that_read_what_changed(repo, dvc_here, what, file, edit, ran, flagged):
    """README "The DAG": one edit, the real `dvc repro` of the stages that resolve settings and fingerprint
    data (and so the data stages the edit reaches), then `dvc status` names exactly the expensive stages
    that read what changed; undone, the workspace is up to date again. (One test per edit: each starts
    from its own copy of the shared pipeline, and the two workers share them out.)"""
    path, _ = repo

    def status() -> set[str]:
        out = dvc_here("status", "--json")
        return set(json.loads(next(line for line in out.splitlines() if line.startswith("{"))))

    before = (path / file).read_text()
    (path / file).write_text(edit(before))
    assert _ran(dvc_here("repro", "inputs_data", "inputs_fid")) == ran, what
    assert status() == flagged, what
    (path / file).write_text(before)
    dvc_here("repro", "inputs_data", "inputs_fid")
    assert not status(), f"{what}: undone, yet not up to date"


@pytest.mark.e2e(cost=45)
def test_a_family_edit_retrains_only_its_variant_and_dvc_params_diff_shows_it(repo, dvc_here):
    """The rerun matrix's edit checked end to end: a family key. The settings and fingerprint stages flag
    only that family's variant's training; the full `dvc repro` retrains it alone, with its chain and the
    report, each stage a new MLflow run under the variant's existing parent run; `dvc params diff` shows
    the edit in params.yaml and in the variant's own settings file."""
    path, _ = repo
    (path / "params.yaml").write_text(FAMILY_EDIT((path / "params.yaml").read_text()))
    assert _ran(dvc_here("repro", "inputs_data", "inputs_fid")) == SETTINGS_RERUN
    flagged = json.loads(next(line for line in dvc_here("status", "--json").splitlines() if line.startswith("{")))
    assert set(flagged) == {"train@sadajem_k5-1"}
    assert _ran(dvc_here("repro")) == {f"{s}@sadajem_k5-1" for s in PER_VARIANT} | {"report"}
    diff = json.loads(dvc_here("params", "diff", "--json").strip().splitlines()[-1])
    change = {"old": 1.0, "new": 0.9, "diff": pytest.approx(-0.1)}
    assert diff["params.yaml"] == {"families.sadajem.sampler.step_size": change}
    assert diff["config/tiny/settings/train/sadajem_k5/seed1.yaml"] == {"variant.sampler.step_size": change}
    assert set(diff) == {"params.yaml", "config/tiny/settings/train/sadajem_k5/seed1.yaml"}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jem-tiny").experiment_id], max_results=1000)
    parents = {r.info.run_name: r.info.run_id for r in runs if "dvc_stage" not in r.data.tags}
    assert set(parents) == {*V, "datasets"}, "no second parent run for the retrained variant"
    for stage in PER_VARIANT:
        both = [r for r in runs if r.info.run_name == f"{stage}@sadajem_k5-1"]
        assert len(both) == 2 and all(r.info.status == "FINISHED" for r in both), stage  # the first, and the rerun
        assert {r.data.tags["mlflow.parentRunId"] for r in both} == {parents["sadajem_k5"]}, stage
    assert len([r for r in runs if r.info.run_name == "train@softmax-1"]) == 1


def _reports_finished(db: Path, experiments: dict[str, str]) -> int:
    """How many of ``experiments`` have logged their report stage's run as FINISHED in ``db``."""
    import sqlite3

    query = ("SELECT COUNT(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE r.name = 'report' AND "
             f"r.status = 'FINISHED' AND t.key = 'dvc_exp' AND t.value IN ({', '.join('?' * len(experiments))})")
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            return con.execute(query, list(experiments)).fetchone()[0]
    except sqlite3.Error:  # busy, or the schema still being written: ask again
        return 0


@pytest.mark.e2e(cost=47)
def test_queued_experiments_run_two_at_a_time_and_lose_no_mlflow_run(repo):
    """`dvc exp run --queue` + `dvc queue start -j 2`: both experiments, each in DVC's temporary executor,
    log every stage they rerun to the workspace's mlflow.db, under one parent run per variant each."""
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    # `++` adds the key if the table lacks it: an evaluation setting of sadajem_k5's family, so each
    # experiment reruns that variant's evaluation and the report (a training key reruns the same way, longer)
    experiments = {"noise01": "0.01", "noise02": "0.02"}
    for name, noise in experiments.items():
        run_ok([*dvc, "exp", "run", "--queue", "-S", f"++evaluate.input_noise.sadajem={noise}", "-n", name], path, env)
    run_ok([*dvc, "queue", "start", "-j", "2"], path, env)
    deadline, asked = time.time() + 900, 0.0
    while time.time() < deadline:  # each experiment's report is its last stage: until both are in mlflow.db,
        if _reports_finished(path / "mlflow.db", experiments) < len(experiments) and time.time() - asked < 15:
            time.sleep(0.5)  # look there (cheap) rather than start `dvc queue status` (a second of CPU) each time
            continue
        status, asked = run_ok([*dvc, "queue", "status"], path, env), time.time()
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(1)
    assert status.count("Success") == 2, status

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jem-tiny").experiment_id], max_results=1000)
    rerun = {"evaluate@sadajem_k5-1", "report"}
    for name, noise in experiments.items():
        mine = [r for r in runs if r.data.tags.get("dvc_exp") == name and "dvc_stage" in r.data.tags]
        assert sorted(r.info.run_name for r in mine) == sorted(rerun), name
        assert all(r.info.status == "FINISHED" for r in mine)
        evaluate = next(r for r in mine if r.info.run_name == "evaluate@sadajem_k5-1")
        assert evaluate.data.params["evaluate.input_noise"] == noise
        parent = [r for r in runs if r.data.tags.get("jem_group") == "sadajem_k5"
                  and r.data.tags.get("dvc_exp") == name]
        assert len(parent) == 1, f"{name}: one parent run for the variant, not {len(parent)}"
        nested = [r for r in mine if r.info.run_name != "report"]
        assert all(r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id for r in nested)


@pytest.mark.e2e(cost=7)
def test_shared_dvc_remote_push_then_pull_into_a_fresh_clone(repo, tmp_path):
    """README "Several machines": `dvc remote add -d`, `dvc push` on one machine, `git clone` +
    `dvc pull` on another, and the clone's pipeline is up to date without recomputing."""
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    remote = tmp_path / "dvc-remote"
    run_ok([*dvc, "remote", "add", "-d", "shared", str(remote)], path, env)
    run_ok([*dvc, "remote", "modify", "shared", "verify", "true"], path, env)  # README: hash what is downloaded
    run_ok(["git", "add", "-A"], path, env)
    run_ok(["git", "commit", "-qm", "results and the shared remote", "--allow-empty"], path, env)
    pushed = run_ok([*dvc, "push"], path, env)
    assert "pushed" in pushed and any(remote.rglob("*")), pushed

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    model = Path("models/tiny/sadajem_k5/seed1/final.pt")
    assert not (clone / model).exists()  # git holds dvc.lock, not the outputs
    run_ok([*dvc, "pull"], clone, env)
    assert (clone / model).read_bytes() == (path / model).read_bytes()
    status = run_ok([*dvc, "status"], clone, env)
    assert "Data and pipelines are up to date" in status, status
    assert not _ran(run_ok([*dvc, "repro"], clone, env)), "nothing to recompute after dvc pull"

    # whoever can write to the remote can deny service, not substitute content: dvc.lock (in git) pins the
    # hash, and a tampered object is refused on download, never checked out
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["train@sadajem_k5-1"]
    folder = next(o["md5"] for o in lock["outs"] if o["path"] == "models/tiny/sadajem_k5/seed1")
    manifest = json.loads((remote / "files" / "md5" / folder[:2] / folder[2:]).read_text())
    weights = next(e["md5"] for e in manifest if e["relpath"] == "final.pt")
    stored = remote / "files" / "md5" / weights[:2] / weights[2:]
    forged = bytes(len(stored.read_bytes()))  # same size, other content
    stored.chmod(0o644)
    stored.write_bytes(forged)
    victim = tmp_path / "victim"
    run_ok(["git", "clone", "-q", str(path), str(victim)], tmp_path, env)
    pulled = subprocess.run([*dvc, "pull"], cwd=victim, env=env, capture_output=True, text=True)
    assert pulled.returncode != 0 and "models/tiny/sadajem_k5" in pulled.stdout + pulled.stderr, pulled
    target = victim / model
    assert not target.exists() or target.read_bytes() != forged
