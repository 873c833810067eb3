"""Several machines, one MLflow tracking server (README "Several machines"): a real `mlflow server`
on 127.0.0.1 with a sqlite backend and proxied artifacts; two clones of the repository run a
tiny-scale stage against it through MLFLOW_TRACKING_URI (or run.tracking_uri), and every run
arrives there, tagged, with its artifacts. A server that does not answer stops a stage with one
line before it writes anything."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import copy_repo, rest_api, run_ok, stage_env, tracking_server

PREPARE = [sys.executable, "-m", "stages.prepare", "--role", "cifar10", "--out", "data/tiny/cifar10"]


def _clone(dest: Path, **run: str) -> Path:
    copy_repo(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["scale"] = "tiny"
    params["run"].update(run)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


@pytest.mark.slow
def test_two_clones_log_to_one_tracking_server(tmp_path: Path):
    server = tmp_path / "server"
    server.mkdir()
    env = stage_env()
    with tracking_server(server, env) as url:
        first = _clone(tmp_path / "machine-a")  # from the environment
        run_ok(PREPARE, first, {**env, "MLFLOW_TRACKING_URI": url})
        second = _clone(tmp_path / "machine-b", tracking_uri=url)  # from params.yaml
        run_ok(PREPARE, second, env)

        experiment = rest_api(url, "experiments/get-by-name?experiment_name=jem-tiny")["experiment"]
        assert experiment["artifact_location"] == "mlflow-artifacts:/jem-tiny"  # proxied by the server
        runs = rest_api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                             "max_results": 100})["runs"]
        stage_runs = [r for r in runs if r["info"]["run_name"] == "prepare@cifar10"]
        assert len(stage_runs) == 2, [r["info"]["run_name"] for r in runs]
        for run in stage_runs:
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert run["info"]["status"] == "FINISHED"
            assert (tags["dvc_stage"], tags["stage"], tags["scale"]) == ("prepare@cifar10", "prepare", "tiny")
            assert tags["mlflow.source.name"] == "stages/prepare.py" and "mlflow.parentRunId" in tags
            listed = rest_api(url, f"artifacts/list?run_id={run['info']['run_id']}")
            assert {"preview.png", "meta.json"} <= {f["path"] for f in listed.get("files", [])}
        stored = {p.name for p in (server / "mlartifacts").rglob("*") if p.is_file()}
        assert {"preview.png", "meta.json"} <= stored  # on the server's side, through its proxy
        for machine in (first, second):
            assert not (machine / "mlflow.db").exists() and not (machine / "mlartifacts").exists()


def test_a_tracking_server_that_does_not_answer_stops_the_stage_with_one_line(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    repo = _clone(tmp_path / "repo")
    env = {**stage_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    proc = subprocess.run(PREPARE, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MLFLOW_TRACKING_URI = http://127.0.0.1:{port}: the "
                                                   "MLflow tracking server does not answer"), proc.stderr
    assert not (repo / "data" / "tiny").exists()
    wrong = _clone(tmp_path / "typo", tracking_uri="htp://mlflow.lab:5000")
    proc = subprocess.run(PREPARE, cwd=wrong, env=stage_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "run.tracking_uri = 'htp://mlflow.lab:5000'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
