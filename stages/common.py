"""What every stage entry point shares: reading and checking ``params.yaml``, the device, one-line
errors, and the trained weights a stage after ``train`` reads.

The MLflow layer is ``stages.tracking``; the files a stage writes (metrics, notes, atomic
folders) are ``stages.outputs``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from stages.tracking import check_tracking

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
    from jem.config.settings import validate_params

    validate_params(params)  # the whole file, before any stage touches its outputs
    check_tracking(params)  # a tracking server that does not answer stops the stage here, too
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
    from jem.config.errors import InputError
    from jem.data.datasets import DatasetUnavailable

    codes: dict[type[BaseException], int] = {StageError: 2, InputError: 2, DatasetUnavailable: 2,
                                             FileNotFoundError: 2, **(exit_codes or {})}
    try:
        fn()
    except tuple(codes) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = next(c for t, c in codes.items() if isinstance(exc, t))
        raise SystemExit(code) from None


# ---- shared by the stages that read a trained variant ------------------------------------------
def load_selected(model_dir: Path, section: str, select: str, device: torch.device,
                  params: dict[str, Any] | None = None) -> tuple[Any, Any, str]:
    """The weights a stage asked for (``<section>.select``: ``last`` or ``best_val``), in eval mode,
    in the memory layout of ``run.perf`` (channels_last: the same fp32 arithmetic, faster
    convolutions; ``params`` None: contiguous).

    Returns (model, variant, select).
    """
    from jem.config.variant import Variant
    from jem.method.models import load_model

    if select not in ("last", "best_val"):
        raise StageError(f"{section}.select = {select!r}: expected 'last' or 'best_val'")
    weights = model_dir / ("final.pt" if select == "last" else "best_val.pt")
    if not weights.exists():
        hint = "; best_val needs a validation split (datasets.<role>.<scale>.val > 0)" if select == "best_val" else ""
        raise StageError(f"{weights} not found ({section}.select = {select}){hint}; run dvc repro train")
    model, payload = load_model(weights, device)
    if params is not None and model_channels_last(params, device):
        model = model.to(memory_format=torch.channels_last)
    return model, Variant.from_dict(payload["variant"], where=f"{weights}:variant"), select


def model_channels_last(params: dict[str, Any], device: torch.device) -> bool:
    """``run.perf.channels_last`` (``auto``: on, on a CPU and a GPU) for the stages after training."""
    from jem.config.params import scale_name
    from jem.config.settings import section
    from jem.config.variant import resolve_perf

    perf, _ = resolve_perf(section(params, "run", scale_name(params)).perf, device)
    return perf.channels_last
