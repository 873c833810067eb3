"""DVC stage `train@<variant>`: train one variant, resumable from its last checkpoint.

    python -m stages.train --variant sadajem_k5 --data data/demo --gmm gmm/demo \
        --out models/demo/sadajem_k5 --metrics metrics/demo/train/sadajem_k5.json \
        --plots plots/demo/train/sadajem_k5 --checkpoints checkpoints/demo/sadajem_k5

Checkpoints (``--checkpoints``, not a DVC output, so DVC never deletes them) hold the whole
training state and are written every ``train.checkpoint_every`` iterations and at each
epoch end; rerunning an interrupted stage continues from the last one. A checkpoint written
for different params is set aside (``stale.pt``) and training starts over.

Outputs: ``final.pt`` (weights, variant, final replay buffer) and ``best_val.pt`` (weights
with the best validation accuracy) in ``--out``; training metrics JSON; learning curves
(``steps.csv``, ``val.csv``, ``curves.png``) in ``--plots``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from jem.datasets import load_split
from jem.gmm import load_mixture_stats
from jem.metrics import accuracy, calibration, predict_logits
from jem.models import save_model
from jem.params import resolve_variant, variant_dataset
from jem.train import Trainer
from stages.common import load_params, main_guard, mlflow_run, setup_run, write_json
from stages.figures import plot_learning_curves

STEP_FIELDS = ("step", "epoch", "loss", "loss_clf", "loss_gen", "energy_pos", "energy_neg", "acc_train", "lr")


def _tensor(a: Any) -> torch.Tensor:
    return torch.from_numpy(a)


def _resume(trainer: Trainer, path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        extra = trainer.load_checkpoint(path)
    except ValueError as exc:
        stale = path.with_name("stale.pt")
        os.replace(path, stale)
        print(f"[train] {path}: {exc}; moved it to {stale} and starting over")
        return {}
    print(f"[train] resumed from {path} at step {trainer.step} (epoch {trainer.epoch})")
    return extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--data", type=Path, required=True, help="prepared data folder of this scale")
    ap.add_argument("--gmm", type=Path, required=True, help="mixture statistics folder of this scale")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, required=True)
    args = ap.parse_args()

    params = load_params()
    device = setup_run(params)
    name = args.variant
    role = variant_dataset(params, name)
    meta = json.loads((args.data / role / "meta.json").read_text())
    variant = resolve_variant(params, name, num_classes=int(meta["num_classes"]))
    x, y = (_tensor(a) for a in load_split(args.data / role / "train.npz"))
    val = None
    if (args.data / role / "val.npz").exists():
        val = tuple(_tensor(a) for a in load_split(args.data / role / "val.npz"))
    mixture = load_mixture_stats(args.gmm / role / "stats.pt") if variant.buffer.init == "gmm" else None
    val_every = int(params.get("train", {}).get("val_every", 1))

    trainer = Trainer(variant, x, y, mixture=mixture, device=device)
    ckpt = args.checkpoints / "last.pt"
    extra = _resume(trainer, ckpt)
    steps_log: list[dict[str, float]] = extra.get("steps_log", [])
    val_log: list[dict[str, float]] = extra.get("val_log", [])
    best: dict[str, Any] = extra.get("best", {"val_acc": -1.0, "epoch": -1})
    seconds = float(extra.get("seconds", 0.0))
    best_path = args.checkpoints / "best_val.pt"

    start = time.perf_counter()

    def state() -> dict[str, Any]:
        elapsed = seconds + time.perf_counter() - start
        return {"steps_log": steps_log, "val_log": val_log, "best": best, "seconds": elapsed}

    tags = {"variant": name, "family": variant.family, "dataset": role, "source": meta["source"]}
    with mlflow_run(f"train@{name}", params, tags) as run:
        run.log_params(variant.to_dict())
        run.set_tags({"resumed_from_step": trainer.step})

        def on_log(step: int, stats: dict[str, float]) -> None:
            row = {"step": step, "epoch": step / trainer.iters_per_epoch, **stats}
            steps_log.append(row)
            run.log_metrics({f"train/{k}": v for k, v in stats.items()}, step=step)

        def on_checkpoint(t: Trainer) -> None:
            if t.step % t.iters_per_epoch:  # epoch ends are saved below, after validation
                t.save_checkpoint(ckpt, extra=state())

        start = time.perf_counter()
        while trainer.step < trainer.total_steps:
            epoch_end = (trainer.epoch + 1) * trainer.iters_per_epoch
            trainer.fit(until=epoch_end, on_log=on_log, on_checkpoint=on_checkpoint)
            epoch = trainer.epoch
            if val is not None and (epoch % val_every == 0 or trainer.step == trainer.total_steps):
                logits = predict_logits(trainer.model, val[0], device=device)
                row = {"epoch": epoch, "step": trainer.step, "val_acc": accuracy(logits, val[1]),
                       "val_ece": calibration(logits, val[1]).ece}
                val_log.append(row)
                run.log_metrics({"val/acc": row["val_acc"], "val/ece": row["val_ece"]}, step=trainer.step)
                print(f"[train] {name} epoch {epoch}: val acc {row['val_acc']:.4f}")
                if row["val_acc"] > best["val_acc"]:
                    best = {"val_acc": row["val_acc"], "epoch": epoch, "step": trainer.step}
                    save_model(best_path, trainer.model, variant.to_dict(), **best)
            seconds += time.perf_counter() - start
            start = time.perf_counter()
            trainer.save_checkpoint(ckpt, extra=state())

        # ---- outputs, built beside the target and swapped in ------------------------------
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
        try:
            buffer = trainer.buffer.state_dict() if trainer.buffer is not None else None
            save_model(tmp / "final.pt", trainer.model, variant.to_dict(), buffer=buffer,
                       step=trainer.step, epoch=trainer.epoch, dataset=role)
            if best_path.exists():
                shutil.copyfile(best_path, tmp / "best_val.pt")
            if args.out.exists():
                shutil.rmtree(args.out)
            tmp.rename(args.out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

        args.plots.mkdir(parents=True, exist_ok=True)
        _write_csv(args.plots / "steps.csv", steps_log, STEP_FIELDS)
        _write_csv(args.plots / "val.csv", val_log, ("epoch", "step", "val_acc", "val_ece"))
        plot_learning_curves(steps_log, val_log, args.plots / "curves.png", title=f"train@{name}")
        last = steps_log[-1] if steps_log else {}
        metrics = {
            "steps": trainer.step, "epochs": trainer.epoch, "train_seconds": round(seconds, 2),
            "images_per_second": round(trainer.step * variant.train.batch_size / max(seconds, 1e-9), 2),
            "train_loss": last.get("loss"), "train_acc": last.get("acc_train"),
            "val_acc": val_log[-1]["val_acc"] if val_log else None,
            "val_acc_best": best["val_acc"] if best["epoch"] >= 0 else None,
            "best_epoch": best["epoch"] if best["epoch"] >= 0 else None,
        }
        write_json(args.metrics, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if v is not None})
        run.log_artifact(args.plots)
        print(f"[train] {name}: {trainer.step} steps in {seconds:.0f}s, val acc {metrics['val_acc']}")


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


if __name__ == "__main__":
    main_guard(main)
