"""Where the stages' MLflow runs go, and what the MLflow modules share: the repository whose
``mlflow.db`` and ``mlartifacts`` they use (``tracking_root``), the tracking URI and the setting that
named it (``tracking_uri``), the one-line error of a tracking store that is not usable
(``TrackingError``), and small helpers (MLflow's loggers quieted, an exception's causes, the
``[tracking]`` lines, an environment variable put back).

Below the start-up check (``pipeline.probe``), the journal of calls kept for a server that does not
answer (``pipeline.journal``) and the MLflow layer the stages use (``pipeline.tracking``); it imports
none of them, nor MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jem.config.errors import InputError


class TrackingError(InputError):
    """The tracking store named by ``MLFLOW_TRACKING_URI`` or ``run.tracking_uri`` is not usable
    (not a tracking URI, or a server that does not answer); printed as one line."""


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


def quiet_mlflow() -> None:
    """MLflow's and alembic's loggers at WARNING (MLflow's import sets its own to INFO)."""
    import logging

    for noisy in ("mlflow", "alembic"):  # schema set-up chatter on every first run
        logging.getLogger(noisy).setLevel(logging.WARNING)


def say(message: str) -> None:
    """One line of the MLflow layer to the stage's output."""
    print(f"[tracking] {message}", flush=True)


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or while handling, outermost first."""
    chain = [exc]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    return chain


def restore_env(key: str, value: str | None) -> None:
    """Environment variable ``key`` set back to ``value`` (None: unset)."""
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
