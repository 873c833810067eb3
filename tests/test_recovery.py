"""Divergence: detected, rolled back to the last good checkpoint, remedied, or given up on with one line."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import yaml

import jem.method.train
from jem.method.train import Trainer
from jem.runtime.checkpoint import CheckpointDir
from pipeline.outputs import read_metrics

from .conftest import ROOT, tiny_variant, write_prepared_shapes


def test_divergence_signs():
    trainer = Trainer(tiny_variant(recovery={"energy_limit": 50.0, "saturation_limit": 0.9}),
                      torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.arange(8) % 4)
    healthy = {"loss": 1.0, "energy_pos": -3.0, "energy_neg": -2.0, "saturation": 0.1}
    assert trainer.divergence(healthy) is None
    assert trainer.divergence({**healthy, "loss": math.nan}) == "non-finite loss"
    assert "exploding energy (energy_neg = -80" in trainer.divergence({**healthy, "energy_neg": -80.0})
    assert "saturated samples (95.0% of pixels" in trainer.divergence({**healthy, "saturation": 0.95})


def test_remedies_change_the_run_and_survive_a_checkpoint(tmp_path, tiny_data):
    variant = tiny_variant(recovery={"remedies": ["lower_lr", "more_steps", "reseed"], "lr_factor": 0.5,
                                     "steps_factor": 2.0}, optim={"warmup_iters": 0})
    trainer = Trainer(variant, *tiny_data)
    trainer.fit(until=2, progress=False)
    lr = trainer.lr
    assert [trainer.planned_remedy(k) for k in (1, 2, 3, 4)] == ["lower_lr", "more_steps", "reseed", "reseed"]
    trainer.apply_remedy("lower_lr")
    trainer.apply_remedy("more_steps")
    assert trainer.lr == pytest.approx(lr / 2) and trainer.sampler_cfg.steps == 2 * variant.sampler.steps
    assert trainer.train_step()["lr"].item() == pytest.approx(lr / 2)  # the schedule keeps the lower base
    trainer.save_checkpoint(tmp_path / "c.pt")
    other = Trainer(tiny_variant(recovery={"max_retries": 9}, optim={"warmup_iters": 0}), *tiny_data)
    other.load_checkpoint(tmp_path / "c.pt")  # recovery settings do not make it another run
    assert other.remedies == ["lower_lr", "more_steps"] and other.sampler_cfg.steps == 2 * variant.sampler.steps
    assert other.lr == pytest.approx(trainer.lr)
    torch.manual_seed(0)
    a = torch.rand(3)
    trainer.apply_remedy("reseed")
    torch.manual_seed(0)
    trainer.apply_remedy("reseed")
    assert not torch.equal(torch.rand(3), a)  # a reseed draws other random numbers


# ---- the train stage, in-process, with a NaN injected into the loss -----------------------------


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["scale"] = "tiny"
    params["scales"]["tiny"]["variant"]["train"].update(epochs=3, checkpoint_every=2, log_every=1)
    params["methods"]["jem_k20"]["recovery"] = {"max_retries": 2, "remedies": ["lower_lr", "more_steps"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = tmp_path / "data" / "tiny" / "cifar10"
    write_prepared_shapes(data, 80)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["train", "--variant", "jem_k20", "--data", "data/tiny", "--gmm", "gmm/tiny",
                                      "--out", "models/v", "--metrics", "metrics/v.json", "--plots", "plots/v",
                                      "--checkpoints", "checkpoints/v"])
    return tmp_path


def inject_nan(monkeypatch, at_steps: set[int], times: int) -> list[int]:
    """The loss of the steps in ``at_steps`` becomes NaN, the first ``times`` times they run."""
    seen: list[int] = []
    real = jem.method.train.Trainer.train_step

    def train_step(self):
        stats = real(self)
        if self.step in at_steps and len(seen) < times:
            seen.append(self.step)
            stats["loss"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(jem.method.train.Trainer, "train_step", train_step)
    return seen


def run_stage() -> int:
    from pipeline.common import main_guard
    from stages.train import RecoveryExhausted, main

    try:
        main_guard(main, {RecoveryExhausted: 3})
    except SystemExit as exit_:
        return int(exit_.code)
    return 0


def test_injected_nan_is_rolled_back_and_remedied(stage_dir, monkeypatch, capsys):
    seen = inject_nan(monkeypatch, at_steps={7}, times=1)
    assert run_stage() == 0
    out = capsys.readouterr().out
    assert seen == [7]
    assert "diverged at step 7: non-finite loss; retry 1/2: lower_lr, resuming from step 6" in out
    metrics = read_metrics(stage_dir / "metrics" / "v.json")  # numbers and notes (remedies) joined
    assert metrics["steps"] == 12 and metrics["recovery_retries"] == 1 and metrics["remedies"] == "lower_lr"
    # the stability record: one event at iteration 7, in epoch 2 (4 iterations per epoch), per 1,000 of 12
    assert metrics["status"] == "ok" and metrics["recovery"] == "on"
    assert metrics["diverged"] == 1 and metrics["divergence_events"] == 1
    assert metrics["events_per_1k_iters"] == pytest.approx(1000 / 12, abs=1e-3)
    assert metrics["first_divergence_epoch"] == 2
    assert metrics["divergence_log"] == [{"step": 7, "epoch": 2, "signal": "non_finite", "reason": "non-finite loss",
                                          "remedy": "lower_lr"}]
    final = torch.load(stage_dir / "models" / "v" / "final.pt", weights_only=True)
    assert final["remedies"] == ["lower_lr"]
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{stage_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("jem-tiny").experiment_id],
                             filter_string="tags.dvc_stage = 'train@jem_k20'")[0]
    assert run.data.tags["recovery.1"] == "step 7: non-finite loss; lower_lr; resumed from step 6"
    assert run.data.metrics["recovery/retries"] == 1 and run.info.status == "FINISHED"


def test_checkpoints_written_for_other_params_are_set_aside_and_training_starts_over(stage_dir, capsys):
    """A rerun after a params edit does not resume the old run's checkpoints: they move to stale/ (kept),
    one line says why, and the stage trains from step 0 under the new settings."""
    assert run_stage() == 0
    folder = stage_dir / "checkpoints" / "v"
    before = sorted(p.name for p in folder.glob("step-*.pt"))
    assert before
    capsys.readouterr()
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["scales"]["tiny"]["variant"]["optim"]["warmup_iters"] = 5
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert run_stage() == 0
    out = capsys.readouterr().out
    assert f"moved {len(before)} checkpoint(s) to checkpoints/v/stale and starting over" in out, out
    assert "resumed from" not in out
    assert sorted(p.name for p in (folder / "stale").glob("step-*.pt")) == before
    assert read_metrics(stage_dir / "metrics" / "v.json")["steps"] == 12


def test_when_retries_run_out_the_stage_stops_with_one_line_and_keeps_the_last_good_checkpoint(
        stage_dir, monkeypatch, capsys):
    inject_nan(monkeypatch, at_steps=set(range(5, 100)), times=100)
    assert run_stage() == 3
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    err = errors[0]
    assert "non-finite loss at step 5" in err and "after 2 recovery retries" in err
    assert "last good checkpoint kept: checkpoints/v/step-000000004.pt" in err
    assert "retry 2/2: more_steps" in captured.out
    assert not (stage_dir / "models" / "v").exists() and not (stage_dir / "metrics" / "v.json").exists()
    state, _ = CheckpointDir(stage_dir / "checkpoints" / "v").latest()
    assert state["step"] == 4 and np.isfinite(state["extra"]["steps_log"][-1]["loss"])


def test_with_recovery_off_a_divergence_stops_the_run_and_every_later_stage_says_so(stage_dir, monkeypatch, capsys):
    """recovery.enabled: false: the run stops at its first divergence, the stage succeeds, and sample,
    evaluate, robustness, fid and the report mark it "diverged at epoch e" instead of failing."""
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["methods"]["jem_k20"]["recovery"] = {"enabled": False}
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seen = inject_nan(monkeypatch, at_steps={7}, times=1)
    monkeypatch.setattr(sys, "argv", ["train", "--variant", "jem_k20", "--seed", "1", "--data", "data/tiny",
                                      "--gmm", "gmm/tiny", "--out", "models/tiny/jem_k20/seed1",
                                      "--metrics", "metrics/tiny/train/jem_k20/seed1.json",
                                      "--plots", "plots/tiny/train/jem_k20/seed1",
                                      "--checkpoints", "checkpoints/tiny/jem_k20/seed1"])
    assert run_stage() == 0 and seen == [7]
    assert "diverged at step 7 (epoch 2): non-finite loss; recovery.enabled is false" in capsys.readouterr().out
    model = stage_dir / "models" / "tiny" / "jem_k20" / "seed1"
    assert sorted(p.name for p in model.iterdir()) == ["diverged.json"]  # no weights
    metrics = read_metrics(stage_dir / "metrics" / "tiny" / "train" / "jem_k20" / "seed1.json")
    assert metrics["status"] == "diverged" and metrics["diverged_at_epoch"] == 2 and metrics["diverged_at_step"] == 7
    assert metrics["recovery"] == "off" and metrics["divergence_events"] == 1 and metrics["diverged"] == 1
    assert metrics["first_divergence_epoch"] == 2 and metrics["events_per_1k_iters"] == pytest.approx(1000 / 7, 1e-3)
    assert (stage_dir / "plots" / "tiny" / "train" / "jem_k20" / "seed1" / "curves.png").exists()

    from pipeline.common import main_guard
    from stages import evaluate, fid, robustness, sample

    later = {
        "sample": (sample.main, ["--model", str(model), "--gmm", "gmm/tiny", "--out", "samples/tiny/jem_k20/seed1"]),
        "evaluate": (evaluate.main, ["--model", str(model), "--data", "data/tiny", "--metrics",
                                     "metrics/tiny/eval/jem_k20/seed1.json",
                                     "--plots", "plots/tiny/eval/jem_k20/seed1"]),
        "robustness": (robustness.main, ["--model", str(model), "--data", "data/tiny", "--metrics",
                                         "metrics/tiny/robustness/jem_k20/seed1.json",
                                         "--plots", "plots/tiny/robustness/jem_k20/seed1"]),
        "fid": (fid.main, ["score", "--samples", "samples/tiny/jem_k20/seed1", "--ref", "fid_ref/tiny",
                           "--metrics", "metrics/tiny/fid/jem_k20/seed1.json"]),
    }
    for kind, (entry, argv) in later.items():
        monkeypatch.setattr(sys, "argv", [kind, *argv])
        main_guard(entry)
        assert "jem_k20 seed 1: diverged at epoch 2 (iteration 7: non-finite loss" in capsys.readouterr().out, kind
    for kind in ("eval", "robustness", "fid"):
        m = read_metrics(stage_dir / "metrics" / "tiny" / kind / "jem_k20" / "seed1.json")
        assert m["status"] == "diverged" and m["diverged_at_epoch"] == 2, kind
    assert (stage_dir / "plots" / "tiny" / "eval" / "jem_k20" / "seed1" / "DIVERGED.md").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{stage_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jem-tiny").experiment_id])
    assert {r.info.run_name for r in runs if "dvc_stage" in r.data.tags} == {
        f"{k}@jem_k20-1" for k in ("train", "sample", "evaluate", "robustness", "fid")}
    assert all(r.info.status == "FINISHED" and r.data.tags["seed"] == "1" for r in runs if "dvc_stage" in r.data.tags)

    from jem.report.published import build_table
    from jem.report.runs import Runs
    from jem.report.tables import stability_table

    runs_ = Runs(stage_dir / "metrics" / "tiny", ["jem_k20"], [1], read=read_metrics)
    spec = {"columns": ["accuracy", "fid"], "rows": [{"variant": "jem_k20", "label": "JEM", "accuracy": 92.9}]}
    table = build_table(spec, runs_, "buffer", "tiny").data.set_index("variant")
    assert table.loc["jem_k20", "accuracy ours"] == "diverged at epoch 2"
    assert table.loc["jem_k20", "fid ours"] == "diverged at epoch 2"
    stab = stability_table(runs_).set_index("variant").loc["jem_k20"]
    assert stab["diverged / runs"] == "1 / 1" and stab["first divergence epoch"] == "2"
    assert stab["outcome"] == "seed 1: diverged at epoch 2" and stab["recovery"] == "off"
