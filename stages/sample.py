"""DVC stage `sample@<variant>`: draw samples from a trained variant.

    python -m stages.sample --model models/demo/sadajem_k5 --gmm gmm/demo --out samples/demo/sadajem_k5

Three sets, saved together in ``samples.npz`` (uint8 images, clamped to [-1, 1] first) and as
PNG grids: the final replay buffer (what the reference code scores for IS/FID), fresh chains
started from p0 and run for the variant's sampler steps, and class-conditional fresh chains
(one grid row per class).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from jem.config import Variant
from jem.gmm import load_mixture_stats
from jem.models import load_model
from jem.params import stage_section
from jem.samplers import sample
from jem.train import build_p0
from stages.common import StageError, load_params, main_guard, mlflow_run, setup_run, write_json
from stages.figures import save_grid


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def run_chains(model: torch.nn.Module, variant: Variant, p0, n: int, steps: int, device: torch.device,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` fresh chains from p0 in batches of the training p(x) batch size."""
    out = []
    batch = variant.train.px_batch_size
    for i in range(0, n, batch):
        y = labels[i:i + batch].to(device) if labels is not None else None
        x0, _ = p0.sample(min(batch, n - i), y=y, device=device)
        out.append(sample(model, x0.to(device), variant.sampler, y=y, steps=steps).cpu())
    return torch.cat(out) if out else torch.empty(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="trained variant folder")
    ap.add_argument("--gmm", type=Path, required=True, help="mixture statistics folder of this scale")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    params = load_params()
    device = setup_run(params)
    cfg = stage_section(params, "sample")
    select = cfg.get("select", "last")
    weights = args.model / ("final.pt" if select == "last" else "best_val.pt")
    if select not in ("last", "best_val"):
        raise StageError(f"sample.select = {select!r}: expected 'last' or 'best_val'")
    if not weights.exists():
        raise StageError(f"{weights} not found (sample.select = {select}); best_val needs a validation split")
    model, payload = load_model(weights, device)
    variant = Variant.from_dict(payload["variant"])
    role = variant.dataset
    tags = {"variant": variant.name, "family": variant.family, "dataset": role}
    if not variant.uses_sampler:  # the papers report no IS/FID for softmax baselines
        with mlflow_run(f"sample@{variant.name}", params, {**tags, "generative": False}):
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "info.json", {"variant": variant.name, "generative": False,
                                                "reason": "softmax baseline: trained without p(x), not sampled"})
        print(f"[sample] {variant.name}: softmax baseline, no samples (the papers report none)")
        return
    final = torch.load(args.model / "final.pt", map_location="cpu", weights_only=False)
    mixture = load_mixture_stats(args.gmm / role / "stats.pt") if variant.buffer.init == "gmm" else None
    p0 = build_p0(variant, (variant.model.in_channels, variant.model.image_size, variant.model.image_size),
                  mixture, device)
    steps = int(cfg.get("fresh_steps") or variant.sampler.steps)
    classes = variant.model.num_classes
    torch.manual_seed(variant.train.seed)

    with mlflow_run(f"sample@{variant.name}", params, tags) as run:
        run.log_params({"sample": cfg, "steps": steps})
        buffer = final["buffer"]["samples"]
        n_buffer = min(int(cfg["buffer"]), len(buffer))
        keep = torch.randperm(len(buffer))[:n_buffer]
        sets = {"buffer": to_uint8(buffer[keep])}
        sets["fresh"] = to_uint8(run_chains(model, variant, p0, int(cfg["fresh"]), steps, device))
        cond_labels = torch.arange(classes).repeat_interleave(int(cfg["per_class"]))
        sets["conditional"] = to_uint8(run_chains(model, variant, p0, len(cond_labels), steps, device, cond_labels))

        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
        try:
            np.savez(tmp / "samples.npz", conditional_labels=cond_labels.numpy(), **sets)
            grid = int(cfg.get("grid", 100))
            for key in ("buffer", "fresh"):
                save_grid(sets[key][:grid], tmp / f"{key}.png", nrow=int(np.ceil(np.sqrt(min(grid, len(sets[key]))))))
            save_grid(sets["conditional"], tmp / "conditional.png", nrow=int(cfg["per_class"]))
            write_json(tmp / "info.json", {"variant": variant.name, "generative": True, "weights": select,
                                           "steps": steps,
                                           "counts": {k: len(v) for k, v in sets.items()}})
            if args.out.exists():
                shutil.rmtree(args.out)
            tmp.rename(args.out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        for png in sorted(args.out.glob("*.png")):
            run.log_artifact(png, "samples")
        run.log_metrics({f"n_{k}": len(v) for k, v in sets.items()})
        print(f"[sample] {variant.name}: {', '.join(f'{k} {len(v)}' for k, v in sets.items())} -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
