"""DVC stage `train@<variant>`: train one variant, resumable, recovering from divergence.

    python -m stages.train --variant sadajem_k5 --data data/demo --gmm gmm/demo \
        --out models/demo/sadajem_k5 --metrics metrics/demo/train/sadajem_k5.json \
        --plots plots/demo/train/sadajem_k5 --checkpoints checkpoints/demo/sadajem_k5

Checkpoints (``--checkpoints``, not a DVC output, so DVC never deletes them) hold the whole
training state, checksummed; they are written every ``train.checkpoint_every`` iterations and
at each epoch end, the newest ``train.keep_checkpoints`` kept. Rerunning an interrupted stage
continues from the newest intact one (a damaged file is reported and the one before it used).
Checkpoints written for different params are set aside (``stale/``) and training starts over.

When training diverges (``jem.method.train.Trainer.divergence``), the run rolls back to its last good
checkpoint and applies the variant's ``recovery`` remedies, each event logged here and to
MLflow; once ``recovery.max_retries`` retries are spent the stage exits with status 3 and the
last good checkpoint stays. With ``recovery.enabled: false`` the run stops at its first
divergence instead and the stage succeeds: ``--out`` then holds ``diverged.json`` (iteration,
epoch, signal) instead of weights, and the stages after it and the report say "diverged at
epoch e". Every run's metrics count its divergence events (``divergence_events``,
``events_per_1k_iters``, ``first_divergence_epoch``; the events themselves in the notes), which
the report's stability table sums over seeds.

``--seed`` is the run's training seed (one of ``seeds`` in params.yaml; dvc.yaml's matrix runs
``train@<variant>-<seed>`` into ``<variant>/seed<seed>/`` folders).

With ``run.nproc`` > 1 the stage relaunches itself under ``torchrun`` (one process per GPU,
``jem.runtime.distributed``): rank 0 logs, writes the checkpoints (with every rank's buffer shard)
and the outputs; a run resumes on any number of processes.

Outputs: ``final.pt`` (weights, variant, final replay buffer) and ``best_val.pt`` (weights and
replay buffer at the best validation accuracy) in ``--out``; training metrics JSON; learning curves
(``steps.csv``, ``val.csv``, ``curves.png``) in ``--plots``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
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
from jem.method.gmm import load_mixture_stats
from jem.method.models import load_model, save_model
from jem.method.train import DivergenceError, Trainer
from jem.report.figures import plot_learning_curves
from jem.runtime import distributed
from jem.runtime.checkpoint import CheckpointDir
from jem.runtime.distributed import barrier
from pipeline.common import StageError, load_params, main_guard, setup_run
from pipeline.declared import Inputs, check_settings
from pipeline.outputs import building, write_json, write_metrics
from pipeline.tracking import mlflow_run
from pipeline.weights import stage_run

STEP_FIELDS = ("step", "epoch", "loss", "loss_clf", "loss_gen", "energy_pos", "energy_neg", "acc_train",
               "saturation", "lr")


SIGNALS = {"non-finite": "non_finite", "exploding energy": "exploding_energy", "saturated samples": "saturated_samples"}


def signal_of(reason: str) -> str:
    """The divergence test that fired (``Trainer.divergence``'s reason, shortened)."""
    return next((v for k, v in SIGNALS.items() if reason.startswith(k)), "other")


def epoch_of(step: int, iters_per_epoch: int) -> int:
    """The (1-based) epoch iteration ``step`` belongs to."""
    return (max(step, 1) - 1) // iters_per_epoch + 1


def stability(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """A run's divergence record: whether it diverged, how often per 1,000 iterations, and when first."""
    return {"diverged": int(bool(events)), "divergence_events": len(events),
            "events_per_1k_iters": round(1000 * len(events) / max(steps, 1), 4),
            "first_divergence_epoch": events[0]["epoch"] if events else None,
            "divergence_log": [{k: e.get(k) for k in ("step", "epoch", "signal", "reason", "remedy")} for e in events]}


class RecoveryExhausted(RuntimeError):
    """Divergence kept coming back after every configured retry; the message is one line."""


def log(message: str) -> None:
    print(f"[train] {message}", flush=True)


def quiet(message: str) -> None:
    """The log of ranks other than 0."""


def relaunch_under_torchrun(run: Any, variant: str) -> None:
    """Replace this process by ``torchrun`` running the same stage: ``run.nproc`` processes on
    this machine, and with ``run.nnodes`` > 1 this machine's share of a run over several,
    which meet at the c10d rendezvous ``run.rdzv_endpoint`` (every machine runs the same
    command; torchrun assigns the node ranks)."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={run.nproc}"]
    if run.nnodes > 1:
        argv += [f"--nnodes={run.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={run.rdzv_endpoint}",
                 f"--rdzv_id={run.rdzv_id or f'jem-{variant}'}"]  # variant-seed: one rendezvous per run
    else:
        argv.insert(3, "--standalone")
    argv += ["-m", "stages.train", *sys.argv[1:]]
    where = f" on each of {run.nnodes} machines (rendezvous {run.rdzv_endpoint})" if run.nnodes > 1 else ""
    log(f"run.nproc = {run.nproc}{where}: relaunching under torchrun")
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def resume(trainer: Trainer, checkpoints: CheckpointDir, say: Callable[[str], None]) -> dict[str, Any]:
    """Load the newest intact checkpoint into ``trainer``; its extra state ({} when starting over)."""
    # rank 0 reads and sends: the other machines of a multi-node run need no shared filesystem
    found = distributed.broadcast_object(checkpoints.latest(say) if trainer.dist.is_main else None, trainer.dist)
    if found is None:
        return {}
    state, path = found
    try:
        extra = trainer.load_state_dict(state)
    except ValueError as exc:  # written for other params
        barrier(trainer.dist)  # every rank has read it before rank 0 moves it
        if trainer.dist.is_main:
            checkpoints.set_aside(f"{path}: {exc}", say)
        barrier(trainer.dist)
        return {}
    moved = (f"; it was written by {state.get('world', 1)} process(es), this run has {trainer.dist.world}: "
             "buffer shards regrouped, slot draws reseeded") if trainer.resharded else ""
    say(f"resumed from {path} at step {trainer.step} (epoch {trainer.epoch}){moved}")
    return extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--seed", type=int, help="the training seed, one of `seeds` (default: the first)")
    ap.add_argument("--data", type=Path, required=True, help="prepared data folder of this scale")
    ap.add_argument("--gmm", type=Path, required=True, help="mixture statistics folder of this scale")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    ap.add_argument("--inputs", type=Path, help="its input fingerprints (stages inputs_*): each file read is checked")
    args = ap.parse_args()

    params = load_params()
    device = setup_run(params)
    run_settings = section(params, "run", scale_name(params))
    distributed.from_slurm()  # srun: torch's variables from SLURM's
    if (run_settings.nproc > 1 or run_settings.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        relaunch_under_torchrun(run_settings, args.variant if args.seed is None else f"{args.variant}-{args.seed}")
    info, device = distributed.init(device)
    say = log if info.is_main else quiet
    name = args.variant
    run_id = name if args.seed is None else run_name(name, args.seed)
    settings = check_settings(args.config, instance_settings(params, "train", run_id))
    inputs = Inputs(args.inputs)
    variant = Variant.from_dict(settings["variant"], where=f"methods.{name}")
    seed = variant.train.seed
    role = variant.dataset
    meta = json.loads(inputs.need(args.data / role / "meta.json").read_text())
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
    val_every = int(settings["val_every"])
    checkpoints = CheckpointDir(args.checkpoints, keep=variant.train.keep_checkpoints)
    best_path = args.checkpoints / "best_val.pt"

    perf, perf_line = resolve_perf(run_settings.perf, device)
    say(f"{name}: run.perf = {perf_line}")

    def new_trainer() -> Trainer:
        return Trainer(variant, x, y, mixture=mixture, device=device, perf=perf, dist=info)

    trainer = new_trainer()
    if perf.compile:
        say(f"{name}: {trainer.compiled}")
    if info.enabled:
        say(f"{name}: data parallel over {info.world} processes ({device.type}), "
            f"{variant.train.batch_size // info.world} labelled images per process and step")
    extra = resume(trainer, checkpoints, say)
    steps_log: list[dict[str, float]] = extra.get("steps_log", [])
    val_log: list[dict[str, float]] = extra.get("val_log", [])
    best: dict[str, Any] = extra.get("best", {"val_acc": -1.0, "epoch": -1})
    events: list[dict[str, Any]] = extra.get("recovery_events", [])
    seconds = float(extra.get("seconds", 0.0))
    start = time.perf_counter()

    def state_now() -> dict[str, Any]:
        elapsed = seconds + time.perf_counter() - start
        return {"steps_log": steps_log, "val_log": val_log, "best": best, "seconds": elapsed,
                "recovery_events": events}

    def save_checkpoint(t: Trainer, best_now: bool = False) -> None:
        state = t.state_dict(extra=state_now())  # collective under data parallelism
        if info.is_main:
            if best_now:  # the weights and the replay buffer of one moment: sample.select best_val scores them;
                buffer = state["buffer"]  # written before the checkpoint that records it as the best
                save_model(best_path, t.model, variant.to_dict(), **best,
                           buffer=None if buffer is None else {"samples": buffer["samples"],
                                                               "labels": buffer["labels"]})
            checkpoints.save(state, t.step)
        barrier(info)

    tags = {"variant": name, "seed": seed, "family": variant.family, "dataset": role, "source": meta["source"]}
    with mlflow_run(stage_run("train", name, args.seed), params, {**tags, "processes": info.world},
                    main=info.is_main) as run:
        run.log_params(variant.to_dict())
        run.log_params({"perf": dataclasses.asdict(perf), "nproc": info.world})
        run.set_tags({"perf": perf_line})
        run.set_tags({"resumed_from_step": trainer.step})
        for split, context in (("train", "training"), ("val", "validation")):
            if (args.data / role / f"{split}.npz").exists():
                arrays = (x, y) if split == "train" else val
                run.log_dataset(args.data / role / f"{split}.npz", context, *(a.numpy() for a in arrays))

        def on_log(step: int, stats: dict[str, float]) -> None:
            row = {"step": step, "epoch": step / trainer.iters_per_epoch, **stats}
            steps_log.append(row)
            run.log_metrics({f"train/{k}": v for k, v in stats.items()}, step=step)

        def on_checkpoint(t: Trainer) -> None:
            if t.step % t.iters_per_epoch:  # epoch ends are saved below, after validation
                save_checkpoint(t)

        def recover(exc: DivergenceError) -> Trainer:
            """Roll back to the last good checkpoint and apply the next remedy, or give up."""
            nonlocal steps_log, val_log, best
            attempt = len(events) + 1
            if attempt > variant.recovery.max_retries:
                found = checkpoints.paths()
                kept = f"last good checkpoint kept: {found[-1]}" if found else "no checkpoint was written"
                raise RecoveryExhausted(f"{exc} after {len(events)} recovery retries "
                                        f"(recovery.max_retries = {variant.recovery.max_retries}); {kept}") from None
            fresh = new_trainer()
            found = distributed.broadcast_object(checkpoints.latest(say) if info.is_main else None, info)
            restored = fresh.load_state_dict(found[0]) if found is not None else {}
            steps_log = restored.get("steps_log", [])
            val_log = restored.get("val_log", [])
            best = restored.get("best", {"val_acc": -1.0, "epoch": -1})
            planned = [fresh.planned_remedy(k) for k in range(1, attempt + 1)]
            for remedy in planned[len(fresh.remedies):]:  # remedies accumulate over retries
                fresh.apply_remedy(remedy)
            event = {"attempt": attempt, "step": exc.step, "epoch": epoch_of(exc.step, fresh.iters_per_epoch),
                     "signal": signal_of(exc.reason), "reason": exc.reason, "remedy": planned[-1],
                     "resumed_from_step": fresh.step, "remedies": list(fresh.remedies),
                     "sampler_steps": fresh.sampler_cfg.steps, "lr": fresh.lr}
            events.append(event)
            say(f"diverged at step {exc.step}: {exc.reason}; retry {attempt}/{variant.recovery.max_retries}: "
                f"{planned[-1]}, resuming from step {fresh.step} (remedies so far: {', '.join(fresh.remedies)})")
            run.set_tags({f"recovery.{attempt}": f"step {exc.step}: {exc.reason}; {planned[-1]}; "
                                                  f"resumed from step {fresh.step}"})
            run.log_metrics({"recovery/retries": attempt, "recovery/diverged_at": exc.step}, step=exc.step)
            return fresh

        start = time.perf_counter()
        stopped: dict[str, Any] | None = None  # the divergence a run with recovery off stopped at
        while trainer.step < trainer.total_steps:
            improved = False  # on rank 0, which validates
            epoch_end = (trainer.epoch + 1) * trainer.iters_per_epoch
            try:
                trainer.fit(until=epoch_end, on_log=on_log, on_checkpoint=on_checkpoint, progress=info.is_main)
            except DivergenceError as exc:
                if variant.recovery.enabled:
                    trainer = recover(exc)
                    continue
                stopped = {"variant": name, "seed": seed, "step": exc.step,
                           "epoch": epoch_of(exc.step, trainer.iters_per_epoch), "signal": signal_of(exc.reason),
                           "reason": exc.reason, "remedy": "none (recovery.enabled: false)"}
                events.append(stopped)
                seconds += time.perf_counter() - start
                say(f"{name} seed {seed}: diverged at step {exc.step} (epoch {stopped['epoch']}): {exc.reason}; "
                    "recovery.enabled is false, so the run stops here and is recorded as diverged")
                run.set_tags({"diverged": f"epoch {stopped['epoch']}, step {exc.step}: {exc.reason}"})
                run.log_metrics({"recovery/diverged_at": exc.step}, step=exc.step)
                break
            epoch = trainer.epoch
            if info.is_main and val is not None and (epoch % val_every == 0 or trainer.step == trainer.total_steps):
                logits = predict_logits(trainer.model, val[0], device=device)
                row = {"epoch": epoch, "step": trainer.step, "val_acc": accuracy(logits, val[1]),
                       "val_ece": calibration(logits, val[1]).ece}
                val_log.append(row)
                run.log_metrics({"val/acc": row["val_acc"], "val/ece": row["val_ece"]}, step=trainer.step)
                say(f"{name} epoch {epoch}: val acc {row['val_acc']:.4f}")
                if row["val_acc"] > best["val_acc"]:
                    best = {"val_acc": row["val_acc"], "epoch": epoch, "step": trainer.step}
                    improved = True
            seconds += time.perf_counter() - start
            start = time.perf_counter()
            save_checkpoint(trainer, best_now=improved)

        # ---- outputs (rank 0), built beside the target and swapped in -----------------------
        buffer = trainer.state_dict()["buffer"]  # every rank's shard (collective)
        if buffer is not None:
            buffer = {"samples": buffer["samples"], "labels": buffer["labels"]}
        if not info.is_main:
            return
        if stopped is not None:
            _write_diverged(args, stopped, steps_log, val_log, seconds, stability(events, stopped["step"]), run)
            return
        with building(args.out) as tmp:
            save_model(tmp / "final.pt", trainer.model, variant.to_dict(), buffer=buffer,
                       step=trainer.step, epoch=trainer.epoch, dataset=role, remedies=trainer.remedies)
            if best_path.exists():
                shutil.copyfile(best_path, tmp / "best_val.pt")

        _write_curves(args.plots, steps_log, val_log, f"train@{name}")
        last = steps_log[-1] if steps_log else {}
        metrics = {
            "steps": trainer.step, "epochs": trainer.epoch, "train_seconds": round(seconds, 2),
            "images_per_second": round(trainer.step * variant.train.batch_size / max(seconds, 1e-9), 2),
            "train_loss": last.get("loss"), "train_acc": last.get("acc_train"),
            "val_acc": val_log[-1]["val_acc"] if val_log else None,
            "val_acc_best": best["val_acc"] if best["epoch"] >= 0 else None,
            "best_epoch": best["epoch"] if best["epoch"] >= 0 else None,
            "recovery_retries": len(events), "remedies": ",".join(trainer.remedies) or "none",
            "status": "ok", "seed": seed, "recovery": "on" if variant.recovery.enabled else "off",
            **stability(events, trainer.step),
        }
        write_metrics(args.metrics, metrics)
        if info.is_main:
            exported, _ = load_model(args.out / "final.pt", "cpu")  # the saved weights, as later stages read them
            run.log_model(exported, to_unit_range(x[:2]).float())
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(args.plots)
        val_text = f"{metrics['val_acc']:.4f}" if metrics["val_acc"] is not None else "n/a"
        say(f"{name}: {trainer.step} steps in {seconds:.0f}s, val acc {val_text}"
            + (f", {len(events)} recoveries ({metrics['remedies']})" if events else ""))


def _write_diverged(args: argparse.Namespace, stopped: dict[str, Any], steps_log: list[dict[str, float]],
                    val_log: list[dict[str, float]], seconds: float, record: dict[str, Any], run: Any) -> None:
    """The outputs of a run that stopped at a divergence (recovery off): no weights, the record."""
    with building(args.out) as tmp:
        write_json(tmp / "diverged.json", stopped)
    _write_curves(args.plots, steps_log, val_log,
                  f"train@{stopped['variant']} seed {stopped['seed']}: diverged at epoch {stopped['epoch']}")
    write_metrics(args.metrics, {
        "status": "diverged", "seed": stopped["seed"], "recovery": "off", "steps": stopped["step"],
        "epochs": stopped["epoch"] - 1,
        "train_seconds": round(seconds, 2), "diverged_at_epoch": stopped["epoch"],
        "diverged_at_step": stopped["step"], "reason": stopped["reason"],
        "val_acc": val_log[-1]["val_acc"] if val_log else None, **record})
    run.log_metrics({"stability/divergence_events": record["divergence_events"]})
    run.log_artifact(args.plots)


def _write_curves(plots: Path, steps_log: list[dict[str, float]], val_log: list[dict[str, float]],
                  title: str) -> None:
    """The learning curves (``steps.csv``, ``val.csv``, ``curves.png``) into the folder ``plots``."""
    with building(plots) as tmp:
        _write_csv(tmp / "steps.csv", steps_log, STEP_FIELDS)
        _write_csv(tmp / "val.csv", val_log, ("epoch", "step", "val_acc", "val_ece"))
        plot_learning_curves(steps_log, val_log, tmp / "curves.png", title=title)


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def run() -> None:
    try:
        main()
    finally:
        if distributed.from_env().enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main_guard(run, {RecoveryExhausted: 3})
