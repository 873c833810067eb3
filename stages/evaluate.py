"""DVC stage `evaluate@<variant>`: test-set metrics of one trained variant.

    python -m stages.evaluate --model models/demo/sadajem_k5 --data data/demo \
        --metrics metrics/demo/eval/sadajem_k5.json --plots plots/demo/eval/sadajem_k5

* accuracy (test set, eval mode; Gaussian input noise of std ``evaluate.input_noise`` for the
  variant's family, 0 unless set: JEM's and JEM++'s scripts use 0.03, also on OOD inputs), and
  the same with the batch-norm running statistics re-estimated over the training split,
  prepared as training prepared its labelled batches (augmentation, input noise)
  (``accuracy_bn_reestimated``): the two agree when the running statistics describe labelled
  data;
* expected calibration error over ``evaluate.ece_bins`` equal bins, reliability diagram;
* OOD detection: AUROC of ``log p(x)``, ``max p(y|x)`` and ``-||d log p(x)/dx||`` between the
  test set and every set in ``evaluate.ood_sets`` (dataset roles; ``interp`` is the
  averaged-pairs set of the training data), with score histograms (``ood_<score>.csv``/``ood_histograms.png``);
* energy landscape: ``sum_x E(x)`` over ``evaluate.landscape.fraction`` of the training
  images along a filter-normalised random direction (``landscape.csv``/``.png``).

Plots (CSV + PNG) go to ``--plots``; the numbers to ``--metrics``, names and sources to the
``.notes.json`` beside it.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jem.config.instances import instance_settings
from jem.config.variant import Variant
from jem.data.datasets import load_split
from jem.evaluation.landscape import landscape
from jem.evaluation.metrics import (
    Calibration,
    accuracy,
    calibration,
    predict_logits,
    with_input_noise,
    with_reestimated_bn,
)
from jem.evaluation.ood import SCORES, auroc, ood_scores, ood_subset
from jem.report.figures import plot_landscape, plot_ood_histograms, plot_reliability
from jem.report.plot_data import write_ood_histograms
from jem.runtime.files import read_json
from pipeline.common import StageError, load_params, main_guard, setup_run
from pipeline.declared import Inputs, check_settings
from pipeline.outputs import building, write_metrics
from pipeline.tracking import mlflow_run
from pipeline.weights import diverged, load_selected, run_of, skip_diverged, stage_run


def ood_set(data: Path, role: str, train_role: str, limit: int | None, seed: int,
            inputs: Inputs | None = None) -> tuple[np.ndarray, str]:
    """Images of one OOD set and where they came from; ``interp`` is the training role's."""
    path = data / train_role / "interp.npz" if role == "interp" else data / role / "test.npz"
    if not path.exists():
        what = f"datasets.{train_role}.<scale>.interp" if role == "interp" else f"the prepare@{role} stage"
        raise StageError(f"OOD set {role!r}: {path} not found; it is made by {what}, or remove {role!r} "
                         "from evaluate.ood_sets")
    images, _ = load_split(inputs.need(path) if inputs is not None else path)
    return ood_subset(images, limit, seed), str(path)


def accuracies(model: nn.Module, variant: Variant, x_eval: torch.Tensor, y_test: torch.Tensor, train: Path,
               inputs: Inputs, batch: int, bins: int, seed: int, device: torch.device
               ) -> tuple[float, float, Calibration, np.ndarray]:
    """Accuracy and calibration on the test set, and the accuracy of the same weights with batch-norm
    statistics averaged over the training split (read here: the landscape's images too), each batch
    augmented and noised as the labelled batches of training: it agrees with "accuracy" when the
    running statistics describe labelled data."""
    logits = predict_logits(model, x_eval, batch_size=batch, device=device)
    cal = calibration(logits, y_test, n_bins=bins)
    x_train, _ = load_split(inputs.need(train))
    recalibrated = with_reestimated_bn(model, torch.from_numpy(x_train), batch, device, augment=variant.augment,
                                       input_noise=variant.objective.input_noise, seed=seed)
    acc_bn = accuracy(predict_logits(recalibrated, x_eval, batch_size=batch, device=device), y_test)
    del recalibrated
    return accuracy(logits, y_test), acc_bn, cal, x_train


def ood_detection(model: nn.Module, x_test: torch.Tensor, data: Path, role: str, ood_roles: list[str],
                  limit: int | None, noise: float, seed: int, batch: int, device: torch.device, inputs: Inputs
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """The three scores of (at most ``limit``) test images and of every OOD set; where each came from."""
    ood_test = ood_subset(x_test, limit, seed)
    scores = {"test": ood_scores(model, with_input_noise(ood_test, noise, seed), batch, device, progress=True,
                                 desc="ood test")}
    sources = {"test": str(data / role / "test.npz")}
    for ood in ood_roles:
        images, sources[ood] = ood_set(data, ood, role, limit, seed, inputs)
        scores[ood] = ood_scores(model, with_input_noise(torch.from_numpy(images), noise, seed + 1), batch, device,
                                 progress=True, desc=f"ood {ood}")
    return scores, sources


def write_plots(plots: Path, name: str, role: str, cal: Calibration, scores: dict[str, dict[str, np.ndarray]],
                ood: dict[str, dict[str, float]], alphas: np.ndarray, curve: np.ndarray, n_land: int) -> None:
    """The reliability diagram, the OOD score histograms and the energy landscape, CSV and PNG."""
    with building(plots) as tmp:
        with open(tmp / "reliability.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["bin_low", "bin_high", "confidence", "accuracy", "count"])
            for i, count in enumerate(cal.bin_count):
                writer.writerow([cal.bin_edges[i], cal.bin_edges[i + 1], cal.bin_confidence[i],
                                 cal.bin_accuracy[i], count])
        plot_reliability(asdict(cal), tmp / "reliability.png", title=f"{name} ({role})")
        write_ood_histograms(tmp, scores, SCORES)
        plot_ood_histograms(scores, ood, tmp / "ood_histograms.png", title=f"{name} ({role})")
        with open(tmp / "landscape.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["alpha", "energy_sum"])
            writer.writerows(zip(alphas.tolist(), curve.tolist(), strict=True))
        plot_landscape({name: (alphas, curve)}, tmp / "landscape.png", shared_y=True,
                       title=f"{name}: sum of E(x) over {n_land} training images")


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
    name, run_seed = run_of(args.model)
    cfg = check_settings(args.config, instance_settings(params, "evaluate", name))
    inputs = Inputs(args.inputs)
    stopped = diverged(args.model)
    if stopped is not None:  # recovery off and the run diverged: nothing to evaluate
        skip_diverged("evaluate", stopped, params, args.metrics, (args.plots,))
        return
    model, variant, select = load_selected(args.model, "evaluate", str(cfg["select"]), device, params)
    role = variant.dataset
    meta = read_json(inputs.need(args.data / role / "meta.json"))
    x_test, y_test = (torch.from_numpy(a) for a in load_split(inputs.need(args.data / role / "test.npz")))
    batch = int(cfg.get("batch_size", 500))
    limit = None if cfg.get("ood_max") is None else int(cfg["ood_max"])
    seed = int(cfg.get("seed", 0))
    ood_roles = list(cfg["ood_sets"])  # resolved: without the training role

    tags = {"variant": variant.name, "seed": run_seed, "family": variant.family, "dataset": role}
    with mlflow_run(stage_run("evaluate", name, run_seed), params, tags) as run:
        run.log_params({"evaluate": cfg})
        run.log_dataset(args.data / role / "test.npz", "testing", x_test.numpy(), y_test.numpy())
        noise = float(cfg["input_noise"])  # evaluate.input_noise of the variant's family
        x_eval = with_input_noise(x_test, noise, seed)
        acc, acc_bn, cal, x_train = accuracies(model, variant, x_eval, y_test, args.data / role / "train.npz",
                                               inputs, batch, int(cfg.get("ece_bins", 20)), seed, device)
        metrics: dict = {"variant": variant.name, "seed": run_seed, "status": "ok", "family": variant.family,
                         "dataset": role, "source": meta["source"], "weights": select, "test_images": len(y_test),
                         "input_noise": noise, "accuracy": acc, "ece": cal.ece, "accuracy_bn_reestimated": acc_bn}
        scores, sources = ood_detection(model, x_test, args.data, role, ood_roles, limit, noise, seed, batch, device,
                                        inputs)
        metrics["ood"] = {s: {ood: auroc(scores["test"][s], scores[ood][s]) for ood in ood_roles} for s in SCORES}
        metrics["ood_images"] = {k: len(v["log_px"]) for k, v in scores.items()}
        land = cfg.get("landscape") or {}
        alphas, curve, n_land = landscape(model, x_train, float(land.get("fraction", 0.1)),
                                          float(land.get("span", 1.0)), int(land.get("points", 21)),
                                          int(land.get("seed", 0)), batch, device)
        centre = int(np.argmin(np.abs(alphas)))
        metrics["landscape"] = {"images": n_land, "energy_sum_at_theta": float(curve[centre]),
                                "energy_sum_range": float(curve.max() - curve.min())}
        write_plots(args.plots, variant.name, role, cal, scores, metrics["ood"], alphas, curve, n_land)
        write_metrics(args.metrics, {**metrics, "ood_sources": sources})
        run.log_metrics({"test/accuracy": metrics["accuracy"], "test/ece": metrics["ece"],
                         "test/accuracy_bn_reestimated": acc_bn,
                         **{f"ood/{s}/{k}": v for s, d in metrics["ood"].items() for k, v in d.items()},
                         "landscape/energy_sum_range": metrics["landscape"]["energy_sum_range"]})
        run.log_artifact(args.plots)
        ood_line = ", ".join(f"{k} {v:.3f}" for k, v in metrics["ood"]["log_px"].items())
        print(f"[evaluate] {variant.name}: accuracy {metrics['accuracy']:.4f} (BN statistics re-estimated on "
              f"the training split: {acc_bn:.4f}), ECE {100 * cal.ece:.2f}%, "
              f"OOD AUROC log p(x): {ood_line}")


if __name__ == "__main__":
    main_guard(main)
