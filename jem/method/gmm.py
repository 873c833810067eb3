"""Informative initialisation (JEM++): a class-wise Gaussian mixture fitted to the training images.

``p0(x) = sum_y pi_y N(mu_y, Sigma_y)`` with ``pi_y = |D_y| / |D|`` and the mean and full
(population) covariance of the un-augmented training images of class y. The statistics are
accumulated in one streaming pass (float64 sums, merged per batch), saved and loaded
explicitly. Draws go through a Cholesky factor of ``Sigma_y + jitter * I`` that is computed
once, and are clamped to [-1, 1] as in the reference code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from jem.config.errors import InputError
from jem.data.batches import to_unit_range
from jem.runtime.checkpoint import atomic_torch_save, load_tensors


@dataclass
class MixtureStats:
    counts: torch.Tensor  # (C,) int64
    means: torch.Tensor  # (C, D) float32
    covs: torch.Tensor  # (C, D, D) float32, population covariance (divides by n)
    shape: tuple[int, ...]  # image shape (C, H, W)

    @property
    def priors(self) -> torch.Tensor:
        return self.counts.double() / self.counts.sum()

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())


def compute_mixture_stats(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          num_classes: int) -> MixtureStats:
    """One pass over ``(x, y)`` batches of un-augmented images in [-1, 1]."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    sums: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    shape: tuple[int, ...] = ()
    for x, y in batches:
        x = to_unit_range(x)
        shape = tuple(x.shape[1:])
        flat = x.reshape(x.shape[0], -1).double()
        if sums is None:
            dim = flat.shape[1]
            sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=flat.device)
            outer = torch.zeros(num_classes, dim, dim, dtype=torch.float64, device=flat.device)
        y = y.to(flat.device)
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise InputError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
        for c in torch.unique(y).tolist():
            xc = flat[y == c]
            counts[c] += xc.shape[0]
            sums[c] += xc.sum(0)
            outer[c].addmm_(xc.T, xc)
    if sums is None or outer is None:
        raise InputError("no data: the mixture statistics need at least one batch")
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise InputError(f"classes {missing} have no training images; cannot fit their Gaussian")
    n = counts.to(sums.device).double()
    means = sums / n[:, None]
    covs = outer / n[:, None, None] - means[:, :, None] * means[:, None, :]
    covs = 0.5 * (covs + covs.transpose(1, 2))
    return MixtureStats(counts=counts, means=means.float().cpu(), covs=covs.float().cpu(),
                        shape=shape)


def save_mixture_stats(stats: MixtureStats, path: str | os.PathLike[str]) -> None:
    atomic_torch_save({"counts": stats.counts, "means": stats.means, "covs": stats.covs,
                       "shape": list(stats.shape)}, Path(path))


def load_mixture_stats(path: str | os.PathLike[str]) -> MixtureStats:
    try:
        d = load_tensors(Path(path), writer="the gmm stage (dvc repro -f gmm)")
        stats = MixtureStats(counts=d["counts"], means=d["means"], covs=d["covs"], shape=tuple(d["shape"]))
    except FileNotFoundError:
        raise InputError(f"{path} not found: it is written by the gmm stage (dvc repro gmm)") from None
    except InputError:  # refused as unsafe
        raise
    except Exception as exc:  # truncated, not a torch file, missing keys
        raise InputError(f"{path}: not readable as mixture statistics ({type(exc).__name__}); "
                         "rerun the gmm stage (dvc repro -f gmm)") from None
    c, dim = stats.means.shape
    if stats.counts.shape != (c,) or stats.covs.shape != (c, dim, dim) or math.prod(stats.shape) != dim:
        raise InputError(f"{path}: inconsistent mixture statistics (counts {tuple(stats.counts.shape)}, "
                         f"means {tuple(stats.means.shape)}, covs {tuple(stats.covs.shape)}, "
                         f"image shape {stats.shape}); rerun the gmm stage")
    return stats


class UniformInit:
    """p0 = U(-1, 1) (JEM)."""

    def __init__(self, shape: tuple[int, ...], num_classes: int) -> None:
        self.shape = tuple(shape)
        self.num_classes = num_classes

    def to(self, device: torch.device | str) -> UniformInit:
        return self

    def sample(self, n: int, y: torch.Tensor | None = None, device: torch.device | str = "cpu",
               dense: bool = False, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand((n, *self.shape), device=device, generator=generator) * 2 - 1
        labels = y.to(device) if y is not None else torch.full((n,), -1, dtype=torch.long, device=device)
        return x, labels


class GaussianMixture:
    """p0 = sum_y pi_y N(mu_y, Sigma_y + jitter I), sampled through cached Cholesky factors."""

    def __init__(self, stats: MixtureStats, jitter: float = 1e-4,
                 device: torch.device | str = "cpu") -> None:
        self.shape = tuple(stats.shape)
        self.num_classes = stats.num_classes
        self.jitter = jitter
        self.priors = stats.priors.float().to(device)
        self.means = stats.means.to(device)
        factors = torch.empty(stats.covs.shape, dtype=torch.float32)
        for c in range(self.num_classes):  # float64 factorisation, one class at a time
            cov = stats.covs[c].double()  # a copy: the jitter goes on its diagonal in place
            cov.diagonal().add_(jitter)
            factor, info = torch.linalg.cholesky_ex(cov)
            if int(info) != 0:
                raise InputError(f"class {c}: covariance + {jitter} I is not positive definite; "
                                 "raise buffer.gmm_jitter")
            factors[c] = factor.float()
        self.factors = factors.to(device)

    def to(self, device: torch.device | str) -> GaussianMixture:
        self.priors = self.priors.to(device)
        self.means = self.means.to(device)
        self.factors = self.factors.to(device)
        return self

    def sample(self, n: int, y: torch.Tensor | None = None, device: torch.device | str | None = None,
               dense: bool = False, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws (clamped to [-1, 1]) and their components; ``y`` fixes the components.

        ``dense`` computes every row through every component's factor in one batched matmul
        and picks each row's own: C times the arithmetic, but no host synchronisation (no
        data-dependent shapes), which is what a GPU training step wants.
        """
        dev = self.means.device
        if y is None:
            comp = torch.multinomial(self.priors, n, replacement=True, generator=generator)
        else:
            comp = y.to(dev).long()
        z = torch.randn(n, self.means.shape[1], device=dev, generator=generator)
        if dense:
            every = torch.matmul(z, self.factors.transpose(1, 2))  # (C, n, D)
            out = every[comp, torch.arange(n, device=dev)] + self.means[comp]
        else:
            out = torch.empty_like(z)
            for c in torch.unique(comp).tolist():  # one matmul per component present
                rows = (comp == c).nonzero().flatten()
                out[rows] = self.means[c] + z[rows] @ self.factors[c].T
        x = out.view(n, *self.shape).clamp(-1.0, 1.0)
        if device is not None:
            x, comp = x.to(device), comp.to(device)
        return x, comp


InitDistribution = UniformInit | GaussianMixture
