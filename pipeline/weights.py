"""The trained weights the stages after ``train`` read (sample, evaluate, robustness) and the memory
layout they run in (also fid's Inception network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from jem.config.params import split_run
from jem.runtime.files import read_json
from pipeline.common import StageError
from pipeline.outputs import building, write_json, write_metrics
from pipeline.tracking import mlflow_run


def run_of(model_dir: Path) -> tuple[str, int | None]:
    """The variant and seed of ``models/<scale>/<variant>/seed<seed>`` (seed None: a folder named
    after the variant alone, as a stage run by hand may give)."""
    variant, seed = split_run(f"{model_dir.parent.name}/{model_dir.name}")
    return (variant, seed) if seed is not None else (model_dir.name, None)


def stage_run(kind: str, variant: str, seed: int | None) -> str:
    """The DVC stage (and MLflow run) name of one run: ``<kind>@<variant>-<seed>`` (dvc.yaml's matrix)."""
    return f"{kind}@{variant}" if seed is None else f"{kind}@{variant}-{seed}"


def diverged(model_dir: Path) -> dict[str, Any] | None:
    """What ``train`` recorded when the run stopped at a divergence with recovery off (else None)."""
    path = model_dir / "diverged.json"
    return read_json(path, "its train stage") if path.exists() else None


def diverged_line(info: dict[str, Any]) -> str:
    return (f"diverged at epoch {info['epoch']} (iteration {info['step']}: {info['reason']}; "
            "recovery.enabled is false)")


def skip_diverged(kind: str, info: dict[str, Any], params: dict[str, Any], metrics: Path | None = None,
                  folders: tuple[Path, ...] = ()) -> None:
    """A stage after ``train`` of a run that diverged: its outputs say so instead of holding numbers,
    and the pipeline goes on (the report marks the run "diverged at epoch e")."""
    name, seed = str(info["variant"]), info.get("seed")
    line = diverged_line(info)
    with mlflow_run(stage_run(kind, name, seed), params, {"variant": name, "seed": seed, "status": "diverged"}) as run:
        for folder in folders:
            with building(folder) as tmp:
                (tmp / "DIVERGED.md").write_text(f"# Not computed\n\n{name}, seed {seed}: {line}.\n")
                write_json(tmp / "info.json", {"variant": name, "seed": seed, "diverged": info})
        if metrics is not None:
            write_metrics(metrics, {"variant": name, "seed": seed, "status": "diverged",
                                    "diverged_at_epoch": info["epoch"], "diverged_at_step": info["step"],
                                    "reason": info["reason"]})
        run.set_tags({"diverged": line})
    print(f"[{kind}] {name} seed {seed}: {line}; nothing to compute")


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
    name, seed = run_of(model_dir)
    if payload["variant"].get("name") != name:
        raise StageError(f"{weights} holds variant {payload['variant'].get('name')!r}, not {name!r}: "
                         "a stage reads the weights of models/<scale>/<variant>/seed<seed>")
    if seed is not None and payload["variant"].get("train", {}).get("seed") != seed:
        raise StageError(f"{weights} was trained with seed {payload['variant'].get('train', {}).get('seed')}, "
                         f"not {seed}: its folder is {model_dir}")
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
