"""PGD (foolbox) and BPDA+EOT on toy models whose behaviour is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jem.config.variant import SamplerConfig
from jem.evaluation.robustness import (
    ON_UNIT_INTERVAL,
    Purified,
    bpda_eot_accuracy,
    make_attack,
    pgd_accuracy,
    pgd_examples,
)
from jem.method.samplers import sample


class Stripes(nn.Module):
    """Two classes told apart by the mean of the first channel: logit margin 40 * mean(x[:, 0])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, 0].mean(dim=(1, 2))
        return torch.stack([-20 * m, 20 * m], 1)


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    level = torch.where(y == 1, 0.15, -0.15) + 0.1 * (torch.rand(n, generator=g) - 0.5)
    x = level.view(n, 1, 1, 1).expand(n, 3, 4, 4) + 0.02 * torch.randn(n, 3, 4, 4, generator=g)
    return x.clamp(-1, 1), y


def test_foolbox_preprocessing_feeds_the_model_exactly_what_our_predictions_do():
    """The attacks see the network through foolbox's ``(x - 0.5) / 0.5``; the accounting predicts with
    ``2 x - 1``: the same inputs to the last bit, so an attack's success is judged on the model it attacked."""
    import foolbox as fb

    seen: list[torch.Tensor] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    model.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x01 = torch.rand(256, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    fmodel = fb.PyTorchModel(model, device="cpu", **ON_UNIT_INTERVAL)
    assert torch.equal(fmodel(x01), model(2 * x01 - 1))
    assert torch.equal(seen[0], seen[1]) and seen[0].dtype == torch.float32


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_lowers_accuracy_and_stays_in_its_ball(norm):
    x, y = _data()
    model = Stripes().eval()
    # in [0, 1] units the class margin is a shift of ~0.05-0.1 of every first-channel pixel
    eps = [0.0, 0.02, 0.2] if norm == "linf" else [0.0, 0.08, 0.8]
    acc = pgd_accuracy(model, x, y, norm, eps, steps=10, rel_stepsize=0.25, batch_size=32)
    assert acc[0] == 1.0 and acc[2] == 0.0 and acc[0] >= acc[1] >= acc[2]
    x01 = (x + 1) / 2
    for e, adv in zip(eps, pgd_examples(model, x01, y, norm, eps, steps=10, rel_stepsize=0.25), strict=True):
        delta = (adv - x01).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= e + 1e-5).all(), f"{norm} radius {e}: {size.max().item()}"
        assert adv.min() >= 0 and adv.max() <= 1


class Quadratic(nn.Module):
    """logit_c = -|x - m_c|^2 / 2: the sampler's gradient is known, purification is a contraction."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.stack([torch.full((3, 4, 4), -0.5), torch.full((3, 4, 4), 0.5)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((x[:, None] - self.m[None]) ** 2).flatten(2).sum(2)


def test_bpda_backward_is_the_identity():
    model = Quadratic()
    sampler = SamplerConfig(kind="sgld", steps=3, step_size=0.1, noise=0.0)
    x = (torch.rand(5, 3, 4, 4) * 2 - 1).requires_grad_(True)
    w = torch.randn(5, 2)
    (Purified(model, sampler)(x) * w).sum().backward()  # one chain, no input noise
    purified = sample(model, x.detach(), sampler).requires_grad_(True)
    (model(purified) * w).sum().backward()
    assert not torch.allclose(purified, x), "purification must move the input"
    torch.testing.assert_close(x.grad, purified.grad)  # d/dx f(purify(x)) taken as f'(purify(x))


def test_eot_averages_the_gradient_over_draws():
    calls = []

    class Counting(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return Stripes()(x)

    x, y = _data(8)
    import foolbox as fb

    fmodel = fb.PyTorchModel(Counting().eval(), bounds=(-1, 1))
    make_attack("linf", steps=3, eot=4)(fmodel, x, y, epsilons=[0.1])
    # 3 steps x 4 gradient draws, plus foolbox's own forward passes outside the loop
    grad_calls = len(calls)
    calls.clear()
    make_attack("linf", steps=3, eot=1)(fmodel, x, y, epsilons=[0.1])
    assert grad_calls - len(calls) == 3 * 3


def test_bpda_eot_attack_keeps_clean_accuracy_and_breaks_a_purified_classifier_at_large_radius():
    x, y = _data(32)
    model = Stripes().eval()
    sampler = SamplerConfig(kind="sgld", steps=2, step_size=0.01, noise=0.01)
    acc = bpda_eot_accuracy(model, sampler, x, y, "linf", [0.0, 0.2], steps=5, eot=2, chains=3, input_noise=0.01,
                            rel_stepsize=0.5, batch_size=16)
    assert acc[0] == 1.0 and acc[1] == 0.0


def test_purified_logits_average_noisy_chains():
    model = Quadratic()
    sampler = SamplerConfig(kind="sgld", steps=2, step_size=0.1, noise=0.0)
    x = torch.rand(4, 3, 4, 4) * 2 - 1
    torch.manual_seed(3)
    got = Purified(model, sampler, chains=3, input_noise=0.05)(x)
    torch.manual_seed(3)
    noisy = x.repeat_interleave(3, 0)
    noisy = noisy + 0.05 * torch.randn_like(noisy)
    want = model(sample(model, noisy, sampler)).view(4, 3, 2).mean(1)
    torch.testing.assert_close(got, want)


class _BandFn(torch.autograd.Function):
    """Misclassifies (class 0) only while mean(x[:, 0]) is in (0, 0.2); the gradient always
    pushes every pixel down, so PGD walks through the band and out of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        m = x[:, 0].mean(dim=(1, 2))
        inside = (m > 0) & (m < 0.2)
        return torch.stack([torch.where(inside, 10.0, -10.0), torch.zeros_like(m)], 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -torch.ones(ctx.shape, dtype=grad.dtype, device=grad.device)


class Band(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BandFn.apply(x)


def test_an_image_broken_by_any_iterate_counts_as_broken():
    # class 1 images at level 0.3 (model units); L-inf radius 0.2 on [0, 1] = 0.4 here, step 0.1:
    # the iterates' mean goes 0.3, 0.2, 0.1, ... through the band (0, 0.2) and ends at -0.1 (correct)
    x, y = torch.full((8, 3, 4, 4), 0.3), torch.ones(8, dtype=torch.long)
    model = Band().eval()
    args = dict(norm="linf", epsilons=[0.0, 0.2], steps=10, rel_stepsize=0.25, batch_size=4)
    assert pgd_accuracy(model, x, y, success="final", **args) == [1.0, 1.0]  # foolbox's final iterate only
    assert pgd_accuracy(model, x, y, success="any_iterate", **args) == [1.0, 0.0]
    fooled: list[torch.Tensor] = []
    final = pgd_examples(model, (x + 1) / 2, y, "linf", [0.2], steps=10, rel_stepsize=0.25, fooled=fooled)[0]
    assert fooled[0].all() and (final * 2 - 1).mean() == pytest.approx(-0.1, abs=1e-5)
    # a fixed step (the reference's 2/255) replaces the relative one
    assert make_attack("linf", 5, rel_stepsize=0.5, abs_stepsize=2 / 255).abs_stepsize == pytest.approx(2 / 255)


class _WrongAtCleanPoints(nn.Module):
    """Wrong (the other class) exactly at the given clean images, right anywhere else, with a zero
    gradient: no PGD iterate (random start included) fools it, only the clean points do."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x, self.y = x, y

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dist = (z[:, None] - self.x[None]).flatten(2).abs().amax(-1)  # (batch, stored)
        nearest = dist.argmin(1)
        label = self.y[nearest]
        label = torch.where(dist.min(1).values < 1e-6, 1 - label, label)
        return 10 * nn.functional.one_hot(label, 2).float() + 0 * z.sum(dim=(1, 2, 3))[:, None]


def test_an_image_wrong_when_clean_counts_as_broken_under_any_iterate():
    """The reference's accounting starts from clean correctness: a model wrong only at the clean
    points has robust accuracy 0, not 1, at every radius (robust accuracy never exceeds clean)."""
    x, y = _data(8)
    model = _WrongAtCleanPoints(x, y).eval()
    with torch.no_grad():
        assert (model(x).argmax(1) != y).all()  # clean accuracy 0
    args = dict(norm="linf", epsilons=[2 / 255, 8 / 255], steps=3, batch_size=4)
    assert pgd_accuracy(model, x, y, success="any_iterate", **args) == [0.0, 0.0]
    assert pgd_accuracy(model, x, y, success="final", **args) == [1.0, 1.0]  # foolbox's own: the final iterate
