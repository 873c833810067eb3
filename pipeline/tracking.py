"""The MLflow layer of the stages: where they log (the tracking URI), the experiment, one run per
stage instance nested under its variant's parent run, its tags, params, metrics, datasets, model and
artifacts; and each stage process's start-up timing marks.

MLflow keeps its runs in ``<repo>/mlflow.db`` (sqlite) and artifacts in ``<repo>/mlartifacts``,
addressed as ``mlflow-artifacts:/`` URIs that ``mlflow ui`` serves from its ``./mlartifacts``.
The repository is ``DVC_ROOT`` (or the working directory), mapped back to the original
checkout when DVC runs the stage inside a temporary experiment executor
(``<repo>/.dvc/tmp/exps/...``), so ``dvc exp run --temp`` and ``--queue`` log to the same
place as ``dvc repro`` (``pipeline.store``). The schema and the experiment are created under a file
lock before the run starts, so parallel queue workers do not race on the first migration.

Before any work a stage checks the store (``pipeline.probe.check_tracking``): a server must answer and
take this user's credentials; an ``mlflow.db`` must be an SQLite database that is not cut short; a
``file:`` store needs ``MLFLOW_ALLOW_FILE_STORE=true``, as MLflow 3 does. A server that goes away later,
mid-run, does not stop the stage: what the run logs meanwhile waits in ``<repo>/.mlflow-pending/`` and is
sent once the server is back (``pipeline.journal``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import journal
from pipeline.forkserver import process_age
from pipeline.probe import damaged, sqlite_damage
from pipeline.store import TrackingError, quiet_mlflow, restore_env, say, tracking_root, tracking_uri

if TYPE_CHECKING:  # imported where used: the cheap stages start without them
    import torch


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ---- start-up ------------------------------------------------------------------------------
# A stage process's time from its start (interpreter, imports) to "main" (the entry point's function
# is called), to "work" (params.yaml read and checked, the tracking store answered: what follows is
# the stage's own work, while MLflow loads in the background), to "run" (its MLflow run is open), and
# its whole life ("exit"). Every run logs its start-up ("work") as the metric ``startup_seconds``;
# with JEM_TIMING_LOG=<file> each process also appends one JSON line of them all at exit, which
# ``jem-bench --startup`` tabulates per stage.
TIMING_LOG = "JEM_TIMING_LOG"
_timing: dict[str, Any] = {}


def process_seconds() -> float | None:
    """Seconds since this process started (``pipeline.forkserver.process_age``: for a stage run in a fork
    of the server, since the process DVC started); None where the system does not say."""
    seconds = process_age()
    if seconds is not None:
        return seconds
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:
        return None


def mark(event: str, stage: str | None = None) -> float | None:
    """Record that this process reached ``event`` ("main", "work" or "run") now; returns its seconds
    since the process started. The first mark registers the JEM_TIMING_LOG line written at exit."""
    seconds = process_seconds()
    if stage:
        _timing["stage"] = stage
    _timing.setdefault(f"{event}_s", seconds)
    if os.environ.get(TIMING_LOG) and not _timing.get("registered"):
        import atexit

        _timing["registered"] = True
        atexit.register(_write_timing)
    return seconds


def _write_timing() -> None:
    path = os.environ.get(TIMING_LOG)
    if not path:
        return
    import sys

    record = {"stage": _timing.get("stage") or Path(sys.argv[0]).stem, "kind": Path(sys.argv[0]).stem,
              "main_s": _timing.get("main_s"), "work_s": _timing.get("work_s", _timing.get("main_s")),
              "run_s": _timing.get("run_s"), "exit_s": process_seconds(), "pid": os.getpid()}
    with contextlib.suppress(OSError), open(path, "a") as fh:  # one short line: appends do not interleave
        fh.write(json.dumps(record) + "\n")


# ---- MLflow -------------------------------------------------------------------------------
_warming: threading.Thread | None = None


def warm_up(params: dict[str, Any]) -> None:
    """Import MLflow and open the tracking store (for mlflow.db: its engine and schema check, under
    the tracking lock) in a background thread, about two seconds of mostly single-threaded Python that
    the stage's own first work (reading data, building models: much of it outside the GIL) runs
    beside; ``mlflow_run`` waits for it. Any failure is left to ``mlflow_run``, which reports it in
    one line where the run opens. Not a daemon: the process exits after it, never in the middle of
    an import."""
    global _warming
    if _warming is not None:
        return
    root = tracking_root()
    uri, _ = tracking_uri(root, params)
    name = f"jem-{params.get('scale', 'demo')}"

    def load() -> None:
        try:
            from filelock import FileLock
            from mlflow.tracking import MlflowClient

            quiet_mlflow()  # mlflow's import sets its own logger to INFO
            if uri.startswith("sqlite:"):  # a server's client is cheap; a database's store is not
                with FileLock(str(root / ".mlflow.lock")):
                    MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
        except Exception:
            pass

    _warming = threading.Thread(target=load, name="mlflow-warm-up")
    _warming.start()


# The experiment opens in the MLflow UI's runs table ("Model training"), not the GenAI view.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Stages that run long enough for CPU/GPU/memory curves (MLflow's system metrics, via psutil
# and, for GPUs, pynvml): recorded when those packages are importable.
SYSTEM_METRICS_STAGES = frozenset({"train", "sample", "evaluate", "fid", "fid_ref", "robustness"})
# Stages of no single variant, grouped under one parent run per experiment.
DATA_STAGES = frozenset({"prepare", "gmm", "fid_ref"})


def artifact_location(experiment: str) -> str:
    """Artifacts go through the tracking server's proxy (``mlflow-artifacts:/``), which ``mlflow ui``
    / ``mlflow server`` resolve against their ``--artifacts-destination`` (default
    ``./mlartifacts``): nothing absolute is stored, so a moved or re-cloned repository keeps them."""
    return f"mlflow-artifacts:/{experiment}"


def _serve_proxied_artifacts_locally(root: Path) -> None:
    """Without a server in between, write ``mlflow-artifacts:/<path>`` to ``<root>/mlartifacts/<path>``:
    the file the server serves for that URI when started in ``root`` (its default destination).

    MLflow has no public call to register an artifact repository for a scheme in-process (only the
    ``mlflow.artifact_repository`` entry point of an installed package, which would apply to every
    MLflow process of the environment, ``mlflow server`` included), so this uses its private registry,
    here only; tests/test_tracking_probe.py fails by name when an MLflow upgrade moves it."""
    from urllib.parse import urlparse

    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    destination = root / "mlartifacts"

    def local(uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> Any:
        if (tracking_uri or mlflow.get_tracking_uri()).startswith(("http:", "https:")):  # a real server
            return MlflowArtifactsRepository(uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
        return LocalArtifactRepository(str(destination / urlparse(uri).path.lstrip("/")))

    _artifact_repository_registry.register("mlflow-artifacts", local)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _source_tags(kind: str) -> dict[str, str]:
    """MLflow's standard source tags: the entry point (repository-relative, so it reads the same in
    every clone) and its type. ``mlflow.source.git.commit`` (and ``.branch``) is MLflow's own: its git
    context reads them from the repository of the entry point's file (``sys.argv[0]``, a stage's
    ``stages/<kind>.py``), the checkout or DVC's temporary executor; our ``git_commit`` adds ``-dirty``."""
    from mlflow.entities import SourceType

    return {"mlflow.source.name": f"stages/{kind}.py", "mlflow.source.type": SourceType.to_string(SourceType.LOCAL)}


def _parent_run(client: Any, experiment_id: str, group: str, scale: str, dvc_exp: str) -> str:
    """The parent run of ``group`` (a variant, or ``datasets``) in this DVC experiment: found by tag,
    else created (the caller holds the tracking lock). Finished at once: it only groups."""
    query = f"tags.jem_group = '{group}' and tags.dvc_exp = '{dvc_exp}'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    note = (f"All stage runs of variant `{group}`" if group != "datasets" else
            "The dataset stages (prepare, gmm, fid_ref)") + f" in DVC experiment `{dvc_exp}`, scale `{scale}`."
    run = client.create_run(experiment_id, run_name=group, tags={
        "jem_group": group, "dvc_exp": dvc_exp, "scale": scale, "mlflow.note.content": note})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def _dataset_name(path: Path) -> str:
    """``data/demo/cifar10/train.npz`` -> ``cifar10/train`` (role and split)."""
    return f"{path.parent.name}/{path.stem}"


class StageRun:
    """One MLflow run per DVC stage instance, written through the client API (batched); it is also
    the process's active run (MLflow's system metrics). With a tracking server, ``pending`` is the run's
    journal: a call the server does not answer is kept there and the stage goes on (see ``pipeline.journal``)."""

    def __init__(self, client: Any, run_id: str, pending: journal.PendingCalls | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.pending = pending
        self.parent: str | None = None  # the run this one is nested under
        self._next_ask = 0.0
        self._gap = journal.PROBE_GAPS[0]
        self._deadline: float | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        flat = [[k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)] for k, v in flatten(params).items()]
        self._send({"op": "batch", "params": flat})  # MLflow splits it into requests the store accepts

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [[k, float(v), now, int(step)] for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self._send({"op": "batch", "metrics": batch})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._send({"op": "batch", "tags": [[k, str(v)] for k, v in tags.items()]})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.exists():
            self._send({"op": "artifact", "path": str(path), "artifact_path": artifact_path},
                       keep=journal.keep_artifact(path, artifact_path))

    def log_dataset(self, path: Path, context: str, images: Any, labels: Any) -> None:
        """A prepared split (``path``, an ``.npz`` the stage read as ``images`` and ``labels``) as an
        MLflow dataset input of this run: named ``<role>/<split>``, its source the repository-relative
        path, MLflow's digest of the arrays and their shape (rows) in the profile."""
        import mlflow
        from mlflow.data.sources import LocalArtifactDatasetSource

        images, labels = np.asarray(images), np.asarray(labels)
        source = LocalArtifactDatasetSource(str(path))
        dataset = mlflow.data.from_numpy(images, source=source, targets=labels, name=_dataset_name(path))
        self._send({"op": "dataset", "dataset": dataset.to_dict(), "context": context})

    def log_model(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        """A trained network (eval mode, on the CPU) as an MLflow PyTorch model named ``model`` (under
        the run's Logged models), with the signature of the input batch ``x`` -> logits, saved as an
        exported graph (MLflow's safe ``pt2`` format, no pickled code), so ``mlflow.pytorch.load_model``
        needs no checkout. A server that does not answer is waited for (JEM_TRACKING_WAIT), then the
        model is kept, saved, in the journal."""
        self._send({"op": "model"}, call=lambda: journal.log_model(self.run_id, model, x),
                   keep=lambda folder: journal.save_model(folder, model, x), wait=True)

    def finish(self, status: str = "FINISHED", wait: bool = True) -> None:
        """End the run (and the process's active run) with ``status``; a server that does not answer is
        waited for (``wait``) up to JEM_TRACKING_WAIT, then the end is kept with what else waits."""
        import mlflow

        if self.pending is None:
            mlflow.end_run(status=status)
            return

        def active() -> bool:
            run = mlflow.active_run()
            return run is not None and run.info.run_id == self.run_id

        end = {"op": "end", "status": status, "end_time": int(time.time() * 1000)}
        self._send(end, call=(lambda: mlflow.end_run(status=status)) if active() else None, wait=wait)
        if active():  # its end kept: no longer the active run all the same (MLflow's one request fails at once)
            quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(journal.HEALTH_TIMEOUT)}
            with journal.environment(quick, override=True), contextlib.suppress(Exception):
                mlflow.end_run(status=status)

    def end_parent(self, parent: str) -> None:
        """The parent's end time follows its last child (kept, too, while the server does not answer)."""
        with contextlib.suppress(Exception):
            self._send({"op": "end", "run_id": parent, "status": "FINISHED", "end_time": int(time.time() * 1000)})

    def close(self) -> None:
        """Say what still waits for the server, and how it will be sent; let go of the journal."""
        if self.pending is None:
            return
        if len(self.pending):
            say(f"{self.pending.uri} still does not answer: {len(self.pending)} calls of run {self.run_id} wait in "
                f"{self.pending.path} (the stage's outputs are complete); the next stage that logs there sends "
                "them, or now: python -m pipeline.journal --replay")
        self.pending.release()

    def _send(self, entry: dict[str, Any], call: Callable[[], Any] | None = None,
              keep: Callable[[Path], dict[str, Any]] | None = None, wait: bool = False) -> None:
        """Make one call (``call``, else ``entry`` sent as it is); with a server that does not answer, keep
        it (``keep(folder)``: the entry with its own copy of what it logs) and go on. ``wait``: first
        wait for the server, up to JEM_TRACKING_WAIT seconds from the first wait of the stage."""
        send = call or (lambda: journal.apply_call(self.client, self.run_id, entry))
        if self.pending is None:
            send()
            return
        if len(self.pending) and not self._catch_up(wait):
            self.pending.add(keep or entry)
            return
        try:
            send()
            return
        except Exception as exc:
            if not journal.server_away(exc):
                raise
            self._gone(exc)
        self.pending.add(keep or entry)
        if wait:
            self._catch_up(wait)

    def _gone(self, exc: BaseException) -> None:
        import logging

        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)  # its samples meanwhile are lost
        self._next_ask, self._gap = time.monotonic() + journal.PROBE_GAPS[0], journal.PROBE_GAPS[0]
        say(f"{self.pending.uri} does not answer ({journal.reason(exc)}); the stage goes on, and what its run "
            f"logs waits in {self.pending.path} until the server is back")

    def _catch_up(self, wait: bool) -> bool:
        """Send what waits if the server answers (asked at most every few seconds; ``wait``: until the
        stage's deadline); whether nothing waits any more."""
        if not wait:
            if time.monotonic() < self._next_ask:
                return False
            if self._replay():
                return True
            self._next_ask, self._gap = time.monotonic() + self._gap, min(2 * self._gap, journal.PROBE_GAPS[1])
            return False
        if self._deadline is None:
            self._deadline = time.monotonic() + journal.wait_seconds()
            say(f"waiting up to {journal.wait_seconds():.0f} s ({journal.WAIT_VAR}) for {self.pending.uri} to send "
                f"{len(self.pending)} calls")
        while not self._replay():
            if time.monotonic() >= self._deadline:
                return False
            time.sleep(min(2.0, max(0.0, self._deadline - time.monotonic())))
        return True

    def _replay(self) -> bool:
        count = len(self.pending)
        if not (journal.answers(self.pending.uri) and journal.send_waiting(self.client, self.pending)):
            return False
        say(f"{self.pending.uri} answers again: the {count} calls that waited are sent to run {self.run_id}")
        return True


class NullRun:
    """What a non-main rank of a data-parallel stage logs to: nothing (rank 0 logs the run)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, path: Path, context: str, images: Any, labels: Any) -> None:
        pass

    def log_model(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        pass


def _system_metrics_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


@contextlib.contextmanager
def mlflow_run(stage: str, params: dict[str, Any], tags: dict[str, Any],
               main: bool = True) -> Iterator[StageRun | NullRun]:
    """Start the MLflow run named after the DVC stage (e.g. ``train@sadajem_k5``), nested under its
    variant's parent run (``datasets`` for prepare/gmm/fid_ref; the report stands alone).

    With a tracking server, MLflow's retries are bounded (``journal.HTTP_DEFAULTS``, where unset), calls kept from
    earlier stages are sent first, and what the server does not take meanwhile waits in the run's
    journal (``journal.PENDING_DIR``); a run that fails or is interrupted is still ended (FAILED or KILLED).
    ``main=False`` (the other ranks of a data-parallel stage) logs nothing."""
    if not main:
        yield NullRun()
        return
    if _warming is not None:
        _warming.join()
    import mlflow

    quiet_mlflow()
    root = tracking_root()
    uri, source = tracking_uri(root, params)
    remote = uri.startswith(("http:", "https:"))
    if uri.startswith("sqlite:"):
        _serve_proxied_artifacts_locally(root)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    handle: StageRun | None = None
    with journal.environment(journal.HTTP_DEFAULTS if remote else {}):
        mlflow.set_tracking_uri(uri)  # which also exports MLFLOW_TRACKING_URI: put it back afterwards
        try:
            handle = _open_run(stage, params, tags, root, uri, source, remote)
            try:
                yield handle
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    handle.set_tags({"error": f"{type(exc).__name__}: {exc}"[:500]})
                with contextlib.suppress(Exception):
                    handle.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", wait=False)
                raise
            handle.finish("FINISHED")
            if handle.parent is not None:
                handle.end_parent(handle.parent)
        finally:
            if handle is not None:
                handle.close()
            restore_env("MLFLOW_TRACKING_URI", env_before)


def _open_run(stage: str, params: dict[str, Any], tags: dict[str, Any], root: Path, uri: str, source: str,
              remote: bool) -> StageRun:
    """The experiment, the parent run and the stage's run opened (the active run), calls kept from
    earlier stages for this server sent; one line where the store is damaged or the server went away."""
    import mlflow
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    scale = str(params.get("scale", "demo"))
    name = f"jem-{scale}"
    kind = stage.split("@")[0]
    dvc_exp = os.environ.get("DVC_EXP_NAME", "workspace")
    group = str(tags["variant"]) if "variant" in tags else ("datasets" if kind in DATA_STAGES else None)
    try:
        with FileLock(str(root / ".mlflow.lock")):
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment(client, name)
            parent = _parent_run(client, experiment_id, group, scale, dvc_exp) if group else None
        if remote and (root / journal.PENDING_DIR).is_dir():
            journal.replay_leftovers(root, uri)
        commit = _git_commit()
        table_run = os.environ.get("JEM_TABLE_RUN")  # set by `python -m stages.table`: every run of one table run
        all_tags = {"dvc_stage": stage, "stage": kind, "scale": scale, "git_commit": commit, "dvc_exp": dvc_exp,
                    **({"table_run": table_run} if table_run else {}), **_source_tags(kind), **tags}
        active = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent,
                                  tags={k: str(v) for k, v in all_tags.items()},
                                  log_system_metrics=kind in SYSTEM_METRICS_STAGES and _system_metrics_available())
    except Exception as exc:
        if sqlite_damage(exc) is not None and uri.startswith("sqlite:///"):
            raise TrackingError(damaged(Path(uri[len("sqlite:///"):].split("?", 1)[0]), exc)) from None
        if remote and journal.server_away(exc):
            raise TrackingError(f"{source} = {uri}: the MLflow tracking server stopped answering as the run "
                                f"opened ({journal.reason(exc)}); nothing was logged: rerun the stage once the server "
                                "answers") from None
        raise
    run_id = active.info.run_id
    handle = StageRun(client, run_id, journal.PendingCalls(root / journal.PENDING_DIR, run_id, uri) if remote else None)
    handle.parent = parent
    mark("run", stage)
    startup = _timing.get("work_s")
    if startup is not None:
        handle.log_metrics({"startup_seconds": startup})
    return handle


def _experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created where missing (the caller holds the tracking lock)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(name), tags=EXPERIMENT_TAGS)
        except Exception:  # another machine created it first on a shared server
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tag existed
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id
