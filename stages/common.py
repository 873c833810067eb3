"""What every stage shares: params, the device, one-line errors, and the MLflow run.

MLflow keeps its runs in ``<repo>/mlflow.db`` (sqlite) and artifacts in ``<repo>/mlartifacts``.
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
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

PARAMS_FILE = Path("params.yaml")


class StageError(RuntimeError):
    """A problem the user can fix; printed as one line."""


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path} not found; run the stage from the repository root") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise StageError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(params, dict):
        raise StageError(f"{path}: expected a mapping at the top level")
    from jem.settings import validate_params

    validate_params(params)  # the whole file, before any stage touches its outputs
    return params


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"run.device = {name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def setup_run(params: dict[str, Any]) -> torch.device:
    run = params.get("run", {})
    if run.get("threads"):
        torch.set_num_threads(int(run["threads"]))
    if run.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return pick_device(str(run.get("device", "auto")))


def main_guard(fn: Callable[[], None], exit_codes: dict[type[BaseException], int] | None = None) -> None:
    """Run a stage; a user-fixable error becomes one line on stderr and exit status 2
    (``exit_codes`` adds other one-line failures with their own status)."""
    from jem.datasets import DatasetUnavailable
    from jem.errors import InputError

    codes: dict[type[BaseException], int] = {StageError: 2, InputError: 2, DatasetUnavailable: 2,
                                             FileNotFoundError: 2, **(exit_codes or {})}
    try:
        fn()
    except tuple(codes) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = next(c for t, c in codes.items() if isinstance(exc, t))
        raise SystemExit(code) from None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ---- MLflow -------------------------------------------------------------------------------
def tracking_root() -> Path:
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class StageRun:
    """One MLflow run per DVC stage instance, written through the client API (batched)."""

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


@contextlib.contextmanager
def mlflow_run(stage: str, params: dict[str, Any], tags: dict[str, Any],
               main: bool = True) -> Iterator[StageRun | NullRun]:
    """Start the MLflow run named after the DVC stage (e.g. ``train@sadajem_k5``).

    ``main=False`` (the other ranks of a data-parallel stage) logs nothing."""
    if not main:
        yield NullRun()
        return
    import logging

    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    for noisy in ("mlflow", "alembic"):  # schema set-up chatter on every first run
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = tracking_root()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    scale = str(params.get("scale", "demo"))
    name = f"jem-{scale}"
    with FileLock(str(root / ".mlflow.lock")):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         client.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri()))
    kind = stage.split("@")[0]
    all_tags = {"dvc_stage": stage, "stage": kind, "scale": scale, "git_commit": _git_commit(),
                "dvc_exp": os.environ.get("DVC_EXP_NAME", "workspace"), **tags}
    run = client.create_run(experiment_id, run_name=stage, tags={k: str(v) for k, v in all_tags.items()})
    handle = StageRun(client, run.info.run_id)
    try:
        yield handle
    except BaseException as exc:
        with contextlib.suppress(Exception):
            handle.set_tags({"error": f"{type(exc).__name__}: {exc}"[:500]})
            client.set_terminated(run.info.run_id, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


# ---- shared by the stages that read a trained variant ------------------------------------------
def load_selected(model_dir: Path, section: str, select: str, device: torch.device) -> tuple[Any, Any, str]:
    """The weights a stage asked for (``<section>.select``: ``last`` or ``best_val``), in eval mode.

    Returns (model, variant, select).
    """
    from jem.config import Variant
    from jem.models import load_model

    if select not in ("last", "best_val"):
        raise StageError(f"{section}.select = {select!r}: expected 'last' or 'best_val'")
    weights = model_dir / ("final.pt" if select == "last" else "best_val.pt")
    if not weights.exists():
        hint = "; best_val needs a validation split (datasets.<role>.<scale>.val > 0)" if select == "best_val" else ""
        raise StageError(f"{weights} not found ({section}.select = {select}){hint}; run dvc repro train")
    model, payload = load_model(weights, device)
    return model, Variant.from_dict(payload["variant"], where=f"{weights}:variant"), select


def swap_in(tmp: Path, out: Path) -> None:
    """Replace the folder ``out`` by the finished folder ``tmp`` (nothing partial is ever left at ``out``)."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; swapped in for ``out`` only on success."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
