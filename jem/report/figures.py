"""Figures the stages write as PNG (matplotlib, no display needed).

matplotlib is imported by the functions that draw, and through its object API (``Figure``, drawn
by Agg when saved) rather than pyplot: a stage that writes only image grids (prepare, gmm,
sample) starts without it, and no stage picks or starts an interactive backend.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _subplots(*grid: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Figure, Any]:
    """A figure of its own (no pyplot state to close) and its axes, as ``plt.subplots`` returns them."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, squeeze=squeeze)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def save_grid(images: np.ndarray, path: Path, nrow: int, pad: int = 1, zoom: int = 2) -> None:
    """uint8 images (N, C, H, W) tiled ``nrow`` per row into one PNG, with a white gutter;
    each pixel drawn ``zoom`` x ``zoom`` so that 32x32 images are legible."""
    if zoom > 1:
        images = images.repeat(zoom, axis=2).repeat(zoom, axis=3)
    n, c, h, w = images.shape
    rows = max(1, -(-n // nrow))
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas).save(path)


def plot_learning_curves(steps: list[dict[str, Any]], val: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss terms, energies, accuracies and learning rate against training step."""
    fig, axes = _subplots(1, 4, figsize=(18, 3.8))
    x = [r["step"] for r in steps]
    for key in ("loss", "loss_clf", "loss_gen"):
        if steps and key in steps[0]:
            axes[0].plot(x, [r[key] for r in steps], label=key)
    axes[0].set_title("loss")
    for key in ("energy_pos", "energy_neg"):
        if steps and key in steps[0]:
            axes[1].plot(x, [r[key] for r in steps], label={"energy_pos": "E(x+) data",
                                                           "energy_neg": "E(x-) samples"}[key])
    axes[1].set_title("energy")
    if steps:
        axes[2].plot(x, [r["acc_train"] for r in steps], label="train (augmented)")
    if val:
        axes[2].plot([r["step"] for r in val], [r["val_acc"] for r in val], "o-", label="validation")
    axes[2].set_title("accuracy")
    axes[2].set_ylim(0, 1)
    if steps:
        axes[3].plot(x, [r["lr"] for r in steps])
    axes[3].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)


def plot_reliability(bins: dict[str, Any], path: Path, title: str) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the ECE."""
    edges = bins["bin_edges"]
    width = edges[1] - edges[0]
    centers = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    acc = [a if a is not None else 0.0 for a in bins["bin_accuracy"]]
    fig, ax = _subplots(figsize=(4.2, 4.2))
    ax.bar(centers, acc, width=width, edgecolor="black", alpha=0.8, label="accuracy")
    gap = [c - a if c is not None else 0.0 for c, a in zip(bins["bin_confidence"], acc, strict=True)]
    ax.bar(centers, gap, bottom=acc, width=width, color="red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE = {100 * bins['ece']:.2f}%")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


SCORE_TITLES = {"log_px": "log p(x)", "max_prob": "max p(y|x)", "grad_norm": "-||d log p(x)/dx||"}


def plot_ood_histograms(scores: dict[str, dict[str, np.ndarray]], aurocs: dict[str, dict[str, float]],
                        path: Path, title: str) -> None:
    """One panel per score: the in-distribution test set against every OOD set, AUROC in the legend."""
    names = list(SCORE_TITLES)
    fig, axes = _subplots(1, len(names), figsize=(5.2 * len(names), 3.8))
    for ax, score in zip(axes, names, strict=True):
        values = np.concatenate([v[score] for v in scores.values()])
        lo, hi = np.percentile(values, [0.5, 99.5]) if len(values) else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
        for name, v in scores.items():
            label = "test (in-dist.)" if name == "test" else f"{name} (AUROC {aurocs[score][name]:.3f})"
            ax.hist(np.clip(v[score], lo, hi), bins=bins, alpha=0.45, density=True, label=label,
                    histtype="stepfilled", lw=1.2)
        ax.set_title(SCORE_TITLES[score])
        ax.set_xlabel("score (higher = more in-distribution)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


def plot_landscape(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, shared_y: bool, title: str) -> None:
    """Energy landscapes: one axis for every variant (``shared_y``) or one panel per variant."""
    if shared_y or len(curves) == 1:
        fig, ax = _subplots(figsize=(6, 4))
        for name, (alphas, curve) in curves.items():
            ax.plot(alphas, curve, "o-", ms=3, label=name)
        ax.set_xlabel("alpha (filter-normalised direction)")
        ax.set_ylabel("sum of E(x)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
    else:
        n = len(curves)
        cols = min(n, 4)
        rows = -(-n // cols)
        fig, axes = _subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax, (name, (alphas, curve)) in zip(axes.flat, curves.items(), strict=False):
            ax.plot(alphas, curve, "o-", ms=3)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("alpha")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(title)
    _save(fig, path)


def plot_robustness(curves: dict[str, dict[str, tuple[list[float], list[float]]]], path: Path, title: str) -> None:
    """Accuracy against radius: one panel per attack, one line per variant.

    ``curves[attack][variant] = (radii, accuracies)``.
    """
    attacks = list(curves)
    fig, axes = _subplots(1, max(1, len(attacks)), figsize=(5.2 * max(1, len(attacks)), 3.8), squeeze=False)
    for ax, attack in zip(axes.flat, attacks, strict=False):
        for name, (radii, acc) in curves[attack].items():
            ax.plot(radii, acc, "o-", ms=3, label=name)
        ax.set_title(attack)
        ax.set_xlabel("radius (L-inf: x/255; L2: [0,1] pixels)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)
