"""The MLflow layer of the stages: where they log (the tracking URI, checked before any work), the
experiment, one run per stage instance nested under its variant's parent run, its tags, params,
metrics, datasets, model and artifacts.

MLflow keeps its runs in ``<repo>/mlflow.db`` (sqlite) and artifacts in ``<repo>/mlartifacts``,
addressed as ``mlflow-artifacts:/`` URIs that ``mlflow ui`` serves from its ``./mlartifacts``.
The repository is ``DVC_ROOT`` (or the working directory), mapped back to the original
checkout when DVC runs the stage inside a temporary experiment executor
(``<repo>/.dvc/tmp/exps/...``), so ``dvc exp run --temp`` and ``--queue`` log to the same
place as ``dvc repro``. The schema and the experiment are created under a file lock before
the run starts, so parallel queue workers do not race on the first migration.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jem.config.errors import InputError

if TYPE_CHECKING:  # imported where a model is logged: the cheap stages start without it
    import torch


class TrackingError(InputError):
    """The tracking store named by ``MLFLOW_TRACKING_URI`` or ``run.tracking_uri`` is not usable
    (not a tracking URI, or a server that does not answer); printed as one line."""


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
    """Seconds since this process started, by the operating system's record of its start (so the
    interpreter's own start-up and every import count); None where the system does not say."""
    try:
        with open("/proc/self/stat") as fh:  # Linux: start time in clock ticks after boot (field 22)
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        pass
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


def _quiet_mlflow() -> None:
    import logging

    for noisy in ("mlflow", "alembic"):  # schema set-up chatter on every first run
        logging.getLogger(noisy).setLevel(logging.WARNING)


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

            _quiet_mlflow()  # mlflow's import sets its own logger to INFO
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


def tracking_root() -> Path:
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(root: Path, params: dict[str, Any] | None = None) -> tuple[str, str]:
    """Where the stages log, and what said so: ``MLFLOW_TRACKING_URI`` from the environment, else
    ``run.tracking_uri`` from the params (e.g. a lab's ``http://mlflow.lab:5000``), else the
    repository's ``mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env, "MLFLOW_TRACKING_URI"
    configured = str(((params or {}).get("run") or {}).get("tracking_uri") or "").strip()
    if configured:
        return configured, "run.tracking_uri"
    return f"sqlite:///{root / 'mlflow.db'}", "default"


def check_tracking(params: dict[str, Any]) -> None:
    """Stop with one line when the tracking store is a server that does not answer (before any work)."""
    import urllib.error
    import urllib.request

    uri, source = tracking_uri(tracking_root(), params)
    scheme = uri.split(":", 1)[0]
    if scheme not in ("http", "https"):
        from jem.config.settings import TRACKING_SCHEMES

        if scheme not in TRACKING_SCHEMES:
            raise TrackingError(f"{source} = {uri!r}: not a tracking URI; expected http(s)://host:port of an "
                             "MLflow server, sqlite:///path, file:///path or a database URI")
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TrackingError(f"{source} = {uri}: the MLflow tracking server does not answer ({reason}); start it "
                         "(mlflow server --host 0.0.0.0 --port 5000 ...) or unset it to log to mlflow.db") from None
    check_credentials(uri, source)


def check_credentials(uri: str, source: str) -> None:
    """One authenticated read with MLflow's own variables (MLFLOW_TRACKING_USERNAME and _PASSWORD, or
    MLFLOW_TRACKING_TOKEN), so that a server behind authentication refusing them stops the stage in
    one line before it computes or writes anything."""
    import base64
    import urllib.error
    import urllib.request

    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN", "")
    headers = {}
    if user or password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        who = f"user {user!r} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
    elif token:
        headers["Authorization"] = f"Bearer {token}"
        who = "the token in MLFLOW_TRACKING_TOKEN"
    else:
        who = "no credentials"
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as exc:
        code = exc.code
    except (OSError, ValueError) as exc:
        raise TrackingError(f"{source} = {uri}: the MLflow tracking server does not answer its API "
                            f"({getattr(exc, 'reason', None) or exc})") from None
    if code == 401:
        raise TrackingError(f"{source} = {uri}: the server refused {who} (HTTP 401); set MLFLOW_TRACKING_USERNAME "
                            "and MLFLOW_TRACKING_PASSWORD to an account of its auth app") from None
    if code == 403:
        raise TrackingError(f"{source} = {uri}: the server knows {who} but does not let it read experiments "
                            "(HTTP 403); ask its admin for EDIT permission on the jem-<scale> experiments") from None
    raise TrackingError(f"{source} = {uri}: the server answered HTTP {code} to an experiments search; is it an "
                        "MLflow tracking server?") from None


def artifact_location(experiment: str) -> str:
    """Artifacts go through the tracking server's proxy (``mlflow-artifacts:/``), which ``mlflow ui``
    / ``mlflow server`` resolve against their ``--artifacts-destination`` (default
    ``./mlartifacts``): nothing absolute is stored, so a moved or re-cloned repository keeps them."""
    return f"mlflow-artifacts:/{experiment}"


def _serve_proxied_artifacts_locally(root: Path) -> None:
    """Without a server in between, write ``mlflow-artifacts:/<path>`` to ``<root>/mlartifacts/<path>``:
    the file the server serves for that URI when started in ``root`` (its default destination)."""
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


def _source_tags(kind: str, commit: str) -> dict[str, str]:
    """MLflow's standard source tags: the entry point (repository-relative, so it reads the same in
    every clone), its type, and the commit (without our ``-dirty`` mark, which ``git_commit`` keeps)."""
    from mlflow.entities import SourceType

    tags = {"mlflow.source.name": f"stages/{kind}.py", "mlflow.source.type": SourceType.to_string(SourceType.LOCAL)}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


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
    the process's active run, so MLflow's fluent calls (datasets, models) attach to it."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, path: Path, context: str, images: Any, labels: Any) -> None:
        """A prepared split (``path``, an ``.npz`` the stage read as ``images`` and ``labels``) as an
        MLflow dataset input of this run: named ``<role>/<split>``, its source the repository-relative
        path, MLflow's digest of the arrays and their shape (rows) in the profile."""
        import mlflow
        from mlflow.data.sources import LocalArtifactDatasetSource

        images, labels = np.asarray(images), np.asarray(labels)
        source = LocalArtifactDatasetSource(str(path))
        dataset = mlflow.data.from_numpy(images, source=source, targets=labels, name=_dataset_name(path))
        mlflow.log_input(dataset, context=context)

    def log_model(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        """A trained network (eval mode, on the CPU) as an MLflow PyTorch model named ``model`` (under
        the run's Logged models), with the signature of the input batch ``x`` -> logits, saved as an
        exported graph (MLflow's safe ``pt2`` format, no pickled code), so ``mlflow.pytorch.load_model``
        needs no checkout."""
        import mlflow
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            logits = model(x)
        mlflow.pytorch.log_model(model, name="model", signature=infer_signature(x.numpy(), logits.numpy()),
                                 input_example=x.numpy(), serialization_format="pt2",
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


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

    ``main=False`` (the other ranks of a data-parallel stage) logs nothing."""
    if not main:
        yield NullRun()
        return
    if _warming is not None:
        _warming.join()
    import mlflow
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    root = tracking_root()
    uri, _ = tracking_uri(root, params)
    if uri.startswith("sqlite:"):
        _serve_proxied_artifacts_locally(root)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # which also exports MLFLOW_TRACKING_URI: put it back afterwards
    scale = str(params.get("scale", "demo"))
    name = f"jem-{scale}"
    kind = stage.split("@")[0]
    dvc_exp = os.environ.get("DVC_EXP_NAME", "workspace")
    group = str(tags["variant"]) if "variant" in tags else ("datasets" if kind in DATA_STAGES else None)
    with FileLock(str(root / ".mlflow.lock")):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name, artifact_location=artifact_location(name),
                                                         tags=EXPERIMENT_TAGS)
            except Exception:  # another machine created it first on a shared server
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment is not None:
            experiment_id = experiment.experiment_id
        if experiment is not None and any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
            for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tag existed
                client.set_experiment_tag(experiment_id, key, value)
        parent = _parent_run(client, experiment_id, group, scale, dvc_exp) if group else None
    commit = _git_commit()
    table_run = os.environ.get("JEM_TABLE_RUN")  # set by `python -m stages.table`: every run of one table run
    all_tags = {"dvc_stage": stage, "stage": kind, "scale": scale, "git_commit": commit, "dvc_exp": dvc_exp,
                **({"table_run": table_run} if table_run else {}), **_source_tags(kind, commit), **tags}
    active = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent,
                              tags={k: str(v) for k, v in all_tags.items()},
                              log_system_metrics=kind in SYSTEM_METRICS_STAGES and _system_metrics_available())
    handle = StageRun(client, active.info.run_id)
    mark("run", stage)
    startup = _timing.get("work_s")
    if startup is not None:
        handle.log_metrics({"startup_seconds": startup})
    try:
        yield handle
    except BaseException as exc:
        with contextlib.suppress(Exception):
            handle.set_tags({"error": f"{type(exc).__name__}: {exc}"[:500]})
        with contextlib.suppress(Exception):
            mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        _restore_env("MLFLOW_TRACKING_URI", env_before)
        raise
    mlflow.end_run(status="FINISHED")
    if parent is not None:
        with contextlib.suppress(Exception):  # the parent's end time follows its last child
            client.set_terminated(parent, status="FINISHED")
    _restore_env("MLFLOW_TRACKING_URI", env_before)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
