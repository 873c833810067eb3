"""The report's figures (``figures/``, PNG, from each variant's first seed): the stages' learning
curves, reliability diagrams, OOD score histograms and sample grids copied, and the figures that
put the variants side by side drawn: robustness curves and energy landscapes (shared and per-model
y-axis)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jem.report.figures import plot_landscape, plot_robustness
from jem.report.plot_data import read_rows
from jem.report.runs import Runs
from jem.runtime.files import read_json

SAMPLE_GRIDS = ("conditional", "buffer", "fresh", "best_px", "worst_px", "best_pyx", "worst_pyx")


def _read(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.exists() else None


def figures(runs: Runs, plots: Path, samples: Path, out: Path) -> list[str]:
    """Collect and draw the report's figures into ``out`` (each variant's first seed); returns what is missing."""
    out.mkdir(parents=True, exist_ok=True)
    missing = []
    run = f"seed{runs.seeds[0]}"

    def copy(src: Path, name: str) -> None:
        if src.exists():
            shutil.copyfile(src, out / name)
        else:
            missing.append(str(src))

    landscapes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for v in runs.variants:
        copy(plots / "train" / v / run / "curves.png", f"learning_curves_{v}.png")
        if runs.diverged(v, runs.seeds[0]):
            continue  # nothing was evaluated or sampled
        copy(plots / "eval" / v / run / "reliability.png", f"reliability_{v}.png")
        copy(plots / "eval" / v / run / "ood_histograms.png", f"ood_histograms_{v}.png")
        land = plots / "eval" / v / run / "landscape.csv"
        if land.exists():
            rows = read_rows(land)
            landscapes[v] = (np.array([float(r["alpha"]) for r in rows]),
                             np.array([float(r["energy_sum"]) for r in rows]))
        else:
            missing.append(str(land))
        rob = plots / "robustness" / v / run / "curve.csv"
        if rob.exists():
            for r in read_rows(rob):
                radii, accs = curves.setdefault(r["attack"], {}).setdefault(v, ([], []))
                radii.append(float(r["radius"]))
                accs.append(float(r["accuracy"]))
        else:
            missing.append(str(rob))
        info = _read(samples / v / run / "info.json") or {}
        if info.get("generative"):
            for grid in SAMPLE_GRIDS:
                copy(samples / v / run / f"{grid}.png", f"samples_{v}_{grid}.png")
    if landscapes:
        plot_landscape(landscapes, out / "landscape_shared_y.png", shared_y=True,
                       title="Energy landscape: sum of E(x) over training images")
        plot_landscape(landscapes, out / "landscape_per_model.png", shared_y=False,
                       title="Energy landscape, one y-axis per model")
    for attack, by_variant in curves.items():
        plot_robustness({attack: by_variant}, out / f"robustness_{attack.replace('+', '_').replace(' ', '_')}.png",
                        title=f"Accuracy under {attack}")
    return missing
