"""Figures the stages write as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt


def save_grid(images: np.ndarray, path: Path, nrow: int, pad: int = 1) -> None:
    """uint8 images (N, C, H, W) tiled ``nrow`` per row into one PNG, with a white gutter."""
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
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(bins: dict[str, Any], path: Path, title: str) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the ECE."""
    edges = bins["bin_edges"]
    width = edges[1] - edges[0]
    centers = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    acc = [a if a is not None else 0.0 for a in bins["bin_accuracy"]]
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
