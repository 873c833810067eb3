"""Adversarial robustness: white-box PGD (foolbox 3) and BPDA+EOT against sampler purification.

Models take images in [-1, 1]; attacks work in pixel space [0, 1] (foolbox's own preprocessing,
``(x - 0.5) / 0.5``, maps one to the other: ``ON_UNIT_INTERVAL``), so an L-inf radius of
``8/255`` means eight grey levels, as in the papers, and an L2 radius is measured on [0, 1] images.

* ``pgd_accuracy``: foolbox's ``LinfPGD`` / ``L2PGD`` (random start) at each radius of a
  sweep; robust accuracy = the fraction of images still classified correctly. With
  ``success="any_iterate"`` (the reference code's accounting, and the stronger attack) an
  image counts as broken when the model misclassifies it clean or at *any* PGD iterate, not
  only at foolbox's final one: the predictions come from the logits the attack's loss already computes at every
  iterate, so it costs no extra forward pass. The step is foolbox's ``rel_stepsize`` times
  the radius, or a fixed ``abs_stepsize`` (the reference: 2/255 under L-inf).
* ``bpda_eot_accuracy``: the defended classifier first *purifies* its input: noisy copies
  of it are moved by a few sampler steps and their logits averaged (JEM's refined logits;
  Hill et al., "Stochastic security"). The attack differentiates through purification as
  the identity (BPDA) and averages the gradient over ``eot`` purification draws per step
  (EOT, by overriding foolbox's ``value_and_grad`` hook).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from jem.config.variant import SamplerConfig, deep_merge
from jem.data.batches import to_unit_range
from jem.method.samplers import sample, without_bn_updates

if TYPE_CHECKING:  # foolbox and eagerpy are imported where an attack is built: the stages start without them
    import eagerpy as ep

NORMS = ("linf", "l2")


def purification_sampler(base: SamplerConfig, bpda: dict[str, Any]) -> SamplerConfig:
    """The variant's sampler as ``robustness.bpda`` purifies with: its ``sampler`` overrides,
    ``purify_steps`` steps, running statistics never updated."""
    merged = deep_merge(dataclasses.asdict(base), {**(bpda.get("sampler") or {}), "steps": int(bpda["purify_steps"])})
    cfg = SamplerConfig(**merged)
    cfg.validate("robustness.bpda.sampler")
    return without_bn_updates(cfg)


# foolbox's model arguments for a network on [-1, 1] attacked on [0, 1] images: ``(x - 0.5) / 0.5``
# is ``2 x - 1`` to the last bit (scaling by a power of two is exact), as the predictions below compute it
ON_UNIT_INTERVAL: dict[str, Any] = {"bounds": (0, 1), "preprocessing": {"mean": 0.5, "std": 0.5}}


class _Identity(torch.autograd.Function):
    """Forward: purification; backward: identity (BPDA)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, purify: Any) -> torch.Tensor:
        with torch.enable_grad():  # the sampler differentiates the energy w.r.t. its input
            return purify(x.detach()).detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class Purified(nn.Module):
    """Classifier defended by sampler purification, on [-1, 1] inputs (JEM's ``refined_logits``).

    Each input is copied ``chains`` times, perturbed by Gaussian noise of std ``input_noise``,
    moved by the sampler (``sampler.steps`` steps from there) and classified; the logits of
    the copies are averaged. The backward pass treats purification as the identity (BPDA).
    """

    def __init__(self, model: nn.Module, sampler: SamplerConfig, chains: int = 1, input_noise: float = 0.0) -> None:
        super().__init__()
        if chains < 1:
            raise ValueError(f"chains must be >= 1, got {chains}")
        self.model = model
        self.sampler = sampler
        self.chains = chains
        self.input_noise = input_noise

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return sample(self.model, x, self.sampler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.repeat_interleave(self.chains, 0)
        if self.input_noise > 0:
            xs = xs + self.input_noise * torch.randn(xs.shape, device=xs.device, dtype=xs.dtype)
        logits = self.model(_Identity.apply(xs, self.purify))
        return logits.view(len(x), self.chains, -1).mean(1)


def _eot(attack_cls: type, draws: int) -> Any:
    class EOT(attack_cls):  # type: ignore[misc, valid-type]
        def value_and_grad(self, loss_fn: Any, x: ep.Tensor) -> tuple[ep.Tensor, ep.Tensor]:
            value, grad = super().value_and_grad(loss_fn, x)
            for _ in range(draws - 1):  # every call purifies afresh
                v, g = super().value_and_grad(loss_fn, x)
                value, grad = value + v, grad + g
            return value / draws, grad / draws

    EOT.__name__ = f"EOT{attack_cls.__name__}"
    return EOT


SUCCESS = ("any_iterate", "final")


def _any_iterate(attack_cls: type) -> Any:
    """``attack_cls`` that also records, per radius, which images any iterate misclassified.

    After a call, ``fooled[k]`` (bool tensor, one per image) belongs to the k-th radius; it
    covers the start point and every iterate the loss was evaluated at (all but the final
    one, which the caller classifies itself).
    """

    class AnyIterate(attack_cls):  # type: ignore[misc, valid-type]
        fooled: list[torch.Tensor]

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            self.fooled = []
            return super().__call__(*args, **kwargs)

        def run(self, model: Any, inputs: Any, criterion: Any, *, epsilon: float, **kwargs: Any) -> Any:
            import eagerpy as ep

            self._seen: torch.Tensor | None = None
            out = super().run(model, inputs, criterion, epsilon=epsilon, **kwargs)
            n = len(inputs.raw if isinstance(inputs, ep.Tensor) else inputs)
            self.fooled.append(self._seen if self._seen is not None else torch.zeros(n, dtype=torch.bool))
            return out

        def get_loss_fn(self, model: Any, labels: ep.Tensor) -> Any:
            import eagerpy as ep

            def loss_fn(inputs: ep.Tensor) -> ep.Tensor:
                logits = model(inputs)
                wrong = (logits.raw.detach().argmax(-1) != labels.raw).cpu()
                self._seen = wrong if self._seen is None else self._seen | wrong
                return ep.crossentropy(logits, labels).sum()

            return loss_fn

    AnyIterate.__name__ = f"AnyIterate{attack_cls.__name__}"
    return AnyIterate


def make_attack(norm: str, steps: int, rel_stepsize: float | None = None, eot: int = 1,
                abs_stepsize: float | None = None, track_iterates: bool = False) -> Any:
    """foolbox PGD under ``norm`` (``linf`` or ``l2``), with EOT gradients when ``eot > 1``.

    ``abs_stepsize`` (pixel scale [0, 1]) overrides ``rel_stepsize``; ``track_iterates``
    records which images any iterate fooled (``attack.fooled``, one tensor per radius).
    """
    import foolbox as fb

    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    cls = fb.attacks.LinfPGD if norm == "linf" else fb.attacks.L2PGD
    if eot > 1:
        cls = _eot(cls, eot)
    if track_iterates:
        cls = _any_iterate(cls)
    kwargs: dict[str, Any] = {"steps": steps, "random_start": True}
    if rel_stepsize is not None:
        kwargs["rel_stepsize"] = rel_stepsize
    if abs_stepsize is not None:
        kwargs["abs_stepsize"] = abs_stepsize
    return cls(**kwargs)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device | str):
    for i in range(0, len(images), batch_size):
        x = (to_unit_range(images[i:i + batch_size].to(device)) + 1) / 2  # [0, 1]
        yield x.clamp(0, 1), labels[i:i + batch_size].to(device).long()


def pgd_examples(model: nn.Module, x01: torch.Tensor, labels: torch.Tensor, norm: str, epsilons: list[float],
                 steps: int, rel_stepsize: float | None = None, abs_stepsize: float | None = None,
                 fooled: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """foolbox PGD adversarials (one tensor per radius) of [0, 1] images; the model as it is.

    When ``fooled`` is a list, it receives per radius which images an iterate before the
    final one misclassified.
    """
    import foolbox as fb

    device = x01.device
    fmodel = fb.PyTorchModel(model, device=device, **ON_UNIT_INTERVAL)
    attack = make_attack(norm, steps, rel_stepsize, abs_stepsize=abs_stepsize, track_iterates=fooled is not None)
    _, clipped, _ = attack(fmodel, x01, labels.to(device), epsilons=list(epsilons))
    if fooled is not None:
        fooled.extend(attack.fooled)
    return list(clipped)


def pgd_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, norm: str,
                 epsilons: list[float], steps: int, rel_stepsize: float | None = None,
                 batch_size: int = 250, device: torch.device | str = "cpu", abs_stepsize: float | None = None,
                 success: str = "any_iterate") -> list[float]:
    """Accuracy under foolbox PGD at each radius (pixel scale [0, 1]); model in eval mode.

    ``success``: ``any_iterate`` counts an image as broken when the model misclassifies it clean
    or at any iterate (the reference code's accounting: ``bpda_eot_attack.py`` starts from the
    clean prediction's correctness, so robust accuracy never exceeds clean accuracy); ``final``
    only when foolbox's final iterate fools it.
    """
    if success not in SUCCESS:
        raise ValueError(f"success must be one of {SUCCESS}, got {success!r}")
    was_training = model.training
    model.eval()
    correct = np.zeros(len(epsilons))
    try:
        for x, y in _batches(images, labels, batch_size, device):
            fooled: list[torch.Tensor] | None = [] if success == "any_iterate" else None
            if fooled is not None:  # the reference starts from the clean prediction: wrong clean is broken
                with torch.no_grad():
                    clean_right = (model(2 * x - 1).argmax(1) == y).cpu()
            for k, adv in enumerate(pgd_examples(model, x, y, norm, epsilons, steps, rel_stepsize, abs_stepsize,
                                                 fooled)):
                with torch.no_grad():
                    right = (model(2 * adv - 1).argmax(1) == y).cpu()
                if fooled is not None:
                    right &= ~fooled[k] & clean_right
                correct[k] += right.sum().item()
    finally:
        model.train(was_training)
    return (correct / len(images)).tolist()


def bpda_eot_accuracy(model: nn.Module, sampler: SamplerConfig, images: torch.Tensor, labels: torch.Tensor,
                      norm: str, epsilons: list[float], steps: int, eot: int = 1, chains: int = 1,
                      input_noise: float = 0.0, rel_stepsize: float | None = None, batch_size: int = 100,
                      device: torch.device | str = "cpu") -> list[float]:
    """Accuracy of the purified classifier (``Purified``) under BPDA+EOT PGD at each radius.

    The attack's gradient at every step is averaged over ``eot`` purification draws; the
    defended prediction on the final adversarials is a fresh purification. Weights in eval
    mode; batch norm during purification follows ``sampler.bn_mode`` (pass a sampler that
    leaves the running statistics alone: ``jem.method.samplers.without_bn_updates``).
    """
    import foolbox as fb

    was_training = model.training
    model.eval()
    defended = Purified(model, sampler, chains=chains, input_noise=input_noise).eval()
    fmodel = fb.PyTorchModel(defended, device=device, **ON_UNIT_INTERVAL)
    attack = make_attack(norm, steps, rel_stepsize, eot=max(1, eot))
    correct = np.zeros(len(epsilons))
    try:
        for x, y in _batches(images, labels, batch_size, device):
            _, clipped, _ = attack(fmodel, x, y, epsilons=list(epsilons))
            for k, adv in enumerate(clipped):
                with torch.no_grad():
                    correct[k] += (defended(2 * adv - 1).argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    return (correct / len(images)).tolist()
