"""Energy landscape along a filter-normalised random direction in weight space (Li et al., 2018).

``curve(alpha) = sum_x E_{theta + alpha d}(x)`` over a fixed sample of training images, with
``d`` a Gaussian direction rescaled filter by filter: for every output filter ``i`` of a
convolution or linear layer, ``d_i <- d_i / ||d_i|| * ||theta_i||``. Biases and batch-norm
parameters get no perturbation (``d = 0``), as in Li et al. The model is evaluated in
eval mode; its weights are restored afterwards.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from jem.data.batches import to_unit_range
from jem.method.models import energy_from_logits


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random direction shaped like the model's parameters, normalised per output filter."""
    direction: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.dim() <= 1:  # biases, batch-norm scales and shifts
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype).to(p.device)
        w_norm = p.detach().flatten(1).norm(dim=1)
        d_norm = d.flatten(1).norm(dim=1)
        scale = w_norm / d_norm.clamp_min(1e-12)
        direction[name] = d * scale.view(-1, *([1] * (p.dim() - 1)))
    return direction


@torch.no_grad()
def energy_sum(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
               device: torch.device | str = "cpu") -> float:
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i:i + batch_size].to(device))
        total += energy_from_logits(model(x).double()).sum().item()
    return total


@torch.no_grad()
def energy_curve(model: nn.Module, images: torch.Tensor, alphas: np.ndarray | list[float],
                 direction: dict[str, torch.Tensor], batch_size: int = 500,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """``sum_x E(x)`` at ``theta + alpha d`` for each ``alpha``."""
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    base = {k: p.detach().clone() for k, p in params.items()}
    out = []
    try:
        for alpha in alphas:
            for k, p in params.items():
                p.copy_(base[k] + float(alpha) * direction[k])
            out.append(energy_sum(model, images, batch_size, device))
    finally:
        for k, p in params.items():
            p.copy_(base[k])
        model.train(was_training)
    return np.asarray(out)


def landscape(model: nn.Module, images: np.ndarray, fraction: float, span: float, points: int, seed: int,
              batch_size: int = 500, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, int]:
    """The curve over a ``fraction`` of ``images`` (at least one, drawn with ``seed``) at ``points``
    values of ``alpha`` in ``[-span, span]``, along the direction drawn with the same ``seed``:
    the alphas, the sums and the number of images."""
    n = max(1, round(fraction * len(images)))
    rng = np.random.default_rng(seed)
    chosen = torch.from_numpy(images[np.sort(rng.choice(len(images), n, replace=False))])
    alphas = np.linspace(-span, span, points)
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    return alphas, energy_curve(model, chosen, alphas, direction, batch_size, device), n
