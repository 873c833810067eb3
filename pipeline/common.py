"""What every stage entry point shares: reading and checking ``params.yaml``, the device, one-line
errors.

The MLflow layer is ``pipeline.tracking`` and its start-up check of the tracking store
``pipeline.probe``; the files a stage writes (metrics, notes, atomic folders) are
``pipeline.outputs``; the trained weights the stages after ``train`` read are ``pipeline.weights``;
what ``dvc.yaml`` declares a stage reads is ``pipeline.declared``. Each stage's code dependencies in
``dvc.yaml`` are its import closure (tests/test_layout.py), so this module imports only what every
stage needs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from pipeline.forkserver import finish
from pipeline.probe import check_tracking
from pipeline.tracking import mark, warm_up

if TYPE_CHECKING:  # imported where a device is picked: the settings and fingerprint stages start without it
    import torch

PARAMS_FILE = Path("params.yaml")


class StageError(RuntimeError):
    """A problem the user can fix; printed as one line."""


def load_params(path: Path = PARAMS_FILE, tracking: bool = True) -> dict[str, Any]:
    """The params file, checked whole, and the tracking store checked. A stage that logs an MLflow run
    (``tracking``) is at its first line of work once this returns (``jem-bench --startup``), and MLflow
    loads in the background meanwhile (``pipeline.tracking.warm_up``)."""
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path} not found; run the stage from the repository root") from None
    except yaml.YAMLError as exc:
        at = getattr(exc, "problem_mark", None)
        where = f" line {at.line + 1}" if at is not None else ""
        raise StageError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(params, dict):
        raise StageError(f"{path}: expected a mapping at the top level")
    from jem.config.settings import validate_params

    validate_params(params)  # the whole file, before any stage touches its outputs
    check_tracking(params)  # a tracking server that does not answer stops the stage here, too
    if tracking:
        warm_up(params)
        mark("work")
    return params


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"run.device = {name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def setup_run(params: dict[str, Any]) -> torch.device:
    import torch

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
    mark("main")  # the entry point's imports are done (jem-bench --startup)
    from jem.config.errors import InputError  # DatasetUnavailable, ConfigError, TrackingError are ones

    codes: dict[type[BaseException], int] = {StageError: 2, InputError: 2,
                                             FileNotFoundError: 2, **(exit_codes or {})}
    try:
        fn()
    except tuple(codes) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = next(c for t, c in codes.items() if isinstance(exc, t))
        raise SystemExit(code) from None
    if getattr(fn, "__module__", None) == "__main__":  # this process is the stage's (python -m stages.<kind>)
        exit_done()


def exit_done() -> NoReturn:
    """End a stage process that finished its work, with status 0, without the interpreter's teardown.

    Everything a normal exit does for the stage's results still happens, in the same order: the
    threads that are not daemons are joined, the exit handlers run (MLflow's, logging's flush, the
    JEM_TIMING_LOG line) and the standard streams are flushed (``pipeline.forkserver.finish``). What is
    skipped is freeing every module's objects one by one, which with torch, MLflow and SQLAlchemy loaded
    takes 1-2 s of CPU per stage process on 2 cores: paid by each of the demo's 33 stages and by every
    stage process the test suite starts, for nothing a stage writes."""
    finish(0)
    raise AssertionError("unreachable: finish(0) ends the process")
