"""The training objective of JEM and its descendants, and the order of its forward passes.

``L = clf_weight * xent(f(x_lab), y) + px_weight * (E(x+) - E(x-)) + energy_l2 * (E(x+)^2 + E(x-)^2)``

with ``E(x) = -logsumexp_y f(x)[y]`` averaged over each batch (the L2 term squares the batch
means, as the SADA-JEM reference's ``l2_coeff`` term does) and ``x-`` a detached sampler output. The softmax
baselines keep only the cross-entropy.

Each term is its own train-mode forward pass, as in the reference code, so batch norm
normalises the labelled, the data and the sampled batches each with their own statistics.
With the families' batch-norm momentum of 0.9 (90 % weight on the newest batch), the order
of these passes decides what the running statistics, and so eval mode, describe. Every
reference script runs the labelled forward **last**, after the x+ and x- forwards and the
sampler, so eval mode normalises with labelled-data statistics. ``Passes`` keeps that order:
``pos`` (x+, before the sampler when ``objective.pos_forward`` says so), then ``neg`` (x-),
then ``labelled``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jem.config import ObjectiveConfig
from jem.models import energy_from_logits


@dataclass
class Passes:
    """The logits of one iteration's forward passes, filled in the reference order."""

    pos: torch.Tensor | None = None  # f(x+)
    neg: torch.Tensor | None = None  # f(x-)
    labelled: torch.Tensor | None = None  # f(x_lab), always the last train-mode forward


def forward_passes(model: nn.Module, x_lab: torch.Tensor, x_pos: torch.Tensor | None,
                   x_neg: torch.Tensor | None, pos: torch.Tensor | None = None) -> Passes:
    """The loss forwards that follow the sampler: x+ (unless ``pos`` already holds its logits,
    computed before the sampler), x-, then the labelled batch last."""
    passes = Passes(pos=pos)
    if x_neg is not None:
        if passes.pos is None and x_pos is not None:
            passes.pos = model(x_pos)
        passes.neg = model(x_neg.detach())
    passes.labelled = model(x_lab)
    return passes


def loss_from_passes(passes: Passes, y: torch.Tensor,
                     cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and detached per-term statistics (kept on device; no host sync)."""
    logits = passes.labelled
    if logits is None:
        raise ValueError("the objective needs the labelled forward")
    l_clf = F.cross_entropy(logits, y)
    loss = cfg.clf_weight * l_clf
    stats = {
        "loss_clf": l_clf.detach(),
        "acc_train": (logits.detach().argmax(1) == y).float().mean(),
    }
    if cfg.generative:
        if passes.pos is None or passes.neg is None:
            raise ValueError("the generative objective needs both x+ and x- forwards")
        e_pos = energy_from_logits(passes.pos)
        e_neg = energy_from_logits(passes.neg)
        l_gen = e_pos.mean() - e_neg.mean()
        loss = loss + cfg.px_weight * l_gen
        if cfg.energy_l2 > 0:  # squares of the batch means, as train_sadajem.py's l2_coeff term
            loss = loss + cfg.energy_l2 * (e_pos.mean().square() + e_neg.mean().square())
        stats.update({
            "loss_gen": l_gen.detach(),
            "energy_pos": e_pos.detach().mean(),
            "energy_neg": e_neg.detach().mean(),
        })
    stats["loss"] = loss.detach()
    return loss, stats


def jem_loss(model: nn.Module, x_lab: torch.Tensor, y: torch.Tensor, x_pos: torch.Tensor | None,
             x_neg: torch.Tensor | None, cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole objective from scratch: x+, x-, then the labelled forward (the reference order
    when the sampler has already run), and the loss."""
    if cfg.generative and (x_pos is None or x_neg is None):
        raise ValueError("the generative objective needs both x+ and x- batches")
    passes = forward_passes(model, x_lab, x_pos if cfg.generative else None, x_neg if cfg.generative else None)
    return loss_from_passes(passes, y, cfg)
