"""End to end: the real `dvc repro` at the tiny scale in a temporary copy of the repository."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import copy_repo, run_ok, stage_env


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("pipeline")
    copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # one variant of each kind of path through the stages: a softmax baseline and a generative one
    params.update(scale="tiny", variants=["softmax", "sadajem_k5"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run_ok(cmd, repo, env)
    return repo, env


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_reruns_only_what_changed(repo):
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    stages = set(run_ok([*dvc, "stage", "list", "--name-only"], path, env).split())
    params = yaml.safe_load((path / "params.yaml").read_text())
    variants = params["variants"]
    per_variant = ("train", "sample", "evaluate", "fid", "robustness")
    assert {f"{s}@{v}" for s in per_variant for v in variants} | {"report"} <= stages

    first = run_ok([*dvc, "repro"], path, env)
    assert _ran(first) == stages, f"not run: {stages - _ran(first)}"
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert set(lock["stages"]) == stages
    for v in variants:
        metrics = json.loads((path / "metrics" / "tiny" / "eval" / f"{v}.json").read_text())
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1
        assert (path / "models" / "tiny" / v / "final.pt").exists()
        assert (path / "plots" / "tiny" / "train" / v / "curves.png").exists()
        assert set(metrics["ood"]) == {"log_px", "max_prob", "grad_norm"}
        assert all(0 <= a <= 1 for d in metrics["ood"].values() for a in d.values())
        assert set(metrics["ood"]["log_px"]) == {"svhn", "interp", "cifar100", "celeba"}
        fid = json.loads((path / "metrics" / "tiny" / "fid" / f"{v}.json").read_text())
        if v == "softmax":
            assert fid["status"] == "not applicable"
        else:  # no Inception weights offline: said so, with the reason, and no number
            assert fid["status"] == "unavailable" and "weights/pt_inception" in fid["reason"]
            assert "buffer" not in fid
        rob = json.loads((path / "metrics" / "tiny" / "robustness" / f"{v}.json").read_text())
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
    assert (path / "samples" / "tiny" / "sadajem_k5" / "conditional.png").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jem-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = [r.info.run_name for r in runs]
    assert sorted(names) == sorted(stages), "one MLflow run per stage"
    for r in runs:
        assert r.info.status == "FINISHED"
        tags = r.data.tags
        assert tags["dvc_stage"] == r.info.run_name and tags["scale"] == "tiny"
        assert tags["stage"] == r.info.run_name.split("@")[0]
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"])
        assert tags["dvc_exp"] == "workspace"
        if tags["stage"] in per_variant:
            assert tags["variant"] == r.info.run_name.split("@")[1] and tags["dataset"] == "cifar10"
    train = next(r for r in runs if r.info.run_name == "train@sadajem_k5")
    assert train.data.params["sampler.kind"] == "sgld" and "train/loss" in train.data.metrics
    assert len(client.get_metric_history(train.info.run_id, "train/loss")) >= 2

    second = run_ok([*dvc, "repro"], path, env)
    assert not _ran(second), f"a second repro reran {_ran(second)}"
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == len(runs)

    edited = yaml.safe_load((path / "params.yaml").read_text())
    edited["methods"]["sadajem_k5"]["optim"] = {"rho": 0.3}
    (path / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    status = json.loads(run_ok([*dvc, "status", "--json"], path, env).strip().splitlines()[-1])
    assert set(status) == {"train@sadajem_k5"}  # the rest of its chain follows from train's outputs:
    # the queued-experiment test below reruns it and checks that exactly that chain and the report ran


@pytest.mark.slow
def test_queued_experiments_run_two_at_a_time_and_lose_no_mlflow_run(repo):
    """`dvc exp run --queue` + `dvc queue start -j 2`: both experiments log every stage they rerun."""
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    if not (path / "dvc.lock").exists():
        run_ok([*dvc, "repro"], path, env)
    run_ok(["git", "add", "-A"], path, env)
    run_ok(["git", "commit", "-qm", "results", "--allow-empty"], path, env)
    # `++` adds the key if the method block lacks it (rho is not one the tiny scale overrides)
    experiments = {"rho01": "0.1", "rho04": "0.4"}
    for name, rho in experiments.items():
        run_ok([*dvc, "exp", "run", "--queue", "-S", f"++methods.sadajem_k5.optim.rho={rho}", "-n", name], path, env)
    run_ok([*dvc, "queue", "start", "-j", "2"], path, env)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run_ok([*dvc, "queue", "status"], path, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") == 2, status

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jem-tiny").experiment_id], max_results=1000)
    rerun = {f"{s}@sadajem_k5" for s in ("train", "sample", "evaluate", "fid", "robustness")} | {"report"}
    for name, rho in experiments.items():
        mine = [r for r in runs if r.data.tags.get("dvc_exp") == name]
        assert sorted(r.info.run_name for r in mine) == sorted(rerun), name
        assert all(r.info.status == "FINISHED" for r in mine)
        train = next(r for r in mine if r.info.run_name == "train@sadajem_k5")
        assert train.data.params["optim.rho"] == rho


@pytest.mark.slow
def test_shared_dvc_remote_push_then_pull_into_a_fresh_clone(repo, tmp_path):
    """README "Several machines": `dvc remote add -d`, `dvc push` on one machine, `git clone` +
    `dvc pull` on another, and the clone's pipeline is up to date without recomputing."""
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    root_params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["methods"]["sadajem_k5"] = root_params["methods"]["sadajem_k5"]  # undo the edit test 1 made
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if "Data and pipelines are up to date" not in run_ok([*dvc, "status"], path, env):
        run_ok([*dvc, "repro"], path, env)
    remote = tmp_path / "dvc-remote"
    run_ok([*dvc, "remote", "add", "-d", "shared", str(remote)], path, env)
    run_ok(["git", "add", "-A"], path, env)
    run_ok(["git", "commit", "-qm", "results and the shared remote", "--allow-empty"], path, env)
    pushed = run_ok([*dvc, "push"], path, env)
    assert "pushed" in pushed and any(remote.rglob("*")), pushed

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    model = Path("models/tiny/sadajem_k5/final.pt")
    assert not (clone / model).exists()  # git holds dvc.lock, not the outputs
    run_ok([*dvc, "pull"], clone, env)
    assert (clone / model).read_bytes() == (path / model).read_bytes()
    status = run_ok([*dvc, "status"], clone, env)
    assert "Data and pipelines are up to date" in status, status
    assert not _ran(run_ok([*dvc, "repro"], clone, env)), "nothing to recompute after dvc pull"
