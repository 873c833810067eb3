"""The calls kept for a tracking server that does not answer, and their replay.

A call to a tracking server that does not answer (no connection, a timeout, 5xx after MLflow's own
retries, bounded here by HTTP_DEFAULTS where the user set none: a refused connection costs about 3 s,
a host that drops every packet about 50 s, once; the calls after it are kept at once) is
kept in the run's journal, <repo>/.mlflow-pending/<run_id>.jsonl, and the stage goes on; it is sent,
in order and with its own step and timestamp, once the server answers again (asked every PROBE_GAPS
seconds), before the run's next call. The model and the run's end wait for the server up to
JEM_TRACKING_WAIT seconds in all (default WAIT_DEFAULT_S); what still waits then stays on disk (the
stage succeeds: its outputs are complete), and is sent by the next stage that logs to that server or
by `python -m pipeline.journal --replay`. A database store (mlflow.db) never keeps anything.

The run that keeps them (``StageRun``) is ``pipeline.tracking``'s; MLflow is imported where used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.store import TrackingError, causes, quiet_mlflow, restore_env, say, tracking_root

if TYPE_CHECKING:  # imported where used: the cheap stages start without them
    import torch

PENDING_DIR = ".mlflow-pending"
WAIT_VAR = "JEM_TRACKING_WAIT"
WAIT_DEFAULT_S = 120.0
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}  # MLflow's: 7 retries, factor 2, 120 s (minutes a call)
PROBE_GAPS = (5.0, 60.0)  # seconds between two asks while the server is away: the first, doubling up to the last
HEALTH_TIMEOUT = 3


def wait_seconds() -> float:
    """How long the model and the run's end wait for a tracking server that does not answer."""
    try:
        return max(0.0, float(os.environ.get(WAIT_VAR, WAIT_DEFAULT_S)))
    except ValueError:
        raise TrackingError(f"{WAIT_VAR} = {os.environ[WAIT_VAR]!r}: not a number of seconds; set it to e.g. "
                            f"{WAIT_DEFAULT_S:.0f} or unset it") from None


@contextlib.contextmanager
def environment(values: dict[str, str], override: bool = False) -> Iterator[None]:
    """``values`` in the environment (where unset, or all with ``override``), put back on the way out."""
    before = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if override or not os.environ.get(key):
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in before.items():
            restore_env(key, value)


def server_away(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server did not answer (no connection, a timeout, an HTTP 5xx
    after MLflow's retries), not that it refused the call."""
    import requests

    for e in causes(exc):
        if isinstance(e, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        response = getattr(e, "response", None)
        if isinstance(e, requests.HTTPError) and response is not None and response.status_code >= 500:
            return True
        message = str(getattr(e, "message", ""))  # MLflow's words for a request that got no answer
        if message.startswith("API request to ") and (" failed with exception " in message
                                                      or " failed with timeout exception " in message):
            return True
    return False


def reason(exc: BaseException) -> str:
    """What ``exc`` says went wrong, in one line: its innermost cause."""
    return " ".join(str(causes(exc)[-1]).split()) or type(exc).__name__


def answers(uri: str) -> bool:
    """Whether the tracking server at ``uri`` answers its health check now (one request, no retries)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, backoff_factor=0,
                                backoff_jitter=0, timeout=HEALTH_TIMEOUT, raise_on_status=False)
        return response.status_code == 200
    except Exception:
        return False


class PendingCalls:
    """The calls to run ``run_id`` that its tracking server ``uri`` did not take, oldest first: one JSON
    line each in ``<folder>/<run_id>.jsonl`` after a first line naming the server and the run, the files
    they log kept in ``<folder>/<run_id>/<n>/``, and a ``{"done": n}`` line for each one sent since, so
    that a replay cut short sends no call twice. Each line is written and flushed as it comes: what a
    killed stage leaves is whole but its last line. The process that writes or replays a journal holds
    ``<run_id>.lock`` meanwhile (released by the system when it dies)."""

    def __init__(self, folder: Path, run_id: str, uri: str) -> None:
        self.folder, self.run_id, self.uri = folder, run_id, uri
        self.path = folder / f"{run_id}.jsonl"
        self.files = folder / run_id
        self.ended = False  # the journal holds the run's end
        self._waiting: list[dict[str, Any]] = []
        self._count = 0
        self._lock: Any = None

    @classmethod
    def load(cls, path: Path) -> PendingCalls:
        lines = path.read_text().splitlines()
        head = json.loads(lines[0])
        calls = cls(path.parent, str(head["run_id"]), str(head["tracking_uri"]))
        records, done = [], set()
        for line in lines[1:]:
            with contextlib.suppress(ValueError):  # the line a killed stage was writing
                record = json.loads(line)
                if "done" in record:
                    done.add(record["done"])
                else:
                    records.append(record)
        calls._waiting = [r for r in records if r["n"] not in done]
        calls._count = max((r["n"] for r in records), default=-1) + 1
        calls.ended = any(r["op"] == "end" and r.get("run_id", calls.run_id) == calls.run_id for r in records)
        return calls

    def __len__(self) -> int:
        return len(self._waiting)

    def waiting(self) -> list[dict[str, Any]]:
        return list(self._waiting)

    def claim(self) -> bool:
        """Hold the journal's lock; False where another process holds it (its stage still runs)."""
        from filelock import FileLock, Timeout

        if self._lock is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.folder / f"{self.run_id}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                return False
            self._lock = lock
        return True

    def add(self, entry: dict[str, Any] | Callable[[Path], dict[str, Any]]) -> None:
        """Keep a call: ``entry``, or what ``entry(folder)`` returns, given a folder of its own for the
        files it logs."""
        self.claim()
        n = self._count
        record = {"n": n, **(entry if isinstance(entry, dict) else entry(self.files / str(n)))}
        with open(self.path, "a") as fh:
            if fh.tell() == 0:
                fh.write(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n")
            fh.write(json.dumps(record) + "\n")
        self._count += 1
        self._waiting.append(record)
        self.ended = self.ended or (record["op"] == "end" and record.get("run_id", self.run_id) == self.run_id)

    def sent(self, record: dict[str, Any]) -> None:
        """``record`` reached the server (or was refused): never sent again; the last one removes the journal."""
        self._waiting.remove(record)
        if not self._waiting:
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.files, ignore_errors=True)
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"done": record["n"]}) + "\n")

    def release(self) -> None:
        if self._lock is None:
            return
        if not self._waiting:  # all sent (or a journal with nothing in it)
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.files, ignore_errors=True)
        self._lock.release()
        self._lock = None
        if not self.path.exists():  # nothing left: no lock file either, nor the folder when it is empty
            Path(self.folder / f"{self.run_id}.lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def apply_call(client: Any, run_id: str, record: dict[str, Any]) -> None:
    """Send one call of a journal (or one being made) to the server of ``client``."""
    run_id = record.get("run_id", run_id)
    op = record["op"]
    if op == "batch":
        from mlflow.entities import Metric, Param, RunTag

        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in record.get("metrics", [])],
                         params=[Param(k, v) for k, v in record.get("params", [])],
                         tags=[RunTag(k, v) for k, v in record.get("tags", [])])
    elif op == "artifact":
        path = Path(record["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif op == "dataset":
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        tags = [InputTag(MLFLOW_DATASET_CONTEXT, record["context"])]
        client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**record["dataset"]), tags=tags)])
    elif op == "model":
        _log_saved_model(run_id, Path(record["path"]))
    elif op == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown call {op!r}")


def send_waiting(client: Any, calls: PendingCalls) -> bool:
    """Send the calls that wait, oldest first; whether all went (False: the server stopped answering).
    A call the server refuses (or whose kept file is gone) is reported in one line and not sent again."""
    for record in calls.waiting():
        try:
            apply_call(client, calls.run_id, record)
        except Exception as exc:
            if server_away(exc):
                return False
            say(f"{calls.path}: call {record['n']} ({record['op']}) of run {calls.run_id} was refused by "
                f"{calls.uri} ({reason(exc)}); dropped")
        calls.sent(record)
    return True


def log_model(run_id: str, model: torch.nn.Module, x: torch.Tensor) -> None:
    """``model`` logged to run ``run_id`` (see ``StageRun.log_model``), its signature from the batch ``x``."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        logits = model(x)
    mlflow.pytorch.log_model(model, name="model", signature=infer_signature(x.numpy(), logits.numpy()),
                             input_example=x.numpy(), serialization_format="pt2", run_id=run_id,
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def save_model(folder: Path, model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The model kept for a server that does not answer: saved as MLflow would log it, and its example."""
    import mlflow
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "example.npy", x.numpy())
    mlflow.pytorch.save_model(model, str(folder / "model"), input_example=x.numpy(), serialization_format="pt2",
                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return {"op": "model", "path": str(folder)}


def _log_saved_model(run_id: str, folder: Path) -> None:
    import mlflow
    import torch

    model = mlflow.pytorch.load_model(str(folder / "model"))
    log_model(run_id, model, torch.from_numpy(np.load(folder / "example.npy")))


def keep_artifact(path: Path, artifact_path: str | None) -> Callable[[Path], dict[str, Any]]:
    """How an artifact is kept for a server that does not answer (``PendingCalls.add``): a copy of ``path``."""
    def keep(folder: Path) -> dict[str, Any]:  # a copy: the stage's outputs may change before it is sent
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / path.name
        shutil.copytree(path, copy) if path.is_dir() else shutil.copy2(path, copy)
        return {"op": "artifact", "path": str(copy), "artifact_path": artifact_path}

    return keep


# ---- sent once the server answers ---------------------------------------------------------------
def replay_leftovers(root: Path, uri: str) -> None:
    """Calls kept by earlier stages for this server, sent now that it answered (never stops the stage)."""
    try:
        replay_pending(root, uri)
    except Exception as exc:
        say(f"the calls kept in {root / PENDING_DIR} were not all sent ({type(exc).__name__}: {exc}); "
            "python -m pipeline.journal --replay sends them")


def replay_pending(root: Path, uri: str | None = None, wait: float = 0.0) -> int:
    """Send the calls kept in ``<root>/.mlflow-pending`` (those for ``uri``; all, each to its own server,
    where None) whose stage no longer runs, waiting up to ``wait`` seconds for a server that does not
    answer; a run whose stage was killed before its end is ended KILLED. Returns how many calls still wait."""
    folder = root / PENDING_DIR
    left = 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        try:
            calls = PendingCalls.load(path)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            say(f"{path}: not a journal of MLflow calls ({type(exc).__name__}: {exc}); left as it is")
            continue
        if (uri is not None and calls.uri != uri) or not calls.claim():  # another server's; its stage still runs
            continue
        try:
            left += _replay_journal(calls, wait)
        finally:
            calls.release()
    return left


def _replay_journal(calls: PendingCalls, wait: float) -> int:
    import mlflow
    from mlflow.tracking import MlflowClient

    count, deadline = len(calls), time.monotonic() + wait
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with environment(HTTP_DEFAULTS if calls.uri.startswith(("http:", "https:")) else {}):
        mlflow.set_tracking_uri(calls.uri)  # where a kept model goes
        try:
            client = MlflowClient(tracking_uri=calls.uri)
            while not (answers(calls.uri) and send_waiting(client, calls)):
                if time.monotonic() >= deadline:
                    say(f"{calls.uri} does not answer: {len(calls)} calls of run {calls.run_id} still wait in "
                        f"{calls.path}")
                    return len(calls)
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            killed = False
            with contextlib.suppress(Exception):  # the run may be gone (deleted) meanwhile
                killed = not calls.ended and client.get_run(calls.run_id).info.status == "RUNNING"
                if killed:  # its stage died before its end
                    client.set_terminated(calls.run_id, status="KILLED")
        finally:
            restore_env("MLFLOW_TRACKING_URI", before)
    say(f"sent the {count} calls kept for run {calls.run_id} to {calls.uri}" + (" (ended KILLED)" if killed else ""))
    return 0


def cli(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.journal", description="Send the MLflow calls kept in "
                                 f"<repo>/{PENDING_DIR} while a tracking server did not answer.")
    ap.add_argument("--replay", action="store_true", required=True, help="send them")
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a server that does not answer")
    args = ap.parse_args(argv)
    quiet_mlflow()
    left = replay_pending(tracking_root(), wait=args.wait)
    if left:
        say(f"{left} calls still wait; run this again once their server answers")
    return 1 if left else 0


if __name__ == "__main__":
    raise SystemExit(cli())
