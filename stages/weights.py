"""The trained weights the stages after ``train`` read (sample, evaluate, robustness) and the memory
layout they run in (also fid's Inception network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stages.common import StageError


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
    if payload["variant"].get("name") != model_dir.name:
        raise StageError(f"{weights} holds variant {payload['variant'].get('name')!r}, not {model_dir.name!r}: "
                         "a stage reads the weights of models/<scale>/<variant>")
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
