"""The training objective of JEM and its descendants.

``L = clf_weight * xent(f(x_lab), y) + px_weight * (E(x+) - E(x-)) + energy_l2 * (E(x+)^2 + E(x-)^2)``

with ``E(x) = -logsumexp_y f(x)[y]`` and ``x-`` a detached sampler output. The softmax
baselines keep only the cross-entropy. Each term is its own forward pass (as in the
reference code), so batch norm sees the labelled, the data and the sampled batches
separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jem.config import ObjectiveConfig
from jem.models import energy_from_logits


def jem_loss(model: nn.Module, x_lab: torch.Tensor, y: torch.Tensor, x_pos: torch.Tensor | None,
             x_neg: torch.Tensor | None, cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and detached per-term statistics (kept on device; no host sync)."""
    logits = model(x_lab)
    l_clf = F.cross_entropy(logits, y)
    loss = cfg.clf_weight * l_clf
    stats = {
        "loss_clf": l_clf.detach(),
        "acc_train": (logits.detach().argmax(1) == y).float().mean(),
    }
    if cfg.generative:
        if x_pos is None or x_neg is None:
            raise ValueError("the generative objective needs both x+ and x- batches")
        e_pos = energy_from_logits(model(x_pos))
        e_neg = energy_from_logits(model(x_neg.detach()))
        l_gen = e_pos.mean() - e_neg.mean()
        loss = loss + cfg.px_weight * l_gen
        if cfg.energy_l2 > 0:
            loss = loss + cfg.energy_l2 * (e_pos.square().mean() + e_neg.square().mean())
        stats.update({
            "loss_gen": l_gen.detach(),
            "energy_pos": e_pos.detach().mean(),
            "energy_neg": e_neg.detach().mean(),
        })
    stats["loss"] = loss.detach()
    return loss, stats
