"""Out-of-distribution detection scores and AUROC, as in JEM, JEM++ and SADA-JEM.

Three scores, each larger for inputs the model deems in-distribution:

* ``log_px``: ``log p(x)`` up to the constant ``log Z``: ``logsumexp_y f(x)[y] = -E(x)``;
* ``max_prob``: ``max_y p(y|x)``, the softmax confidence;
* ``grad_norm``: ``-|| d log p(x) / dx ||_2`` per image (flat low-energy regions are typical
  of the data).

AUROC treats the in-distribution test set as the positive class (scikit-learn's
``roc_auc_score``), so 0.5 is chance and 1 is perfect separation.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from jem.data.batches import to_unit_range
from jem.data.datasets import subset_indices

T = TypeVar("T", np.ndarray, torch.Tensor)

SCORES = ("log_px", "max_prob", "grad_norm")


def ood_subset(images: T, limit: int | None, seed: int) -> T:
    """At most ``limit`` of ``images`` (an array or a tensor), drawn with ``seed``, in their order: the
    images scored of the test set and of each OOD set (``evaluate.ood_max``)."""
    idx = subset_indices(len(images), limit, seed)
    return images if idx is None else images[idx]


def ood_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
               device: torch.device | str = "cpu", progress: bool = False,
               desc: str = "ood scores") -> dict[str, np.ndarray]:
    """The three scores of every image (uint8 or [-1, 1] floats), model in eval mode."""
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in SCORES}
    try:
        for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc=desc, unit="batch"):
            x = to_unit_range(images[i:i + batch_size].to(device)).requires_grad_(True)
            logits = model(x)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            lse = torch.logsumexp(logits, dim=1)
            (grad,) = torch.autograd.grad(lse.sum(), [x])
            out["log_px"].append(lse.detach().cpu())
            out["max_prob"].append(torch.softmax(logits.detach(), 1).amax(1).cpu())
            out["grad_norm"].append(-grad.flatten(1).norm(dim=1).cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve separating in-distribution (positive) from OOD inputs."""
    if len(in_scores) == 0 or len(out_scores) == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD score")
    from sklearn.metrics import roc_auc_score  # here: scikit-learn costs a second at start-up

    labels = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    return float(roc_auc_score(labels, np.concatenate([in_scores, out_scores])))
