"""The training session (``jem.method.session``) on its own, without DVC or MLflow: a divergence rolled back
and remedied, given up on, or (recovery off) recorded; ``best_val.pt`` following validation; a resumed session
ending where an uninterrupted one ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from jem.evaluation.metrics import accuracy, predict_logits
from jem.method.session import Outcome, RecoveryExhausted, TrainingSession, Validate
from jem.method.train import Trainer
from jem.runtime.checkpoint import CheckpointDir, load_verified

from .conftest import tiny_variant
from .test_recovery import inject_nan

# tiny_variant on tiny_data: 6 iterations per epoch, 3 epochs; a checkpoint every 2 iterations
RECOVERY = {"max_retries": 2, "remedies": ["lower_lr", "more_steps"]}


class Recorder:
    """Hooks that keep what the session reports."""

    def __init__(self) -> None:
        self.logged: list[int] = []
        self.validations: list[dict[str, Any]] = []
        self.recoveries: list[dict[str, Any]] = []
        self.diverged: list[dict[str, Any]] = []

    def on_log(self, step: int, stats: dict[str, float]) -> None:
        self.logged.append(step)

    def on_validation(self, row: dict[str, Any]) -> None:
        self.validations.append(row)

    def on_recovery(self, event: dict[str, Any]) -> None:
        self.recoveries.append(event)

    def on_diverged(self, stopped: dict[str, Any]) -> None:
        self.diverged.append(stopped)


def new_session(folder: Path, data: tuple[torch.Tensor, torch.Tensor], validate: Validate | None = None,
                keep: int = 2, **overrides: Any) -> tuple[TrainingSession, list[str]]:
    """A resumed session over the checkpoint folder ``folder``, and the list its lines go to."""
    train = {"checkpoint_every": 2, "log_every": 1, **overrides.pop("train", {}), "keep_checkpoints": keep}
    variant = tiny_variant(train=train, **overrides)
    lines: list[str] = []
    session = TrainingSession(lambda: Trainer(variant, *data), CheckpointDir(folder, keep=keep), "tiny",
                              validate=validate, say=lines.append)
    session.resume()
    return session, lines


def test_a_divergence_rolls_back_to_the_last_checkpoint_and_goes_on_with_the_remedy(tmp_path, tiny_data,
                                                                                     monkeypatch):
    seen = inject_nan(monkeypatch, at_steps={7}, times=1)
    session, lines = new_session(tmp_path, tiny_data, recovery=RECOVERY)
    hooks = Recorder()
    outcome = session.run(hooks)
    assert seen == [7] and outcome.finished and outcome.trainer.step == 18
    assert ("diverged at step 7: non-finite loss; retry 1/2: lower_lr, resuming from step 6 "
            "(remedies so far: lower_lr)") in lines
    assert outcome.trainer.remedies == ["lower_lr"] and outcome.trainer is session.trainer
    [event] = hooks.recoveries
    assert outcome.events == [event]
    assert {k: event[k] for k in ("attempt", "step", "epoch", "signal", "remedy", "resumed_from_step")} == {
        "attempt": 1, "step": 7, "epoch": 2, "signal": "non_finite", "remedy": "lower_lr", "resumed_from_step": 6}
    # rolled back to step 6: the read-outs of steps 1-6 from the checkpoint, 7-18 from the remedied run
    assert [row["step"] for row in outcome.steps_log] == list(range(1, 19))
    assert hooks.logged == list(range(1, 19))
    assert outcome.stability() == {
        "diverged": 1, "divergence_events": 1, "events_per_1k_iters": round(1000 / 18, 4),
        "first_divergence_epoch": 2, "divergence_log": [{"step": 7, "epoch": 2, "signal": "non_finite",
                                                         "reason": "non-finite loss", "remedy": "lower_lr"}]}
    metrics = outcome.metrics()
    assert metrics["status"] == "ok" and metrics["recovery_retries"] == 1 and metrics["remedies"] == "lower_lr"
    state, _ = CheckpointDir(tmp_path).latest()
    assert state["step"] == 18 and state["remedies"] == ["lower_lr"] and state["extra"]["recovery_events"] == [event]


def test_when_retries_run_out_the_session_gives_up_naming_the_kept_checkpoint(tmp_path, tiny_data, monkeypatch):
    inject_nan(monkeypatch, at_steps=set(range(5, 100)), times=100)
    session, lines = new_session(tmp_path, tiny_data, recovery=RECOVERY)
    with pytest.raises(RecoveryExhausted) as raised:
        session.run()
    message = str(raised.value)
    assert "non-finite loss at step 5" in message and "after 2 recovery retries (recovery.max_retries = 2)" in message
    assert message.endswith(f"last good checkpoint kept: {tmp_path / 'step-000000004.pt'}")
    assert [e["remedy"] for e in session.events] == ["lower_lr", "more_steps"]
    assert "retry 2/2: more_steps" in lines[-1]
    assert [p.name for p in CheckpointDir(tmp_path).paths()] == ["step-000000002.pt", "step-000000004.pt"]


def test_with_recovery_off_the_session_stops_at_the_divergence_and_records_it(tmp_path, tiny_data, monkeypatch):
    seen = inject_nan(monkeypatch, at_steps={7}, times=1)
    session, lines = new_session(tmp_path, tiny_data, recovery={"enabled": False})
    hooks = Recorder()
    outcome = session.run(hooks)
    assert seen == [7] and not outcome.finished and outcome.trainer.step == 7
    assert outcome.stopped == {"variant": "tiny", "seed": 3, "step": 7, "epoch": 2, "signal": "non_finite",
                               "reason": "non-finite loss", "remedy": "none (recovery.enabled: false)"}
    assert hooks.diverged == [outcome.stopped] and hooks.recoveries == []
    assert lines[-1] == ("tiny seed 3: diverged at step 7 (epoch 2): non-finite loss; recovery.enabled is false, "
                         "so the run stops here and is recorded as diverged")
    record = outcome.stability()
    assert record["diverged"] == 1 and record["first_divergence_epoch"] == 2
    assert record["events_per_1k_iters"] == round(1000 / 7, 4)
    metrics = outcome.metrics()
    assert metrics["status"] == "diverged" and metrics["diverged_at_step"] == 7 and metrics["epochs"] == 1
    assert CheckpointDir(tmp_path).paths()[-1].name == "step-000000006.pt"  # nothing written after it


def test_best_val_follows_validation(tmp_path, tiny_data):
    scores = iter([0.2, 0.5, 0.4])
    best_file = tmp_path / "best_val.pt"
    found: list[int | None] = []  # the epoch of the best_val.pt each validation finds

    def validate(model: torch.nn.Module) -> dict[str, float]:
        found.append(torch.load(best_file, weights_only=True)["epoch"] if best_file.exists() else None)
        return {"val_acc": next(scores), "val_ece": 0.0}

    session, lines = new_session(tmp_path, tiny_data, validate=validate, keep=10)
    hooks = Recorder()
    outcome = session.run(hooks)
    assert found == [None, 1, 2]  # written after epochs 1 and 2 (better), not after epoch 3 (worse)
    assert outcome.best == {"val_acc": 0.5, "epoch": 2, "step": 12}
    assert [row["val_acc"] for row in outcome.val_log] == [0.2, 0.5, 0.4] and hooks.validations == outcome.val_log
    assert "tiny epoch 2: val acc 0.5000" in lines
    best = torch.load(best_file, weights_only=True)
    assert (best["val_acc"], best["epoch"], best["step"]) == (0.5, 2, 12)
    at_12 = load_verified(tmp_path / "step-000000012.pt")  # the checkpoint of that epoch end
    assert all(torch.equal(v, at_12["model"][k]) for k, v in best["model"].items())
    assert torch.equal(best["buffer"]["samples"], at_12["buffer"]["samples"])
    metrics = outcome.metrics()
    assert (metrics["val_acc"], metrics["val_acc_best"], metrics["best_epoch"]) == (0.4, 0.5, 2)


def _same_run(a: Outcome, b: Outcome) -> None:
    sa, sb = a.trainer.model.state_dict(), b.trainer.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the batch-norm running statistics included
    assert torch.equal(a.buffer["samples"], b.buffer["samples"])
    assert a.steps_log == b.steps_log and a.val_log == b.val_log and a.best == b.best


def test_a_resumed_session_ends_where_an_uninterrupted_one_ends(tmp_path, tiny_data, monkeypatch):
    images, labels = tiny_data

    def validate(model: torch.nn.Module) -> dict[str, float]:
        return {"val_acc": accuracy(predict_logits(model, images[:16]), labels[:16]), "val_ece": 0.0}

    two_epochs = {"epochs": 2}
    whole, _ = new_session(tmp_path / "whole", tiny_data, validate=validate, train=two_epochs)
    uninterrupted = whole.run()

    class Killed(Exception):
        pass

    real = Trainer.train_step

    def train_step(self: Trainer) -> dict[str, torch.Tensor]:
        if self.step == 8:  # mid-epoch 2, just after the checkpoint of step 8
            raise Killed
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    first, _ = new_session(tmp_path / "cut", tiny_data, validate=validate, train=two_epochs)
    with pytest.raises(Killed):
        first.run()
    del first
    monkeypatch.setattr(Trainer, "train_step", real)
    second, lines = new_session(tmp_path / "cut", tiny_data, validate=validate, train=two_epochs)
    assert lines == [f"resumed from {tmp_path / 'cut' / 'step-000000008.pt'} at step 8 (epoch 1)"]
    assert len(second.val_log) == 1 and second.best["epoch"] == 1  # epoch 1's validation, from the checkpoint
    resumed = second.run()
    assert resumed.trainer.step == uninterrupted.trainer.step == 12
    assert len(resumed.val_log) == 2
    _same_run(uninterrupted, resumed)
