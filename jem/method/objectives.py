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

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jem.config.variant import ObjectiveConfig
from jem.method.models import bn_layers, energy_from_logits


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


def bn_snapshot(model: nn.Module) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each batch norm's running mean, variance and batch count now (before the sampler), as
    copies on the device (no host synchronisation)."""
    return {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in bn_layers(model) if m.track_running_stats}


@contextlib.contextmanager
def grouped_batch_norm(model: nn.Module, sizes: list[int],
                       deferred: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
                       ) -> Iterator[None]:
    """One forward over concatenated batches (``sizes`` rows each, in order) that normalises
    every batch with its own statistics and updates the running statistics batch by batch, in
    order: what separate forwards of the batches compute, with one convolution per layer.

    ``deferred`` (a ``bn_snapshot`` taken before the sampler): the first batch (x+) updates the
    running statistics as if its forward had run at the snapshot, before the sampler's own
    updates (the reference order when x+ is forwarded before a train-mode sampler). The
    updates are linear, so after K updates since the snapshot its share is
    ``(1 - m)^K * m * (batch statistic - snapshot)``. The sampler's outputs never read the
    running statistics in train mode, so this is exact (up to float rounding)."""
    saved = []

    def forward(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        if not m.training or not m.track_running_stats:
            return type(m).forward(m, x)
        if m.momentum is None:
            raise ValueError("grouped batch norm needs a momentum (not a cumulative average)")
        outs = []
        for i, part in enumerate(x.split(sizes)):
            if i == 0 and deferred is not None:
                outs.append(F.batch_norm(part, None, None, m.weight, m.bias, True, 0.0, m.eps))
                with torch.no_grad():
                    mean0, var0, count0 = deferred[m]
                    # updates since the snapshot, on the device: no host synchronisation per layer,
                    # and no graph break when the trunk is compiled
                    k = (m.num_batches_tracked - count0).to(mean0.dtype)
                    share = torch.pow(1.0 - m.momentum, k) * m.momentum
                    flat = part.detach().float().transpose(0, 1).flatten(1)
                    m.running_mean.add_(share * (flat.mean(1) - mean0))
                    m.running_var.add_(share * (flat.var(1, unbiased=True) - var0))
            else:
                outs.append(F.batch_norm(part, m.running_mean, m.running_var, m.weight, m.bias, True,
                                         m.momentum, m.eps))
            m.num_batches_tracked.add_(1)
        return torch.cat(outs)

    for m in bn_layers(model):
        saved.append(m)
        m.forward = functools.partial(forward, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in saved:
            del m.forward


def grouped_passes(model: nn.Module, x_lab: torch.Tensor, x_pos: torch.Tensor | None,
                   x_neg: torch.Tensor | None,
                   deferred: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None) -> Passes:
    """``forward_passes`` in one forward of the concatenated batches (x+, x-, labelled), with
    per-batch batch-norm statistics and running-statistics updates in that order."""
    batches = [x for x in (x_pos, None if x_neg is None else x_neg.detach(), x_lab) if x is not None]
    sizes = [len(x) for x in batches]
    with grouped_batch_norm(model, sizes, deferred if x_pos is not None else None):
        logits = model(torch.cat(batches)).split(sizes)
    if x_neg is None:
        return Passes(labelled=logits[-1])
    return Passes(pos=logits[0], neg=logits[1], labelled=logits[2])


def loss_from_passes(passes: Passes, y: torch.Tensor, cfg: ObjectiveConfig,
                     l2: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and detached per-term statistics (kept on device; no host sync). ``l2``: whether
    this loss carries ``energy_l2`` (``cfg.energy_l2_pass`` decides per SAM pass, in the trainer)."""
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
        # each batch mean once, shared by both terms as train_sadajem.py shares fp and fq: two mean
        # nodes sum their gradients in another float32 order (the L2 parity case drifted by 2.5e-4)
        m_pos, m_neg = e_pos.mean(), e_neg.mean()
        l_gen = m_pos - m_neg
        loss = loss + cfg.px_weight * l_gen
        if cfg.energy_l2 > 0 and l2:  # squares of the batch means, as train_sadajem.py's l2_coeff term
            loss = loss + cfg.energy_l2 * (m_pos.square() + m_neg.square())
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
