"""Faults of the tracking store (README "What survives what"). A tracking server that goes away mid-run
(restarted, unreachable): the stage goes on, what its run logs waits in ``.mlflow-pending/<run_id>.jsonl``
and is sent, in order, with its own steps and timestamps, once the server answers again; the model and
the run's end wait for it a bounded time, and what still waits then is sent by the next stage or by
``python -m pipeline.journal --replay``. A damaged ``mlflow.db`` (or a file store MLflow 3 refuses)
stops every stage before any work in one line naming the file, which is left as it is.

In-process against MLflow's file store (no schema to create) behind a client that fails as MLflow's REST
client fails when nothing answers; end to end with a real ``mlflow server`` behind basic auth, stopped
during a tiny training and started again on the same port and store."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import pipeline.journal as journal
from pipeline.journal import PendingCalls, replay_pending
from pipeline.probe import check_tracking
from pipeline.store import TrackingError
from pipeline.tracking import StageRun

from .conftest import (
    ROOT,
    basic_auth,
    copy_repo,
    free_port,
    stage_env,
    start_mlflow_server,
    stop_server,
    wait_until_up,
    write_prepared_shapes,
)

NOWHERE = "http://127.0.0.1:9"  # the server the journals name; its answers are the test's


@pytest.fixture
def no_answer() -> Exception:
    """The exception MLflow's REST client raises when nothing listens (a real one, from a closed port)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    port = free_port()  # nothing listens there
    with pytest.raises(MlflowException) as caught:
        http_request(get_default_host_creds(f"http://127.0.0.1:{port}"), "/api/2.0/mlflow/runs/log-batch", "POST",
                     max_retries=0, backoff_factor=0, backoff_jitter=0, timeout=5)
    assert journal.server_away(caught.value)
    return caught.value


class _Server:
    """A real file store behind a switch: while ``down``, every call fails as MLflow's REST client does."""

    def __init__(self, client: Any, failure: Exception) -> None:
        self.client, self.failure, self.down = client, failure, False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise self.failure
            return method(*args, **kwargs)

        return call


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_answer: Exception) -> Iterator[tuple[_Server, str, str]]:
    """A file store (MLflow's fluent calls, a logged model's, go there too), a switchable server in front of
    it (the journal's health check asks the switch), and a run opened in it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    server = _Server(MlflowClient(tracking_uri=uri), no_answer)
    monkeypatch.setattr(journal, "answers", lambda _uri: not server.down)
    monkeypatch.setattr(journal, "PROBE_GAPS", (0.0, 0.0))  # ask at every call
    monkeypatch.setenv(journal.WAIT_VAR, "0")
    run_id = server.client.create_run(server.client.create_experiment("outage")).info.run_id
    try:
        yield server, run_id, uri
    finally:
        mlflow.set_tracking_uri(before)


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, int, float]]:
    return [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)]


def test_calls_the_server_does_not_take_wait_in_the_journal_and_go_in_order_when_it_is_back(
        store: tuple[_Server, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    server, run_id, _ = store
    pending = PendingCalls(tmp_path / ".mlflow-pending", run_id, NOWHERE)
    run = StageRun(server, run_id, pending)
    run.log_params({"lr": 0.1})
    run.log_metrics({"loss": 1.0}, step=1)
    assert not pending.path.exists()  # nothing kept while the server answers

    server.down = True
    run.log_metrics({"loss": 2.0}, step=2)
    run.set_tags({"phase": "away"})
    run.log_params({"batch": 16, "lr": 0.1})
    run.log_metrics({"loss": 3.0, "acc": 0.5}, step=3)
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "steps.csv").write_text("step,loss\n2,2.0\n")
    run.log_artifact(plots)
    run.log_dataset(tmp_path / "data" / "cifar10" / "train.npz", "training", torch.zeros(4, 3, 2, 2).numpy(),
                    torch.arange(4).numpy())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    run.log_model(model, torch.rand(2, 3, 2, 2))  # waited for (JEM_TRACKING_WAIT=0 s here), then kept, saved
    (plots / "steps.csv").write_text("changed after the call")  # the kept copy is what it logged

    records = [json.loads(line) for line in pending.path.read_text().splitlines()]
    assert records[0] == {"tracking_uri": NOWHERE, "run_id": run_id}
    assert [r["op"] for r in records[1:]] == ["batch", "batch", "batch", "batch", "artifact", "dataset", "model"]
    stamps = {step: ts for r in records[1:] for _, _, ts, step in r.get("metrics", [])}
    out = capsys.readouterr().out.splitlines()
    assert sum("does not answer" in line for line in out) == 1, out

    server.down = False
    run.log_metrics({"loss": 4.0}, step=4)  # sends what waits first, then itself
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        run.log_params({"lr": 0.2})  # a call the server refuses is the stage's error, as before: not kept
    assert not pending.path.exists()
    run.finish()
    assert not pending.path.exists() and not pending.files.exists()
    client = server.client
    assert [(s, v) for s, _, v in _history(client, run_id, "loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert {s: ts for s, ts, _ in _history(client, run_id, "loss") if s in (2, 3)} == stamps  # logged when made
    logged = client.get_run(run_id)
    assert logged.data.params == {"lr": "0.1", "batch": "16"} and logged.data.tags["phase"] == "away"
    assert logged.info.status == "FINISHED"
    [dataset] = logged.inputs.dataset_inputs
    assert dataset.dataset.name == "cifar10/train" and dataset.tags[0].value == "training"
    assert [f.path for f in client.list_artifacts(run_id)] == ["steps.csv"]  # a folder's files, as sent at once
    assert Path(client.download_artifacts(run_id, "steps.csv", str(tmp_path))).read_text() == "step,loss\n2,2.0\n"
    [output] = logged.outputs.model_outputs
    import mlflow

    again = mlflow.pytorch.load_model(f"models:/{output.model_id}")
    x = torch.rand(2, 3, 2, 2)
    assert torch.allclose(again(x), model(x))
    assert sum("answers again" in line for line in capsys.readouterr().out.splitlines()) == 1


def test_a_journal_left_by_a_killed_stage_is_sent_once_and_its_run_ended_killed(
        store: tuple[_Server, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    server, run_id, uri = store
    folder = tmp_path / ".mlflow-pending"
    left = PendingCalls(folder, run_id, uri)  # a stage that died while the server was away
    for step in (1, 2, 3):
        left.add({"op": "batch", "metrics": [["loss", float(step), 1000 + step, step]]})
    left.add({"op": "batch", "tags": [["phase", "left"]], "params": [["lr", "0.1"]]})
    left.sent(left.waiting()[0])  # a replay cut short after the first call
    left.release()
    other = PendingCalls(folder, "another-run", "http://elsewhere:5000")  # another server's: left alone
    other.add({"op": "batch", "tags": [["x", "y"]]})
    other.release()
    second = server.client.create_run(server.client.get_run(run_id).info.experiment_id).info.run_id
    running = PendingCalls(folder, second, uri)  # its stage still runs
    running.add({"op": "batch", "tags": [["x", "y"]]})

    assert replay_pending(tmp_path, uri) == 0
    assert replay_pending(tmp_path, uri) == 0  # the second finds nothing to send
    assert [(s, v) for s, _, v in _history(server.client, run_id, "loss")] == [(2, 2.0), (3, 3.0)]
    logged = server.client.get_run(run_id)
    assert logged.data.tags["phase"] == "left" and logged.data.params == {"lr": "0.1"}
    assert logged.info.status == "KILLED"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["another-run.jsonl", "another-run.lock",
                                                               f"{second}.jsonl", f"{second}.lock"])
    running.release()  # its stage was killed

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # the command a user runs: every journal, to its own server
    monkeypatch.setattr(journal, "answers", lambda server_uri: server_uri == uri)
    capsys.readouterr()
    assert journal.cli(["--replay"]) == 1
    said = capsys.readouterr().out
    assert f"sent the 1 calls kept for run {second} to {uri} (ended KILLED)" in said, said
    assert server.client.get_run(second).data.tags["x"] == "y"
    assert "http://elsewhere:5000 does not answer: 1 calls of run another-run still wait in " in said
    assert "1 calls still wait; run this again once their server answers" in said
    assert sorted(p.name for p in folder.iterdir()) == ["another-run.jsonl", "another-run.lock"]


# ---- a damaged mlflow.db, a file store ------------------------------------------------------------
def _mlflow_like_db(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('dc11669786a5')")
        db.execute("CREATE TABLE metrics (key TEXT, value REAL, timestamp INTEGER, step INTEGER, run_uuid TEXT)")
        db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
                       [(f"train/m{i % 7}", i / 3, i, i, "r" * 32) for i in range(4000)])
        db.commit()


@pytest.mark.parametrize("damage", ["garbage", "cut_short", "header_zeroed"])
def test_a_damaged_mlflow_db_stops_the_stage_in_one_line_and_is_left_as_it_is(tmp_path: Path, damage: str,
                                                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    _mlflow_like_db(db)
    check_tracking({"run": {}})  # a sound one passes
    whole = db.read_bytes()
    damaged = {"garbage": os.urandom(3000), "cut_short": whole[: len(whole) * 2 // 3],
               "header_zeroed": bytes(100) + whole[100:]}[damage]
    db.write_bytes(damaged)
    with pytest.raises(TrackingError) as stopped:
        check_tracking({"run": {}})
    message = str(stopped.value)
    assert "\n" not in message and message.startswith(f"{db}: "), message
    assert ("not an SQLite database" if damage != "cut_short" else "damaged SQLite database") in message
    assert f"mv {db} {db}.corrupt" in message and ".recover" in message
    assert db.read_bytes() == damaged and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_stage_on_a_damaged_mlflow_db_exits_2_with_one_line(tmp_path: Path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "mlflow.db").write_bytes(b"SQLite format 2\0" + os.urandom(2000))
    env = {**stage_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.configure", "--out", "config/demo/settings"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'mlflow.db'}: not an SQLite database"), lines
    assert not (tmp_path / "config").exists()


def test_a_file_store_stops_the_stage_unless_mlflow_is_told_to_allow_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(TrackingError, match=r"^run.tracking_uri = file://.*MLFLOW_ALLOW_FILE_STORE=true; log to "
                                            r"sqlite:///<path>/mlflow.db instead"):
        check_tracking({"run": {"tracking_uri": uri}})
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking({"run": {"tracking_uri": uri}})


# ---- a real server restarted in the middle of a training -------------------------------------------
ACCOUNT = ("lab-admin", "correct horse battery staple")
TRAIN = [sys.executable, "-m", "stages.train", "--variant", "softmax", "--data", "data/tiny", "--gmm", "gmm/tiny",
         "--out", "models/t", "--metrics", "metrics/t.json", "--plots", "plots/t", "--checkpoints", "checkpoints/t"]


def _serve(store: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    """``mlflow server`` with MLflow's basic-auth app on ``store`` (its runs, accounts and artifacts), on
    ``port``: the same command both times, as an admin restarts it."""
    return start_mlflow_server(store, port, basic_auth(store, env, ACCOUNT), ("--app-name", "basic-auth"))


def _logged(db: Path, key: str) -> int:
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db, timeout=1)) as con:
        return con.execute("SELECT count(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]
    return 0


@pytest.mark.e2e(cost=60)
def test_a_tracking_server_restarted_mid_training_gets_every_metric_and_the_model(tmp_path: Path):
    repo, store = tmp_path / "repo", tmp_path / "server"
    repo.mkdir()
    store.mkdir()
    env = stage_env()
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    servers = [_serve(store, port, env)]
    try:
        copy_repo(repo)  # while the server starts
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["scale"] = "tiny"
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        write_prepared_shapes(repo / "data" / "tiny" / "cifar10", 320, train=256)  # 16 steps, a read-out every 4
        wait_until_up(servers[0], url)
        user = {**env, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": ACCOUNT[0],
                "MLFLOW_TRACKING_PASSWORD": ACCOUNT[1], "JEM_TRACKING_WAIT": "150"}
        train = subprocess.Popen(TRAIN, cwd=repo, env=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out: list[str] = []
        err: list[str] = []
        for stream, lines in ((train.stdout, out), (train.stderr, err)):
            threading.Thread(target=lambda s=stream, o=lines: o.extend(s), daemon=True).start()
        deadline = time.time() + 180
        while _logged(store / "mlflow.db", "train/loss") == 0:  # a first read-out has arrived: stop the server
            assert train.poll() is None and time.time() < deadline, "".join(out + err)[-4000:]
            time.sleep(0.02)
        train.send_signal(signal.SIGSTOP)  # the server goes between two read-outs, whatever the machine's speed
        stop_server(servers[0])
        train.send_signal(signal.SIGCONT)
        while not any("does not answer" in line for line in out):
            assert train.poll() is None and time.time() < deadline, "".join(out + err)[-4000:]
            time.sleep(0.05)
        servers.append(_serve(store, port, env))  # the same server again, on its port and store
        assert train.wait(timeout=300) == 0, "".join(out + err)[-4000:]
    finally:
        for proc in servers:
            stop_server(proc)
    text = "".join(out)
    assert text.count("does not answer (") == 1 and text.count("answers again") == 1, text
    assert text.count("View run train@softmax") <= 1, text  # ended once (MLflow prints the link as it ends a run)
    assert not (repo / ".mlflow-pending").exists()
    with open(repo / "plots" / "t" / "steps.csv") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    with open(repo / "plots" / "t" / "val.csv") as fh:
        val_steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert steps == [4, 8, 12, 16] and val_steps == [16]
    with contextlib.closing(sqlite3.connect(store / "mlflow.db")) as db:  # what the server stored
        [(run_id, status)] = db.execute("SELECT run_uuid, status FROM runs WHERE name = 'train@softmax'").fetchall()

        def logged(key: str) -> list[tuple[int, float]]:
            return db.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY step",
                              (run_id, key)).fetchall()

        assert [step for step, _ in logged("train/loss")] == steps  # each read-out, once
        assert [step for step, _ in logged("val/acc")] == val_steps and logged("steps") == [(0, 16.0)]
        assert status == "FINISHED"
        [model_id] = [m for (m,) in db.execute("SELECT model_id FROM logged_models WHERE name = 'model' AND "
                                               "source_run_id = ?", (run_id,))]
    assert list(store.glob(f"mlartifacts/*/models/{model_id}/artifacts/data/model.pt2"))  # uploaded through it
