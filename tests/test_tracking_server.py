"""Several machines, one MLflow tracking server (README "Several machines"): a real `mlflow server`
on 127.0.0.1 with a sqlite backend and proxied artifacts; two clones of the repository run a
tiny-scale stage against it through MLFLOW_TRACKING_URI (or run.tracking_uri), and every run
arrives there, tagged, with its artifacts. A server that does not answer stops a stage with one
line before it writes anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.probe import check_tracking
from pipeline.store import TrackingError

from .conftest import basic_auth, copy_repo, free_port, rest_api, run_ok, stage_env, tracking_server

PREPARE = [sys.executable, "-m", "stages.prepare", "--role", "cifar10", "--out", "data/tiny/cifar10"]


def _clone(dest: Path, **run: str) -> Path:
    copy_repo(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["scale"] = "tiny"
    params["run"].update(run)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def test_a_tracking_server_that_does_not_answer_stops_the_stage_with_one_line(tmp_path: Path):
    port = free_port()  # nothing listens there
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


@pytest.mark.e2e(cost=55)
def test_a_server_behind_basic_auth_refuses_strangers_and_logs_its_users_runs_from_two_clones(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch):
    """README "One tracking server for the team": MLflow's basic-auth app, host and CORS restrictions.
    An unauthenticated request is refused; two clones of the repository (two machines), one told the
    server by MLFLOW_TRACKING_URI and one by run.tracking_uri, log their runs with MLflow's own credential
    variables, tagged, with their artifacts through the server's proxy and nothing local;
    one with a wrong password stops in one line before it writes anything. The start-up check takes
    the account from MLflow's credentials file, too (in-process: tests/test_tracking_probe.py has the rest)."""
    import urllib.error
    import urllib.request

    server = tmp_path / "server"
    server.mkdir()
    account = ("lab-admin", "correct horse battery staple")
    env = stage_env()
    server_env = basic_auth(server, env, account)
    with tracking_server(server, server_env, extra=("--app-name", "basic-auth", "--allowed-hosts",
                                                    "127.0.0.1:*,localhost:*", "--cors-allowed-origins",
                                                    "http://127.0.0.1:5000")) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert refused.value.code == 401

        # two clones (two machines) log to it: one told by the environment, one by params.yaml
        account_env = {**env, "MLFLOW_TRACKING_USERNAME": account[0], "MLFLOW_TRACKING_PASSWORD": account[1]}
        first = _clone(tmp_path / "machine-a")
        run_ok(PREPARE, first, {**account_env, "MLFLOW_TRACKING_URI": url})
        second = _clone(tmp_path / "machine-b", tracking_uri=url)
        run_ok(PREPARE, second, account_env)
        experiment = rest_api(url, "experiments/get-by-name?experiment_name=jem-tiny", auth=account)["experiment"]
        assert experiment["artifact_location"] == "mlflow-artifacts:/jem-tiny"  # proxied by the server
        runs = rest_api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]}, auth=account)["runs"]
        stage_runs = [r for r in runs if r["info"]["run_name"] == "prepare@cifar10"]
        assert len(stage_runs) == 2, [r["info"]["run_name"] for r in runs]
        for run in stage_runs:
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert run["info"]["status"] == "FINISHED"
            assert (tags["dvc_stage"], tags["stage"], tags["scale"]) == ("prepare@cifar10", "prepare", "tiny")
            assert tags["mlflow.source.name"] == "stages/prepare.py" and "mlflow.parentRunId" in tags
            listed = rest_api(url, f"artifacts/list?run_id={run['info']['run_id']}", auth=account)
            assert {"preview.png", "meta.json"} <= {f["path"] for f in listed.get("files", [])}
        stored = {p.name for p in (server / "mlartifacts").rglob("*") if p.is_file()}
        assert {"preview.png", "meta.json"} <= stored  # on the server's side, through its proxy
        for machine in (first, second):
            assert not (machine / "mlflow.db").exists() and not (machine / "mlartifacts").exists()

        for name, wrong in (("stranger", {"MLFLOW_TRACKING_PASSWORD": "guess"}), ("anonymous", {})):
            repo = _clone(tmp_path / name)
            bad = {**env, "MLFLOW_TRACKING_URI": url, **({"MLFLOW_TRACKING_USERNAME": account[0]} if wrong else {}),
                   **wrong}
            proc = subprocess.run(PREPARE, cwd=repo, env=bad, capture_output=True, text=True, timeout=120)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr
            assert lines[0].startswith(f"error: MLFLOW_TRACKING_URI = {url}: the server refused "), lines
            assert "(HTTP 401)" in lines[0]
            assert not (repo / "data" / "tiny").exists()
        runs = rest_api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]]}, auth=account)["runs"]
        assert len(runs) == 3  # the two machines' runs and their "datasets" parent: nothing from the refused ones

        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                     "MLFLOW_TRACKING_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        credentials = tmp_path / ".mlflow" / "credentials"  # as `mlflow` reads it, with no variables set
        credentials.parent.mkdir()
        credentials.write_text(f"[mlflow]\nmlflow_tracking_username = {account[0]}\n"
                               f"mlflow_tracking_password = {account[1]}\n")
        check_tracking({"run": {"tracking_uri": url}})
        credentials.write_text(f"[mlflow]\nmlflow_tracking_username = {account[0]}\nmlflow_tracking_password = guess\n")
        with pytest.raises(TrackingError, match=r"refused user 'lab-admin' \(from .*credentials\) \(HTTP 401\)"):
            check_tracking({"run": {"tracking_uri": url}})

        # the host check: a request naming another host (DNS rebinding) is refused before authentication
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": "evil.example:5000"})
        with pytest.raises(urllib.error.HTTPError) as host:
            urllib.request.urlopen(request, timeout=30)
        assert host.value.code in (400, 403)
