"""Classification metrics: batched logits, accuracy, expected calibration error.

ECE follows the papers (Guo et al.): confidences ``max_y p(y|x)`` are grouped in M equal-width
bins over [0, 1] (M = 20 in JEM++ and SADA-JEM) and
``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from jem.config.variant import AugmentConfig
from jem.data.batches import prepare, to_unit_range
from jem.method.models import bn_layers


def with_input_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8 or [-1, 1] floats) as [-1, 1] floats plus seeded N(0, sigma^2) noise.

    The JEM and JEM++ evaluation scripts add such noise (sigma 0.03 by default) to test and
    OOD inputs after normalisation; ``sigma`` 0 returns the images unchanged.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return images
    x = to_unit_range(images)
    g = torch.Generator().manual_seed(seed)
    return x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits of ``images`` (uint8 or [-1, 1] floats) in eval mode, on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = to_unit_range(images[i:i + batch_size].to(device))
            out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def with_reestimated_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
                        device: torch.device | str = "cpu", augment: AugmentConfig | None = None,
                        input_noise: float = 0.0, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose batch-norm running statistics are re-estimated on ``images``
    (uint8 or [-1, 1] floats): one pass in batches, the running mean and variance become the
    averages over all batches (``torch.optim.swa_utils.update_bn``).

    ``augment`` and ``input_noise`` prepare each batch as training prepared its labelled
    batches (random crop and flip from a ``seed``-ed generator, then Gaussian noise), so the
    statistics describe the inputs the running statistics were tracking during training,
    averaged over the whole split instead of the last batch. Eval-mode accuracy with these
    statistics against the model's own then shows whether the latter describe labelled data
    (they do when the labelled forward is the last train-mode forward of each iteration, as
    in the reference scripts). A model without batch norm is returned as it is."""
    if not bn_layers(model):
        return model
    import copy

    from torch.optim.swa_utils import update_bn

    copied = copy.deepcopy(model).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, len(images), batch_size):
            yield prepare(images[i:i + batch_size].to(device), augment, input_noise, generator)

    update_bn(batches(), copied)
    return copied.eval()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


@dataclass
class Calibration:
    ece: float
    bin_edges: list[float]
    bin_accuracy: list[float | None]  # None for an empty bin
    bin_confidence: list[float | None]
    bin_count: list[int]


def calibration(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 20) -> Calibration:
    """ECE and the reliability-diagram data of softmax confidences."""
    probs = torch.softmax(logits.double(), dim=1)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin m holds confidences in (edge_m, edge_m+1]; a confidence of exactly 0 cannot occur
    index = torch.clamp(torch.bucketize(conf, edges[1:-1], right=False), 0, n_bins - 1)
    n = len(conf)
    ece = 0.0
    accs: list[float | None] = []
    confs: list[float | None] = []
    counts: list[int] = []
    for m in range(n_bins):
        mask = index == m
        k = int(mask.sum())
        counts.append(k)
        if k == 0:
            accs.append(None)
            confs.append(None)
            continue
        acc_m, conf_m = correct[mask].mean().item(), conf[mask].mean().item()
        accs.append(acc_m)
        confs.append(conf_m)
        ece += k / n * abs(acc_m - conf_m)
    return Calibration(ece=ece, bin_edges=edges.tolist(), bin_accuracy=accs, bin_confidence=confs,
                       bin_count=counts)
