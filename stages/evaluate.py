"""DVC stage `evaluate@<variant>`: test-set metrics of one trained variant.

    python -m stages.evaluate --model models/demo/sadajem_k5 --data data/demo \
        --metrics metrics/demo/eval/sadajem_k5.json --plots plots/demo/eval/sadajem_k5

Accuracy (test set, eval mode, no input noise) and expected calibration error with its
reliability diagram (``reliability.csv``/``.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict
from pathlib import Path

import torch

from jem.config import Variant
from jem.datasets import load_split
from jem.metrics import accuracy, calibration, predict_logits
from jem.models import load_model
from jem.params import stage_section
from stages.common import StageError, load_params, main_guard, mlflow_run, setup_run, write_json
from stages.figures import plot_reliability


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="prepared data folder of this scale")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    args = ap.parse_args()

    params = load_params()
    device = setup_run(params)
    cfg = stage_section(params, "evaluate")
    select = cfg.get("select", "last")
    if select not in ("last", "best_val"):
        raise StageError(f"evaluate.select = {select!r}: expected 'last' or 'best_val'")
    weights = args.model / ("final.pt" if select == "last" else "best_val.pt")
    if not weights.exists():
        raise StageError(f"{weights} not found (evaluate.select = {select}); best_val needs a validation split")
    model, payload = load_model(weights, device)
    variant = Variant.from_dict(payload["variant"])
    role = variant.dataset
    meta = json.loads((args.data / role / "meta.json").read_text())
    x_test, y_test = (torch.from_numpy(a) for a in load_split(args.data / role / "test.npz"))

    tags = {"variant": variant.name, "family": variant.family, "dataset": role}
    with mlflow_run(f"evaluate@{variant.name}", params, tags) as run:
        run.log_params({"evaluate": cfg})
        logits = predict_logits(model, x_test, batch_size=int(cfg.get("batch_size", 500)), device=device)
        cal = calibration(logits, y_test, n_bins=int(cfg.get("ece_bins", 20)))
        metrics = {
            "variant": variant.name, "family": variant.family, "dataset": role, "source": meta["source"],
            "weights": select, "test_images": len(y_test),
            "accuracy": accuracy(logits, y_test), "ece": cal.ece,
        }
        args.plots.mkdir(parents=True, exist_ok=True)
        with open(args.plots / "reliability.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["bin_low", "bin_high", "confidence", "accuracy", "count"])
            for i, count in enumerate(cal.bin_count):
                writer.writerow([cal.bin_edges[i], cal.bin_edges[i + 1], cal.bin_confidence[i],
                                 cal.bin_accuracy[i], count])
        plot_reliability(asdict(cal), args.plots / "reliability.png", title=f"{variant.name} ({role})")
        write_json(args.metrics, metrics)
        run.log_metrics({"test/accuracy": metrics["accuracy"], "test/ece": metrics["ece"]})
        run.log_artifact(args.plots)
        print(f"[evaluate] {variant.name}: accuracy {metrics['accuracy']:.4f}, ECE {100 * cal.ece:.2f}%")


if __name__ == "__main__":
    main_guard(main)
