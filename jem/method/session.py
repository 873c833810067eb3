"""One training run around ``jem.method.train.Trainer``: epoch by epoch, validated, checkpointed,
resumable, recovering from divergence.

Checkpoints (a ``jem.runtime.checkpoint.CheckpointDir``) hold the whole training state,
checksummed; they are written every ``train.checkpoint_every`` iterations and at each epoch end,
the newest ``train.keep_checkpoints`` kept. A session started on a folder that holds some
continues from the newest intact one (a damaged file is reported and the one before it used).
Checkpoints written for different params are set aside (``stale/``) and training starts over.

When training diverges (``jem.method.train.Trainer.divergence``), the run rolls back to its last
good checkpoint and applies the variant's ``recovery`` remedies, each event reported; once
``recovery.max_retries`` retries are spent ``RecoveryExhausted`` says so in one line and the last
good checkpoint stays. With ``recovery.enabled: false`` the run stops at its first divergence
instead, and its outcome records where (iteration, epoch, signal). Every run's record counts its
divergence events (``divergence_events``, ``events_per_1k_iters``, ``first_divergence_epoch``; the
events themselves in ``divergence_log``).

Validation and reporting come from the caller: ``validate(model)`` scores the weights (the train
stage measures accuracy and calibration with ``jem.evaluation.metrics``, a layer above this one),
and a ``SessionHooks`` object hears of every read-out, validation, recovery and divergence (the
train stage logs them to MLflow). Under data parallelism (``jem.runtime.distributed``) every rank
runs the session; rank 0 validates and writes the checkpoints (with every rank's buffer shard) and
``best_val.pt``, and a run resumes on any number of processes.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from jem.method.models import save_model
from jem.method.train import DivergenceError, Trainer
from jem.runtime import distributed
from jem.runtime.checkpoint import CheckpointDir
from jem.runtime.distributed import barrier

# the columns of the learning curves' steps.csv (a read-out's statistics) and val.csv (a validation)
STEP_FIELDS = ("step", "epoch", "loss", "loss_clf", "loss_gen", "energy_pos", "energy_neg", "acc_train",
               "saturation", "lr")
VAL_FIELDS = ("epoch", "step", "val_acc", "val_ece")
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


def quiet(message: str) -> None:
    """The log of ranks other than 0."""


class SessionHooks(Protocol):
    """What a session reports while it runs (the train stage logs it to MLflow); the bodies here do nothing."""

    def on_log(self, step: int, stats: dict[str, float]) -> None:
        """The training statistics averaged over the iterations up to ``step``."""

    def on_validation(self, row: dict[str, Any]) -> None:
        """A validation row: epoch, step and what ``validate`` returned (rank 0 only)."""

    def on_recovery(self, event: dict[str, Any]) -> None:
        """A divergence rolled back: step, reason, the remedy, the step it resumes from."""

    def on_diverged(self, stopped: dict[str, Any]) -> None:
        """The divergence a run with recovery off stops at."""


class NoHooks(SessionHooks):
    """Hooks that report nothing."""


Validate = Callable[[torch.nn.Module], dict[str, float] | None]


@dataclass
class Outcome:
    """How a session ended: finished, or stopped at a divergence (``stopped``, recovery off)."""

    trainer: Trainer
    steps_log: list[dict[str, float]]
    val_log: list[dict[str, float]]
    best: dict[str, Any]
    events: list[dict[str, Any]]
    seconds: float
    stopped: dict[str, Any] | None  # variant, seed, step, epoch, signal, reason, remedy
    buffer: dict[str, torch.Tensor] | None  # the final replay buffer: every rank's samples and labels

    @property
    def finished(self) -> bool:
        return self.stopped is None

    def stability(self) -> dict[str, Any]:
        """The divergence record over the iterations run (to the divergence, for a stopped run)."""
        return stability(self.events, self.trainer.step if self.stopped is None else self.stopped["step"])

    def save_final(self, path: str | Path) -> None:
        """The final weights with the variant, the replay buffer, where the run ended and its remedies."""
        t = self.trainer
        save_model(path, t.model, t.variant.to_dict(), buffer=self.buffer, step=t.step, epoch=t.epoch,
                   dataset=t.variant.dataset, remedies=t.remedies)

    def write_logs(self, folder: Path) -> None:
        """The read-outs and validations as ``steps.csv`` and ``val.csv`` in ``folder`` (the learning curves)."""
        for name, rows, fields in (("steps.csv", self.steps_log, STEP_FIELDS), ("val.csv", self.val_log, VAL_FIELDS)):
            with open(folder / name, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
                writer.writeheader()
                writer.writerows({k: row.get(k, "") for k in fields} for row in rows)

    def summary(self) -> str:
        """One line on a finished run: steps, seconds, the last validation accuracy, the recoveries."""
        val_text = f"{self.val_log[-1]['val_acc']:.4f}" if self.val_log else "n/a"
        recoveries = ",".join(self.trainer.remedies) or "none"
        return (f"{self.trainer.step} steps in {self.seconds:.0f}s, val acc {val_text}"
                + (f", {len(self.events)} recoveries ({recoveries})" if self.events else ""))

    def metrics(self) -> dict[str, Any]:
        """The run's training metrics (the train stage's metrics file)."""
        val_acc = self.val_log[-1]["val_acc"] if self.val_log else None
        if self.stopped is not None:
            s = self.stopped
            return {"status": "diverged", "seed": s["seed"], "recovery": "off", "steps": s["step"],
                    "epochs": s["epoch"] - 1, "train_seconds": round(self.seconds, 2), "diverged_at_epoch": s["epoch"],
                    "diverged_at_step": s["step"], "reason": s["reason"], "val_acc": val_acc, **self.stability()}
        trainer, variant, best = self.trainer, self.trainer.variant, self.best
        last = self.steps_log[-1] if self.steps_log else {}
        return {
            "steps": trainer.step, "epochs": trainer.epoch, "train_seconds": round(self.seconds, 2),
            "images_per_second": round(trainer.step * variant.train.batch_size / max(self.seconds, 1e-9), 2),
            "train_loss": last.get("loss"), "train_acc": last.get("acc_train"),
            "val_acc": val_acc,
            "val_acc_best": best["val_acc"] if best["epoch"] >= 0 else None,
            "best_epoch": best["epoch"] if best["epoch"] >= 0 else None,
            "recovery_retries": len(self.events), "remedies": ",".join(trainer.remedies) or "none",
            "status": "ok", "seed": variant.train.seed, "recovery": "on" if variant.recovery.enabled else "off",
            **self.stability(),
        }


class TrainingSession:
    """A variant's training run over the checkpoint folder ``checkpoints``: ``resume()``, then ``run()``.

    ``new_trainer`` builds a fresh ``Trainer`` (one now, another for each recovery); ``validate``
    scores the weights every ``val_every`` epochs and at the end (None, or a None score: no
    validation); ``say`` is the log (``quiet`` on ranks other than 0), which hears first how the
    trainer runs (compiled, data parallel); ``name`` labels its lines and the divergence record.
    The state a checkpoint carries (the logs, the best validation score, the recovery events, the
    seconds trained) lives in the fields below.
    """

    def __init__(self, new_trainer: Callable[[], Trainer], checkpoints: CheckpointDir, name: str,
                 validate: Validate | None = None, val_every: int = 1, say: Callable[[str], None] = quiet) -> None:
        self.new_trainer = new_trainer
        self.trainer = new_trainer()
        self.variant = self.trainer.variant
        self.dist = self.trainer.dist
        self.checkpoints = checkpoints
        self.best_path: Path = checkpoints.folder / "best_val.pt"
        self.name = name
        self.validate = validate
        self.val_every = val_every
        self.say = say
        if self.trainer.perf.compile:
            say(f"{name}: {self.trainer.compiled}")
        if self.dist.enabled:
            say(f"{name}: data parallel over {self.dist.world} processes ({self.trainer.device.type}), "
                f"{self.variant.train.batch_size // self.dist.world} labelled images per process and step")
        self.hooks: SessionHooks = NoHooks()
        self.steps_log: list[dict[str, float]] = []
        self.val_log: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"val_acc": -1.0, "epoch": -1}
        self.events: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._start = time.perf_counter()

    def _restore(self, extra: dict[str, Any]) -> None:
        self.steps_log = extra.get("steps_log", [])
        self.val_log = extra.get("val_log", [])
        self.best = extra.get("best", {"val_acc": -1.0, "epoch": -1})

    def resume(self) -> None:
        """Load the newest intact checkpoint into the trainer and the session (nothing to load: start over)."""
        trainer, checkpoints, say = self.trainer, self.checkpoints, self.say
        # rank 0 reads and sends: the other machines of a multi-node run need no shared filesystem
        found = distributed.broadcast_object(checkpoints.latest(say) if trainer.dist.is_main else None, trainer.dist)
        if found is None:
            return
        state, path = found
        try:
            extra = trainer.load_state_dict(state)
        except ValueError as exc:  # written for other params
            barrier(trainer.dist)  # every rank has read it before rank 0 moves it
            if trainer.dist.is_main:
                checkpoints.set_aside(f"{path}: {exc}", say)
            barrier(trainer.dist)
            return
        moved = (f"; it was written by {state.get('world', 1)} process(es), this run has {trainer.dist.world}: "
                 "buffer shards regrouped, slot draws reseeded") if trainer.resharded else ""
        say(f"resumed from {path} at step {trainer.step} (epoch {trainer.epoch}){moved}")
        self._restore(extra)
        self.events = extra.get("recovery_events", [])
        self.seconds = float(extra.get("seconds", 0.0))

    def state_now(self) -> dict[str, Any]:
        """The session's own state, as the checkpoints carry it."""
        elapsed = self.seconds + time.perf_counter() - self._start
        return {"steps_log": self.steps_log, "val_log": self.val_log, "best": self.best, "seconds": elapsed,
                "recovery_events": self.events}

    def save_checkpoint(self, best_now: bool = False) -> None:
        """A checkpoint of the trainer and the session (rank 0 writes it; every rank calls this), with
        ``best_val.pt`` first when ``best_now``."""
        t = self.trainer
        state = t.state_dict(extra=self.state_now())  # collective under data parallelism
        if self.dist.is_main:
            if best_now:  # the weights and the replay buffer of one moment: sample.select best_val scores them;
                buffer = state["buffer"]  # written before the checkpoint that records it as the best
                save_model(self.best_path, t.model, self.variant.to_dict(), **self.best,
                           buffer=None if buffer is None else {"samples": buffer["samples"],
                                                               "labels": buffer["labels"]})
            self.checkpoints.save(state, t.step)
        barrier(self.dist)

    def recover(self, exc: DivergenceError) -> None:
        """Roll back to the last good checkpoint and apply the next remedy, or give up (RecoveryExhausted)."""
        recovery = self.variant.recovery
        attempt = len(self.events) + 1
        if attempt > recovery.max_retries:
            found = self.checkpoints.paths()
            kept = f"last good checkpoint kept: {found[-1]}" if found else "no checkpoint was written"
            raise RecoveryExhausted(f"{exc} after {len(self.events)} recovery retries "
                                    f"(recovery.max_retries = {recovery.max_retries}); {kept}") from None
        fresh = self.new_trainer()
        found = distributed.broadcast_object(self.checkpoints.latest(self.say) if self.dist.is_main else None,
                                             self.dist)
        self._restore(fresh.load_state_dict(found[0]) if found is not None else {})
        planned = [fresh.planned_remedy(k) for k in range(1, attempt + 1)]
        for remedy in planned[len(fresh.remedies):]:  # remedies accumulate over retries
            fresh.apply_remedy(remedy)
        event = {"attempt": attempt, "step": exc.step, "epoch": epoch_of(exc.step, fresh.iters_per_epoch),
                 "signal": signal_of(exc.reason), "reason": exc.reason, "remedy": planned[-1],
                 "resumed_from_step": fresh.step, "remedies": list(fresh.remedies),
                 "sampler_steps": fresh.sampler_cfg.steps, "lr": fresh.lr}
        self.events.append(event)
        self.say(f"diverged at step {exc.step}: {exc.reason}; retry {attempt}/{recovery.max_retries}: "
                 f"{planned[-1]}, resuming from step {fresh.step} (remedies so far: {', '.join(fresh.remedies)})")
        self.hooks.on_recovery(event)
        self.trainer = fresh

    def _stop(self, exc: DivergenceError) -> dict[str, Any]:
        """Record the divergence a run with recovery off stops at."""
        stopped = {"variant": self.name, "seed": self.variant.train.seed, "step": exc.step,
                   "epoch": epoch_of(exc.step, self.trainer.iters_per_epoch), "signal": signal_of(exc.reason),
                   "reason": exc.reason, "remedy": "none (recovery.enabled: false)"}
        self.events.append(stopped)
        self.seconds += time.perf_counter() - self._start
        self.say(f"{self.name} seed {stopped['seed']}: diverged at step {exc.step} (epoch {stopped['epoch']}): "
                 f"{exc.reason}; recovery.enabled is false, so the run stops here and is recorded as diverged")
        self.hooks.on_diverged(stopped)
        return stopped

    def _on_log(self, step: int, stats: dict[str, float]) -> None:
        self.steps_log.append({"step": step, "epoch": step / self.trainer.iters_per_epoch, **stats})
        self.hooks.on_log(step, stats)

    def _on_checkpoint(self, t: Trainer) -> None:
        if t.step % t.iters_per_epoch:  # epoch ends are saved by run, after validation
            self.save_checkpoint()

    def _validate(self) -> bool:
        """Validate (rank 0) when due; whether the weights are the best so far."""
        t = self.trainer
        epoch = t.epoch
        if not (self.dist.is_main and self.validate is not None
                and (epoch % self.val_every == 0 or t.step == t.total_steps)):
            return False
        scores = self.validate(t.model)
        if scores is None:
            return False
        row = {"epoch": epoch, "step": t.step, **scores}
        self.val_log.append(row)
        self.hooks.on_validation(row)
        self.say(f"{self.name} epoch {epoch}: val acc {row['val_acc']:.4f}")
        if row["val_acc"] > self.best["val_acc"]:
            self.best = {"val_acc": row["val_acc"], "epoch": epoch, "step": t.step}
            return True
        return False

    def run(self, hooks: SessionHooks | None = None) -> Outcome:
        """Train to the end, or to the first divergence with recovery off; every rank calls it.

        Each epoch ends with a validation (when due) and a checkpoint, ``best_val.pt`` before it when
        the score improved; a divergence with recovery on rolls back (``recover``) and goes on.
        """
        if hooks is not None:
            self.hooks = hooks
        self._start = time.perf_counter()
        stopped: dict[str, Any] | None = None
        while self.trainer.step < self.trainer.total_steps:
            epoch_end = (self.trainer.epoch + 1) * self.trainer.iters_per_epoch
            try:
                self.trainer.fit(until=epoch_end, on_log=self._on_log, on_checkpoint=self._on_checkpoint,
                                 progress=self.dist.is_main)
            except DivergenceError as exc:
                if self.variant.recovery.enabled:
                    self.recover(exc)
                    continue
                stopped = self._stop(exc)
                break
            improved = self._validate()  # on rank 0, which validates
            self.seconds += time.perf_counter() - self._start
            self._start = time.perf_counter()
            self.save_checkpoint(best_now=improved)
        buffer = self.trainer.state_dict()["buffer"]  # every rank's shard (collective)
        if buffer is not None:
            buffer = {"samples": buffer["samples"], "labels": buffer["labels"]}
        return Outcome(self.trainer, self.steps_log, self.val_log, self.best, self.events, self.seconds, stopped,
                       buffer)
