"""End to end: the real `dvc repro` at the tiny scale in a temporary copy of the repository."""

from __future__ import annotations

import json
import re
import sys
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
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(re.sub(r"(?m)^scale: \w+", "scale: tiny", params, count=1))
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
    assert {f"{s}@{v}" for s in ("train", "sample", "evaluate") for v in variants} | {"report"} <= stages

    first = run_ok([*dvc, "repro"], path, env)
    assert _ran(first) == stages, f"not run: {stages - _ran(first)}"
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert set(lock["stages"]) == stages
    for v in variants:
        metrics = json.loads((path / "metrics" / "tiny" / "eval" / f"{v}.json").read_text())
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1
        assert (path / "models" / "tiny" / v / "final.pt").exists()
        assert (path / "plots" / "tiny" / "train" / v / "curves.png").exists()
    report = (path / "reports" / "tiny" / "README.md").read_text()
    assert all(f"| {v} " in report for v in variants)
    assert (path / "reports" / "tiny" / "sadajem_table1.tex").exists()
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
        if tags["stage"] in ("train", "sample", "evaluate"):
            assert tags["variant"] == r.info.run_name.split("@")[1] and tags["dataset"] == "cifar10"
    train = next(r for r in runs if r.info.run_name == "train@sadajem_k5")
    assert train.data.params["sampler.kind"] == "sgld" and "train/loss" in train.data.metrics
    assert len(client.get_metric_history(train.info.run_id, "train/loss")) >= 2

    second = run_ok([*dvc, "repro"], path, env)
    assert not _ran(second), f"a second repro reran {_ran(second)}"
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == len(runs)

    text = (path / "params.yaml").read_text()
    edited = text.replace("  sadajem_k5: {family: sadajem, sampler: {steps: 5}}\n",
                          "  sadajem_k5: {family: sadajem, sampler: {steps: 5}, optim: {rho: 0.3}}\n")
    assert edited != text
    (path / "params.yaml").write_text(edited)
    status = json.loads(run_ok([*dvc, "status", "--json"], path, env).strip().splitlines()[-1])
    assert set(status) == {"train@sadajem_k5"}
    third = run_ok([*dvc, "repro"], path, env)
    assert _ran(third) == {"train@sadajem_k5", "sample@sadajem_k5", "evaluate@sadajem_k5", "report"}
