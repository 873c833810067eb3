"""DVC stage `train@<variant>`: train one variant, resumable, recovering from divergence.

    python -m stages.train --variant sadajem_k5 --data data/demo --gmm gmm/demo \
        --out models/demo/sadajem_k5 --metrics metrics/demo/train/sadajem_k5.json \
        --plots plots/demo/train/sadajem_k5 --checkpoints checkpoints/demo/sadajem_k5

A ``jem.method.session.TrainingSession`` runs it; here are its data, validation, MLflow logging and
outputs. ``--checkpoints`` is not a DVC output, so DVC never deletes them. ``--seed``: one of ``seeds``
(dvc.yaml's matrix runs ``train@<variant>-<seed>`` into ``<variant>/seed<seed>/``). With ``run.nproc``
> 1 the stage relaunches itself under ``torchrun`` (one process per GPU); rank 0 logs and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from jem.config.instances import instance_settings
from jem.config.params import run_name, scale_name
from jem.config.settings import section
from jem.config.variant import Variant, resolve_perf
from jem.data.batches import to_unit_range
from jem.data.datasets import load_split
from jem.evaluation.metrics import accuracy, calibration, predict_logits
from jem.method.gmm import MixtureStats, load_mixture_stats
from jem.method.models import load_model
from jem.method.session import Outcome, RecoveryExhausted, TrainingSession, quiet
from jem.method.train import Trainer
from jem.report.figures import plot_learning_curves
from jem.runtime import distributed
from jem.runtime.checkpoint import CheckpointDir
from jem.runtime.files import read_json
from pipeline.common import StageError, load_params, main_guard, setup_run
from pipeline.declared import Inputs, check_settings
from pipeline.outputs import building, write_json, write_metrics
from pipeline.tracking import mlflow_run
from pipeline.weights import stage_run


def log(message: str) -> None:
    print(f"[train] {message}", flush=True)


@dataclasses.dataclass
class MlflowHooks:
    """The session's read-outs, validations, recoveries and divergence, logged to the stage's MLflow run."""

    run: Any

    def on_log(self, step: int, stats: dict[str, float]) -> None:
        self.run.log_metrics({f"train/{k}": v for k, v in stats.items()}, step=step)

    def on_validation(self, row: dict[str, Any]) -> None:
        self.run.log_metrics({"val/acc": row["val_acc"], "val/ece": row["val_ece"]}, step=row["step"])

    def on_recovery(self, e: dict[str, Any]) -> None:
        self.run.set_tags({f"recovery.{e['attempt']}": f"step {e['step']}: {e['reason']}; {e['remedy']}; "
                                                       f"resumed from step {e['resumed_from_step']}"})
        self.run.log_metrics({"recovery/retries": e["attempt"], "recovery/diverged_at": e["step"]}, step=e["step"])

    def on_diverged(self, stopped: dict[str, Any]) -> None:
        self.run.set_tags({"diverged": f"epoch {stopped['epoch']}, step {stopped['step']}: {stopped['reason']}"})
        self.run.log_metrics({"recovery/diverged_at": stopped["step"]}, step=stopped["step"])


def load_data(args: argparse.Namespace, inputs: Inputs, variant: Variant) -> tuple[
        dict[str, Any], torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None, MixtureStats | None]:
    """The split's metadata, training images and labels, validation split (if any) and mixture statistics."""
    role = variant.dataset
    meta = read_json(inputs.need(args.data / role / "meta.json"))
    if int(meta["num_classes"]) != variant.model.num_classes:
        raise StageError(f"{args.data / role} has {meta['num_classes']} classes, datasets.{role}.<scale>.num_classes "
                         f"says {variant.model.num_classes}; correct params.yaml")
    shape = [variant.model.in_channels, variant.model.image_size, variant.model.image_size]
    if meta.get("image_shape", shape) != shape:
        raise StageError(f"{args.data / role} holds {'x'.join(map(str, meta['image_shape']))} images, the model "
                         f"takes {'x'.join(map(str, shape))} (model.image_size); give datasets.{role}.<scale>."
                         "image_size the model's size and rerun dvc repro")
    x, y = (torch.from_numpy(a) for a in load_split(inputs.need(args.data / role / "train.npz")))
    val = None
    if (args.data / role / "val.npz").exists():
        val = tuple(torch.from_numpy(a) for a in load_split(inputs.need(args.data / role / "val.npz")))
    mixture = (load_mixture_stats(inputs.need(args.gmm / role / "stats.pt")) if variant.buffer.init == "gmm"
               else None)
    return meta, x, y, val, mixture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--seed", type=int, help="the training seed, one of `seeds` (default: the first)")
    ap.add_argument("--data", type=Path, required=True, help="prepared data folder of this scale")
    ap.add_argument("--gmm", type=Path, required=True, help="mixture statistics folder of this scale")
    for flag in ("--out", "--metrics", "--plots", "--checkpoints"):
        ap.add_argument(flag, type=Path, required=True)
    ap.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    ap.add_argument("--inputs", type=Path, help="its input fingerprints (stages inputs_*): each file read is checked")
    args = ap.parse_args()

    name = args.variant
    run_id = name if args.seed is None else run_name(name, args.seed)
    params = load_params()
    device = setup_run(params)
    run_settings = section(params, "run", scale_name(params))
    distributed.from_slurm()  # srun: torch's variables from SLURM's
    if (run_settings.nproc > 1 or run_settings.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        rdzv_id = f"jem-{name}" if args.seed is None else f"jem-{name}-{args.seed}"  # one rendezvous per run
        distributed.relaunch_under_torchrun(run_settings, "stages.train", rdzv_id, log)
    info, device = distributed.init(device)
    say = log if info.is_main else quiet
    settings = check_settings(args.config, instance_settings(params, "train", run_id))
    variant = Variant.from_dict(settings["variant"], where=f"methods.{name}")
    meta, x, y, val, mixture = load_data(args, Inputs(args.inputs), variant)
    perf, perf_line = resolve_perf(run_settings.perf, device)
    say(f"{name}: run.perf = {perf_line}")

    def new_trainer() -> Trainer:
        return Trainer(variant, x, y, mixture=mixture, device=device, perf=perf, dist=info)

    def validate(model: torch.nn.Module) -> dict[str, float] | None:  # rank 0, every val_every epochs
        if val is None:
            return None
        logits = predict_logits(model, val[0], device=device)
        return {"val_acc": accuracy(logits, val[1]), "val_ece": calibration(logits, val[1]).ece}

    session = TrainingSession(new_trainer, CheckpointDir(args.checkpoints, keep=variant.train.keep_checkpoints),
                              name, validate, val_every=int(settings["val_every"]), say=say)
    session.resume()

    tags = {"variant": name, "seed": variant.train.seed, "family": variant.family, "dataset": variant.dataset,
            "source": meta["source"]}
    with mlflow_run(stage_run("train", name, args.seed), params, {**tags, "processes": info.world},
                    main=info.is_main) as run:
        run.log_params(variant.to_dict())
        run.log_params({"perf": dataclasses.asdict(perf), "nproc": info.world})
        run.set_tags({"perf": perf_line})
        run.set_tags({"resumed_from_step": session.trainer.step})
        for split, arrays in (("train", (x, y)), ("val", val)):
            if (args.data / variant.dataset / f"{split}.npz").exists():
                run.log_dataset(args.data / variant.dataset / f"{split}.npz",
                                "training" if split == "train" else "validation", *(a.numpy() for a in arrays))
        outcome = session.run(MlflowHooks(run))
        if info.is_main:  # the outputs (rank 0), built beside the target and swapped in
            write_outputs(args, name, outcome, session.best_path, run, example=to_unit_range(x[:2]).float())


def write_outputs(args: argparse.Namespace, name: str, outcome: Outcome, best_path: Path, run: Any,
                  example: torch.Tensor) -> None:
    """``final.pt`` (weights, variant, final replay buffer) and ``best_val.pt`` (weights and replay buffer at
    the best validation accuracy) in ``--out``, the metrics (with the divergence counts the report's stability
    table sums), learning curves (``steps.csv``, ``val.csv``, ``curves.png``) in ``--plots``. A run stopped at
    a divergence (``recovery.enabled: false``: the stage succeeds) leaves ``diverged.json`` (iteration, epoch,
    signal) instead of weights, and the stages after it and the report say "diverged at epoch e"."""
    metrics, stopped = outcome.metrics(), outcome.stopped
    with building(args.out) as tmp:
        if stopped is not None:
            write_json(tmp / "diverged.json", stopped)
        else:
            outcome.save_final(tmp / "final.pt")
            if best_path.exists():
                shutil.copyfile(best_path, tmp / "best_val.pt")
    with building(args.plots) as tmp:
        outcome.write_logs(tmp)
        title = "" if stopped is None else f" seed {stopped['seed']}: diverged at epoch {stopped['epoch']}"
        plot_learning_curves(outcome.steps_log, outcome.val_log, tmp / "curves.png", title=f"train@{name}{title}")
    write_metrics(args.metrics, metrics)
    if stopped is not None:
        run.log_metrics({"stability/divergence_events": metrics["divergence_events"]})
        run.log_artifact(args.plots)
        return
    exported, _ = load_model(args.out / "final.pt", "cpu")  # the saved weights, as later stages read them
    run.log_model(exported, example)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    run.log_artifact(args.plots)
    log(f"{name}: {outcome.summary()}")


def run() -> None:
    try:
        main()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main_guard(run, {RecoveryExhausted: 3})
