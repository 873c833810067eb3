"""Data-series files for ``dvc plots``: CSV that DVC's templates draw and overlay.

Per variant, the evaluate stage writes one OOD score histogram per score
(``ood_<score>.csv``: the bin centre and the density of the in-distribution test images and of
each OOD set over the same bins). Across variants, the report stage gathers every variant's
curves into one table per plot, one column per variant (``reports/<scale>/plots/``), so that
one ``plots:`` definition in ``dvc.yaml`` overlays the variants and ``dvc plots diff`` overlays
experiments on top of that.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np

HIST_BINS = 30
# the one row key of each cross-variant table, and the column of the per-variant CSV it comes from
CURVES = {
    "val_acc": ("train", "val.csv", "epoch", "val_acc"),
    "train_loss": ("train", "steps.csv", "step", "loss"),
    "landscape": ("eval", "landscape.csv", "alpha", "energy_sum"),
}


def write_ood_histograms(folder: Path, scores: dict[str, dict[str, np.ndarray]], names: tuple[str, ...],
                         bins: int = HIST_BINS) -> None:
    """``ood_<score>.csv`` per score: densities of ``scores[set][score]`` over shared bins, the
    in-distribution ``test`` set first (what the histogram PNG draws, as numbers)."""
    for name in names:
        values = {k: np.asarray(v[name], dtype=np.float64) for k, v in scores.items()}
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        if finite.size == 0:
            continue
        lo, hi = float(finite.min()), float(finite.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        dens = {k: np.histogram(v[np.isfinite(v)], bins=edges, density=True)[0] for k, v in values.items()}
        with open(folder / f"ood_{name}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["score", *dens])
            for i in range(bins):
                writer.writerow([0.5 * (edges[i] + edges[i + 1]), *(float(d[i]) for d in dens.values())])


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV the stages wrote (learning curves, landscape, robustness curve), one dict per row."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _wide(series: dict[str, dict[float, float]], key: str, variants: list[str], path: Path) -> None:
    """One row per ``key`` value, one column per variant (blank where a variant has no point)."""
    rows = sorted({x for points in series.values() for x in points})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([key, *variants])
        for x in rows:
            writer.writerow([x, *(series.get(v, {}).get(x, "") for v in variants)])


def write_variant_tables(plots: Path, variants: list[str], out: Path, ood_sets: list[str], run: str = "") -> list[str]:
    """The cross-variant tables of ``dvc.yaml``'s ``plots:`` from the stages' per-variant CSVs under
    ``plots`` (``<stage>/<variant>/<run>/``: ``run`` names the seed's folder, e.g. ``seed1``), into
    ``out``; returns the inputs that were missing (their column stays blank).

    The OOD histograms get the columns ``score``, ``test`` and every set of ``ood_sets``
    (``evaluate.ood_sets``), blank where a variant skipped a set (its own training dataset), so
    one ``y`` list in ``dvc.yaml`` fits every file."""
    out.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []

    def load(path: Path) -> list[dict[str, str]]:
        if path.exists():
            return read_rows(path)
        missing.append(str(path))
        return []

    for name, (stage, file, key, column) in CURVES.items():
        series: dict[str, dict[float, float]] = {}
        for v in variants:
            points = {_number(r.get(key)): _number(r.get(column)) for r in load(plots / stage / v / run / file)}
            series[v] = {x: y for x, y in points.items() if x is not None and y is not None}
        _wide(series, key, variants, out / f"{name}.csv")

    # reliability: accuracy per confidence bin (the bin centre), blank for empty bins
    series = {}
    for v in variants:
        points = {}
        for r in load(plots / "eval" / v / run / "reliability.csv"):
            low, high, acc = _number(r.get("bin_low")), _number(r.get("bin_high")), _number(r.get("accuracy"))
            if low is not None and high is not None and acc is not None and (_number(r.get("count")) or 0) > 0:
                points[round(0.5 * (low + high), 6)] = acc
        series[v] = points
    _wide(series, "confidence", variants, out / "reliability.csv")

    # robustness: accuracy per radius, one table per attack
    attacks: dict[str, dict[str, dict[float, float]]] = {}
    for v in variants:
        for r in load(plots / "robustness" / v / run / "curve.csv"):
            radius, acc = _number(r.get("radius")), _number(r.get("accuracy"))
            if radius is not None and acc is not None:
                attacks.setdefault(r["attack"], {}).setdefault(v, {})[radius] = acc
    for attack in ("PGD linf", "PGD l2", "BPDA+EOT linf"):  # the files dvc.yaml names, always written
        _wide(attacks.get(attack, {}), "radius", variants, out / f"robustness_{_slug(attack)}.csv")
    for attack, series_ in attacks.items():  # any other attack (e.g. BPDA+EOT under l2)
        _wide(series_, "radius", variants, out / f"robustness_{_slug(attack)}.csv")

    # OOD score histograms: one file per variant and score (densities share bins within a file only)
    hist = out / "ood"
    if hist.exists():
        shutil.rmtree(hist)
    hist.mkdir()
    for v in variants:
        found = sorted((plots / "eval" / v / run).glob("ood_*.csv"))
        if not found:
            missing.append(str(plots / "eval" / v / run / "ood_<score>.csv"))
        for path in found:
            fields = ["score", "test", *ood_sets]
            with open(hist / f"{v}_{path.stem.removeprefix('ood_')}.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore", restval="")
                writer.writeheader()
                writer.writerows(read_rows(path))
    return missing


def _slug(text: str) -> str:
    return text.lower().replace("+", "_").replace(" ", "_")

