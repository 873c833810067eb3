"""DVC stage `robustness@<variant>`: accuracy under white-box PGD and BPDA+EOT attacks.

    python -m stages.robustness --model models/demo/sadajem_k5 --data data/demo \
        --metrics metrics/demo/robustness/sadajem_k5.json --plots plots/demo/robustness/sadajem_k5

On ``robustness.images`` test images (the reference code uses 1,000):

* foolbox PGD under L-inf (radii ``robustness.linf``, in 1/255) and L2 (``robustness.l2``, on
  [0, 1] images), ``robustness.steps`` steps, random start; step ``rel_stepsize`` x radius or
  fixed (``linf_step``, ``l2_step``); an image is broken when any iterate fools the model
  (``success: any_iterate``, the reference's accounting) or only the final one (``final``);
  ``shuffle`` takes a seeded random subset of the test set instead of the first images;
* for generative variants, BPDA+EOT against the sampler-purified classifier
  (``robustness.bpda``): noisy copies of the input are moved by ``purify_steps`` steps of
  the variant's sampler (overridden by ``bpda.sampler``), their logits averaged over
  ``chains``; gradients pass purification as the identity and are averaged over ``eot``
  draws. Softmax baselines have no energy model to purify with and are marked so.

Writes the accuracies to ``--metrics`` and ``curve.csv`` + ``curve.png`` to ``--plots``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jem.config.instances import instance_settings
from jem.config.variant import Variant
from jem.data.datasets import load_split
from jem.evaluation.robustness import bpda_eot_accuracy, pgd_accuracy, purification_sampler
from jem.report.figures import plot_robustness
from pipeline.common import load_params, main_guard, setup_run
from pipeline.declared import Inputs, check_settings
from pipeline.outputs import building, write_metrics
from pipeline.tracking import mlflow_run
from pipeline.weights import diverged, load_selected, run_of, skip_diverged, stage_run


def _radius_key(norm: str, eps: float) -> str:
    return f"{eps:g}/255" if norm == "linf" else f"{eps:g}"


Row = tuple[str, str, float, float]  # attack, norm, radius, accuracy: a line of curve.csv


def attacked_images(x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``robustness.images`` test images attacked: the first ones, or with ``shuffle`` a seeded subset."""
    n = min(int(cfg.get("images", 1000)), len(x))
    if cfg.get("shuffle"):  # the reference attacks the first batches of a shuffled test loader
        pick = torch.from_numpy(np.sort(np.random.default_rng(int(cfg.get("seed", 0))).permutation(len(x))[:n]))
        return x[pick], y[pick]
    return x[:n], y[:n]


def pgd(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any], success: str,
        batch: int, device: torch.device, metrics: dict[str, Any]) -> list[Row]:
    """PGD at every L-inf and L2 radius: the accuracies into ``metrics`` (``pgd_<norm>``), and the rows."""
    steps, rel = int(cfg["steps"]), cfg.get("rel_stepsize")
    fixed = {"linf": cfg.get("linf_step"), "l2": cfg.get("l2_step")}
    rows: list[Row] = []
    for norm in ("linf", "l2"):
        radii = [float(e) for e in cfg.get(norm, [])]
        if not radii:
            continue
        scaled = [e / 255 for e in radii] if norm == "linf" else radii
        step = fixed[norm] and (float(fixed[norm]) / 255 if norm == "linf" else float(fixed[norm]))
        acc = pgd_accuracy(model, x, y, norm, scaled, steps, rel, batch, device, abs_stepsize=step or None,
                           success=success)
        metrics[f"pgd_{norm}"] = {_radius_key(norm, e): a for e, a in zip(radii, acc, strict=True)}
        rows += [(f"PGD {norm}", norm, e, a) for e, a in zip(radii, acc, strict=True)]
        print(f"[robustness] {name} PGD {norm}: " + ", ".join(f"{e:g}: {a:.3f}" for e, a in
                                                              zip(radii, acc, strict=True)), flush=True)
    return rows


def bpda_eot(model: nn.Module, variant: Variant, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any], batch: int,
             device: torch.device) -> tuple[dict[str, Any], list[Row]]:
    """BPDA+EOT against the sampler-purified classifier (``robustness.bpda``): its metrics, and the rows;
    marked not run without radii, not applicable to a softmax baseline."""
    bpda = cfg.get("bpda") or {}
    if not bpda.get("epsilons"):
        return {"status": "not run", "reason": "robustness.bpda.epsilons is empty"}, []
    if not variant.uses_sampler:
        return {"status": "not applicable", "reason": "softmax baseline: no energy model to purify with"}, []
    norm = str(bpda.get("norm", "linf"))
    radii = [float(e) for e in bpda["epsilons"]]
    nb = min(int(bpda.get("images", len(x))), len(x))
    acc = bpda_eot_accuracy(model, purification_sampler(variant.sampler, bpda), x[:nb], y[:nb], norm,
                            [e / 255 for e in radii] if norm == "linf" else radii, int(bpda["steps"]),
                            eot=int(bpda.get("eot", 1)), chains=int(bpda.get("chains", 1)),
                            input_noise=float(bpda.get("input_noise", 0.0)),
                            rel_stepsize=bpda.get("rel_stepsize") or cfg.get("rel_stepsize"),
                            batch_size=int(bpda.get("batch_size") or batch), device=device)
    print(f"[robustness] {variant.name} BPDA+EOT {norm}: " + ", ".join(f"{e:g}: {a:.3f}" for e, a in
                                                                     zip(radii, acc, strict=True)))
    return ({"status": "ok", "norm": norm, "images": nb,
             **{_radius_key(norm, e): a for e, a in zip(radii, acc, strict=True)}},
            [(f"BPDA+EOT {norm}", norm, e, a) for e, a in zip(radii, acc, strict=True)])


def write_curves(plots: Path, rows: list[Row], name: str, title: str) -> None:
    """``curve.csv`` and ``curve.png``: accuracy against radius, one curve per attack."""
    with building(plots) as tmp:
        with open(tmp / "curve.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["attack", "norm", "radius", "accuracy"])
            writer.writerows(rows)
        curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        for attack, _, e, a in rows:
            r, accs = curves.setdefault(attack, {}).setdefault(name, ([], []))
            r.append(e)
            accs.append(a)
        plot_robustness(curves, tmp / "curve.png", title=title)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="prepared data folder of this scale")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    ap.add_argument("--inputs", type=Path, help="its input fingerprints (stages inputs_*): each file read is checked")
    args = ap.parse_args()

    params = load_params()
    device = setup_run(params)
    name, seed = run_of(args.model)
    cfg = check_settings(args.config, instance_settings(params, "robustness", name))
    inputs = Inputs(args.inputs)
    stopped = diverged(args.model)
    if stopped is not None:  # recovery off and the run diverged: nothing to attack
        skip_diverged("robustness", stopped, params, args.metrics, (args.plots,))
        return
    model, variant, select = load_selected(args.model, "robustness", str(cfg["select"]), device, params)
    role = variant.dataset
    test_split = load_split(inputs.need(args.data / role / "test.npz"))
    x, y = attacked_images(*(torch.from_numpy(a) for a in test_split), cfg)
    n = len(x)
    success = str(cfg.get("success", "any_iterate"))
    batch = int(cfg.get("batch_size", 250))
    torch.manual_seed(int(cfg.get("seed", 0)))

    tags = {"variant": variant.name, "seed": seed, "family": variant.family, "dataset": role}
    with mlflow_run(stage_run("robustness", name, seed), params, tags) as run:
        run.log_params({"robustness": cfg})
        run.log_dataset(args.data / role / "test.npz", "testing", *test_split)
        metrics: dict[str, Any] = {"variant": variant.name, "dataset": role, "weights": select, "images": n,
                                   "pgd_success": success}
        rows = pgd(model, variant.name, x, y, cfg, success, batch, device, metrics)
        metrics["bpda"], bpda_rows = bpda_eot(model, variant, x, y, cfg, batch, device)
        rows += bpda_rows
        write_curves(args.plots, rows, variant.name, f"{variant.name} ({role}, {n} test images)")
        write_metrics(args.metrics, metrics)
        run.log_metrics({f"{attack}/{e:g}".replace(" ", "_").replace("+", "_"): a for attack, _, e, a in rows})
        run.log_artifact(args.plots)


if __name__ == "__main__":
    main_guard(main)
