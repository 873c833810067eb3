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
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from jem.config.instances import instance_settings
from jem.data.datasets import load_split
from jem.evaluation.landscape import energy_curve, filter_normalized_direction
from jem.evaluation.metrics import accuracy, calibration, predict_logits, with_input_noise, with_reestimated_bn
from jem.evaluation.ood import SCORES, auroc, ood_scores
from jem.report.figures import plot_landscape, plot_ood_histograms, plot_reliability
from jem.report.plot_data import write_ood_histograms
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
    if limit is not None and limit < len(images):
        images = images[np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))]
    return images, str(path)


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
    meta = json.loads(inputs.need(args.data / role / "meta.json").read_text())
    x_test, y_test = (torch.from_numpy(a) for a in load_split(inputs.need(args.data / role / "test.npz")))
    batch = int(cfg.get("batch_size", 500))
    limit = cfg.get("ood_max")
    limit = None if limit is None else int(limit)
    seed = int(cfg.get("seed", 0))
    ood_roles = list(cfg["ood_sets"])  # resolved: without the training role

    tags = {"variant": variant.name, "seed": run_seed, "family": variant.family, "dataset": role}
    with mlflow_run(stage_run("evaluate", name, run_seed), params, tags) as run:
        run.log_params({"evaluate": cfg})
        run.log_dataset(args.data / role / "test.npz", "testing", x_test.numpy(), y_test.numpy())
        noise = float(cfg["input_noise"])  # evaluate.input_noise of the variant's family
        x_eval = with_input_noise(x_test, noise, seed)
        logits = predict_logits(model, x_eval, batch_size=batch, device=device)
        cal = calibration(logits, y_test, n_bins=int(cfg.get("ece_bins", 20)))
        # the same weights with batch-norm statistics averaged over the training split, each
        # batch augmented and noised as the labelled batches of training: agrees with
        # "accuracy" when the running statistics describe labelled data
        x_train, _ = load_split(inputs.need(args.data / role / "train.npz"))
        recalibrated = with_reestimated_bn(model, torch.from_numpy(x_train), batch, device, augment=variant.augment,
                                           input_noise=variant.objective.input_noise, seed=seed)
        acc_bn = accuracy(predict_logits(recalibrated, x_eval, batch_size=batch, device=device), y_test)
        del recalibrated
        metrics: dict = {
            "variant": variant.name, "seed": run_seed, "status": "ok",
            "family": variant.family, "dataset": role, "source": meta["source"],
            "weights": select, "test_images": len(y_test), "input_noise": noise,
            "accuracy": accuracy(logits, y_test), "ece": cal.ece,
            "accuracy_bn_reestimated": acc_bn,
        }

        # ---- OOD detection ------------------------------------------------------------------
        ood_test = x_test if limit is None or limit >= len(x_test) else x_test[
            np.sort(np.random.default_rng(seed).choice(len(x_test), limit, replace=False))]
        scores = {"test": ood_scores(model, with_input_noise(ood_test, noise, seed), batch, device, progress=True,
                                     desc="ood test")}
        sources = {"test": str(args.data / role / "test.npz")}
        for ood in ood_roles:
            images, sources[ood] = ood_set(args.data, ood, role, limit, seed, inputs)
            scores[ood] = ood_scores(model, with_input_noise(torch.from_numpy(images), noise, seed + 1), batch, device,
                                     progress=True, desc=f"ood {ood}")
        metrics["ood"] = {s: {ood: auroc(scores["test"][s], scores[ood][s]) for ood in ood_roles} for s in SCORES}
        metrics["ood_images"] = {k: len(v["log_px"]) for k, v in scores.items()}

        # ---- energy landscape ---------------------------------------------------------------
        land = cfg.get("landscape") or {}
        n_land = max(1, round(float(land.get("fraction", 0.1)) * len(x_train)))
        rng = np.random.default_rng(int(land.get("seed", 0)))
        land_images = torch.from_numpy(x_train[np.sort(rng.choice(len(x_train), n_land, replace=False))])
        alphas = np.linspace(-float(land.get("span", 1.0)), float(land.get("span", 1.0)), int(land.get("points", 21)))
        direction = filter_normalized_direction(model, torch.Generator().manual_seed(int(land.get("seed", 0))))
        curve = energy_curve(model, land_images, alphas, direction, batch, device)
        centre = int(np.argmin(np.abs(alphas)))
        metrics["landscape"] = {"images": n_land, "energy_sum_at_theta": float(curve[centre]),
                                "energy_sum_range": float(curve.max() - curve.min())}

        with building(args.plots) as tmp:
            with open(tmp / "reliability.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["bin_low", "bin_high", "confidence", "accuracy", "count"])
                for i, count in enumerate(cal.bin_count):
                    writer.writerow([cal.bin_edges[i], cal.bin_edges[i + 1], cal.bin_confidence[i],
                                     cal.bin_accuracy[i], count])
            plot_reliability(asdict(cal), tmp / "reliability.png", title=f"{variant.name} ({role})")
            write_ood_histograms(tmp, scores, SCORES)
            plot_ood_histograms(scores, metrics["ood"], tmp / "ood_histograms.png", title=f"{variant.name} ({role})")
            with open(tmp / "landscape.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["alpha", "energy_sum"])
                writer.writerows(zip(alphas.tolist(), curve.tolist(), strict=True))
            plot_landscape({variant.name: (alphas, curve)}, tmp / "landscape.png", shared_y=True,
                           title=f"{variant.name}: sum of E(x) over {n_land} training images")
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
