"""The training step and loop: which batch feeds which term, schedules, checkpoints, resume."""

from __future__ import annotations

import math
import os

import pytest
import torch

import jem.method.train
from jem.config.errors import ConfigError
from jem.config.variant import OptimConfig, Variant
from jem.data.batches import to_unit_range
from jem.method.gmm import compute_mixture_stats
from jem.method.objectives import jem_loss
from jem.method.train import LRFactor, Trainer

from .conftest import tiny_variant


def _record_objective_inputs(monkeypatch) -> list[dict[str, torch.Tensor]]:
    calls: list[dict[str, torch.Tensor]] = []
    real = jem.method.train.forward_passes

    def spy(model, x_lab, x_pos, x_neg, pos=None):
        calls.append({"x_lab": x_lab.clone(), "x_pos": None if x_pos is None else x_pos.clone()})
        return real(model, x_lab, x_pos, x_neg, pos=pos)

    monkeypatch.setattr(jem.method.train, "forward_passes", spy)
    return calls


def _rows_in_dataset(batch: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    data = to_unit_range(images).reshape(len(images), -1)
    flat = batch.reshape(len(batch), -1)
    return (flat[:, None, :] == data[None]).all(-1).any(1)


@pytest.mark.parametrize("px_augment", [False, True])
def test_px_term_sees_augmented_images_only_when_configured(monkeypatch, tiny_data, px_augment):
    images, labels = tiny_data
    calls = _record_objective_inputs(monkeypatch)
    variant = tiny_variant(objective={"px_augment": px_augment, "input_noise": 0.0},
                           optim={"sam": "sam", "rho": 0.1})
    trainer = Trainer(variant, images, labels)
    trainer.fit(until=6, progress=False)
    assert len(calls) == 12  # two passes per SAM step
    pos_in_data = torch.cat([_rows_in_dataset(c["x_pos"], images) for c in calls])
    lab_in_data = torch.cat([_rows_in_dataset(c["x_lab"], images) for c in calls])
    if px_augment:  # JEM / JEM++: p(x) batch is augmented like the labelled one
        assert pos_in_data.float().mean() < 0.5
    else:  # SADA-JEM: never an augmented image in the p(x) term
        assert pos_in_data.all()
    assert lab_in_data.float().mean() < 0.5  # the classifier always gets augmented images


def test_softmax_baseline_has_no_sampler_or_buffer(monkeypatch, tiny_data):
    calls = _record_objective_inputs(monkeypatch)
    trainer = Trainer(tiny_variant(objective={"generative": False}), *tiny_data)
    assert trainer.buffer is None and trainer.px_stream is None
    stats = trainer.train_step()
    assert calls[0]["x_pos"] is None and "loss_gen" not in stats


def test_energy_l2_adds_the_squared_energies(tiny_data):
    images, labels = tiny_data
    base = tiny_variant()
    x_lab, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    x_pos, x_neg = torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1
    model = Trainer(base, images, labels).model.eval()
    plain, stats = jem_loss(model, x_lab, y, x_pos, x_neg, base.objective)
    base.objective.energy_l2 = 0.5
    with_l2, _ = jem_loss(model, x_lab, y, x_pos, x_neg, base.objective)
    e_pos = -torch.logsumexp(model(x_pos), 1)
    e_neg = -torch.logsumexp(model(x_neg), 1)
    torch.testing.assert_close(with_l2 - plain, 0.5 * (e_pos.mean().square() + e_neg.mean().square()))
    torch.testing.assert_close(stats["loss_gen"], e_pos.mean() - e_neg.mean())


def test_lr_schedule_warmup_step_and_cosine():
    step = LRFactor(OptimConfig(schedule="step", milestones=[2, 4], gamma=0.2, warmup_iters=5),
                    iters_per_epoch=10, total_iters=60)
    # from 0 at iteration 0, as the reference scripts (lr * cur_iter / warmup_iters)
    assert [step(i) for i in range(6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert step(19) == 1.0 and step(20) == pytest.approx(0.2) and step(40) == pytest.approx(0.04)
    cos = LRFactor(OptimConfig(schedule="cosine", warmup_iters=0), iters_per_epoch=10, total_iters=60)
    assert cos(0) == 1.0 and cos(30) == pytest.approx(0.5) and cos(60) == pytest.approx(0.0, abs=1e-12)
    const = LRFactor(OptimConfig(schedule="constant", warmup_iters=0), 10, 60)
    assert const(59) == 1.0
    # a fractional milestone (the demo decays inside its short run) at round(m * iters_per_epoch)
    frac = LRFactor(OptimConfig(schedule="step", milestones=[1.6, 1.8], gamma=0.5, warmup_iters=0), 10, 20)
    assert [frac(i) for i in (15, 16, 17, 18, 19)] == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.25])


def test_trainer_drives_the_base_optimizer_lr(tiny_data):
    trainer = Trainer(tiny_variant(optim={"sam": "asam", "rho": 1.0}), *tiny_data)
    lrs = []
    for _ in range(4):
        lrs.append(trainer.train_step()["lr"].item())
    assert lrs == pytest.approx([0.0, 0.05 / 3, 0.1 / 3, 0.05])
    scaled = Trainer(tiny_variant(optim={"lr_scale": 0.25, "warmup_iters": 0}), *tiny_data)
    assert scaled.train_step()["lr"].item() == pytest.approx(0.05 * 0.25)


FAMILIES = {
    "jem": {"model": {"norm": "none"}, "optim": {"name": "adam", "lr": 1e-3}},
    "jempp": {"sampler": {"kind": "pyld", "steps": 2, "inner_steps": 2, "step_size": 0.0,
                          "grad_clamp": 1.0, "image_clamp": True, "bn_mode": "train"},
              "buffer": {"init": "gmm"}},
    "sadajem": {"sampler": {"grad_clamp": 1.0, "image_clamp": True, "noise": 0.0, "bn_mode": "train"},
                "buffer": {"init": "gmm"}, "optim": {"sam": "sam", "rho": 0.2},
                "objective": {"px_augment": False}},
    "softmax": {"objective": {"generative": False}, "optim": {"sam": "asam", "rho": 2.0}},
}


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_resume_is_bit_identical(tmp_path, tiny_data, family):
    images, labels = tiny_data
    variant = tiny_variant(**FAMILIES[family])
    mixture = compute_mixture_stats([(images, labels)], 4)
    straight = Trainer(variant, images, labels, mixture=mixture)
    straight.fit(until=9, progress=False)

    first = Trainer(variant, images, labels, mixture=mixture)
    first.fit(until=4, progress=False)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    torch.manual_seed(12345)  # whatever happens in between must not matter
    resumed = Trainer(variant, images, labels, mixture=mixture)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.step == 4
    resumed.fit(until=9, progress=False)

    want, got = _params(straight), _params(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    if straight.buffer is not None:
        assert torch.equal(straight.buffer.samples, resumed.buffer.samples)
    assert straight.optimizer.state_dict()["state"].keys() == resumed.optimizer.state_dict()["state"].keys()
    assert straight.lr == resumed.lr


def test_checkpoint_is_written_atomically_and_refuses_another_variant(tmp_path, tiny_data):
    trainer = Trainer(tiny_variant(), *tiny_data)
    trainer.fit(until=2, progress=False)
    path = tmp_path / "ckpts" / "last.pt"
    trainer.save_checkpoint(path)
    trainer.save_checkpoint(path)  # overwriting is a rename, no temporary file stays behind
    assert os.listdir(path.parent) == ["last.pt"]
    other = Trainer(tiny_variant(sampler={"steps": 3}), *tiny_data)
    with pytest.raises(ValueError, match=r"different variant \(sampler.steps: 2 -> 3\)"):
        other.load_checkpoint(path)
    chatty = Trainer(tiny_variant(train={"log_every": 1}), *tiny_data)
    chatty.load_checkpoint(path)  # logging cadence is not part of the run
    assert chatty.step == 2


def test_divergence_is_reported_not_trained_through(tiny_data):
    trainer = Trainer(tiny_variant(optim={"lr": 1e30, "warmup_iters": 0}), *tiny_data)
    with pytest.raises(jem.method.train.DivergenceError, match=r"non-finite loss.* at step"):
        trainer.fit(until=12, progress=False)


def test_fit_logs_means_every_log_every_steps(tiny_data):
    trainer = Trainer(tiny_variant(), *tiny_data)
    logged: list[tuple[int, dict[str, float]]] = []
    trainer.fit(until=5, on_log=lambda s, m: logged.append((s, m)), progress=False)
    assert [s for s, _ in logged] == [2, 4, 5]
    assert all(math.isfinite(m["loss"]) and 0 <= m["acc_train"] <= 1 for _, m in logged)
    assert {"loss_clf", "loss_gen", "energy_pos", "energy_neg", "lr"} <= set(logged[0][1])


def test_variant_rejects_typos_wrong_types_and_ranges():
    with pytest.raises(ConfigError, match=r"variant.sampler.stpes: unknown key \(did you mean 'steps'\?\)"):
        Variant.from_dict({"sampler": {"stpes": 5}})
    with pytest.raises(ConfigError, match=r"variant.optim.rho = 'big': expected a number"):
        Variant.from_dict({"optim": {"rho": "big"}})
    with pytest.raises(ConfigError, match=r"variant.buffer.reinit_freq = 1.5: expected a fraction in \[0, 1\]"):
        Variant.from_dict({"buffer": {"reinit_freq": 1.5}})
    with pytest.raises(ConfigError, match=r"variant.sampler.steps = 0: expected an integer >= 1"):
        Variant.from_dict({"sampler": {"steps": 0}})
    with pytest.raises(ConfigError, match=r"variant.model.depth = 12"):
        Variant.from_dict({"model": {"depth": 12}})
    assert Variant.from_dict({"optim": {"lr": "1e-4"}}).optim.lr == 1e-4  # YAML 1.1 string floats
