"""DVC stage `report`: the papers' tables and figures regenerated from this scale's runs.

    python -m stages.report --metrics metrics/demo --plots plots/demo --samples samples/demo \
        --published reports/published.yaml --claims reports/claims.yaml --out reports/demo

A run is a variant trained with one seed (``variants`` x ``seeds``); every number below is over
a variant's seeds. Tables (Markdown, CSV and LaTeX, one set per table, plus ``README.md`` with all
of them):

* every table in ``reports/published.yaml`` (SADA-JEM Tables 1, 2, 3, 5, 6 and its ECE figures;
  JEM++ Tables 2, 3, 4, 5, its OOD and ECE tables): per row our value (``mean ± std (n)`` over
  seeds when n > 1, each seed's value in the CSV), the published value, and at the paper scale the
  difference where ours and the paper's were measured the same way (no ``measured`` note on the
  row or its table, and IS/FID under the protocol the paper states), marked ``†`` when it lies
  outside two standard deviations of ours. At the demo and tiny scales there is no difference
  column: the published numbers stand beside ours as a reference. What a row's published number
  means (``note``, ``measured`` in ``published.yaml``) is a numbered footnote under its table, each
  said once. A row whose variant did not run is ``not run``; a run that diverged with recovery
  off, ``diverged at epoch e``;
* ``summary`` (every variant that ran), ``robustness`` (PGD and BPDA+EOT accuracy per radius; the
  papers publish these as a figure only);
* ``stability``: per variant, runs with a divergence of all its runs, divergence events per 1,000
  iterations, the first divergence's epoch and the signals that fired (``train`` metrics);
* ``claims``: the papers' comparative claims (``reports/claims.yaml``, ``jem.report.claims``), each
  holds / does not hold / not run / not measured on these runs, with both sides' numbers, their
  spread and the seeds in which it holds.

Where each number comes from (``<metrics>/<stage>/<variant>/seed<seed>.json``):

* accuracy, ECE, OOD AUROC: ``eval`` (stage ``evaluate@<variant>-<seed>``);
* IS, FID: ``fid`` (stage ``fid@<variant>-<seed>``, replay-buffer samples), under the row's
  ``protocol`` (how the paper selected the images, when known) or else the family's
  (``fid.protocol``), the other protocols' numbers in the CSV;
* run time and divergence events: ``train`` (stage ``train@<variant>-<seed>``);
* robustness: ``robustness`` (stage ``robustness@<variant>-<seed>``).

Figures (PNG, ``figures/``, from each variant's first seed): learning curves, reliability
diagrams, OOD score histograms, robustness curves, energy landscapes (shared and per-model
y-axis) and sample grids.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from jem.config.instances import instance_settings
from jem.report.claims import evaluate_all, load_claims
from jem.report.figures import plot_landscape, plot_robustness
from jem.report.plot_data import write_variant_tables
from pipeline.common import StageError, load_params, main_guard
from pipeline.declared import check_settings
from pipeline.outputs import building, read_metrics
from pipeline.tracking import mlflow_run

PERCENT = {"accuracy", "ece"}
COLUMN_TITLES = {"accuracy": "Acc %", "is": "IS", "fid": "FID", "ece": "ECE %", "svhn": "SVHN",
                 "cifar10_interp": "CIFAR-10 Interp", "cifar100": "CIFAR-100", "celeba": "CelebA",
                 "minutes_per_epoch": "min/epoch"}
# published OOD column -> the key under metrics["ood"][score] (the evaluate stage's set names)
OOD_KEYS = {"svhn": "svhn", "cifar10_interp": "interp", "cifar100": "cifar100", "celeba": "celeba"}
SCORE_TITLES = {"log_px": "log p(x)", "max_prob": "max p(y|x)", "grad_norm": "-||d log p(x)/dx||"}
SOURCES = {"accuracy": "eval", "ece": "eval", "is": "fid", "fid": "fid", "minutes_per_epoch": "train",
           **{k: "eval" for k in OOD_KEYS}}
# Columns that ours and the paper's never measure the same way, whatever the scale.
SCALE_BOUND = {"minutes_per_epoch": "run time is not differenced: the paper's minutes are on the authors' GPU, ours "
                                    "on whatever ran this scale; compare ratios between rows"}
SAMPLE_GRIDS = ("conditional", "buffer", "fresh", "best_px", "worst_px", "best_pyx", "worst_pyx")
FLAG = "†"


class Runs:
    """The metrics of every run (variant x seed) that ran, by stage."""

    def __init__(self, root: Path, variants: list[str], seeds: list[int] | None = None) -> None:
        self.root = root
        self.variants = variants
        self.seeds = list(seeds or [1])
        self.by_stage = {stage: {(v, s): read_metrics(root / stage / v / f"seed{s}.json")
                                 for v in variants for s in self.seeds}
                         for stage in ("train", "eval", "fid", "robustness")}

    def get(self, stage: str, variant: str, seed: int) -> dict[str, Any] | None:
        return self.by_stage[stage].get((variant, seed))

    def diverged(self, variant: str, seed: int) -> str | None:
        """``diverged at epoch e`` for a run that stopped at a divergence (recovery off), else None."""
        tr = self.get("train", variant, seed) or {}
        return f"diverged at epoch {tr['diverged_at_epoch']}" if tr.get("status") == "diverged" else None

    def first(self, stage: str, variant: str) -> dict[str, Any] | None:
        """The first seed's metrics that hold numbers (what per-variant descriptions read)."""
        found = [m for s in self.seeds if (m := self.get(stage, variant, s)) and m.get("status", "ok") == "ok"]
        return found[0] if found else None


@dataclass
class Cell:
    """One variant's value over its seeds: numbers, or why a seed has none."""

    by_seed: dict[int, float | str] = field(default_factory=dict)

    @property
    def numbers(self) -> list[float]:
        return [v for v in self.by_seed.values() if isinstance(v, float) and math.isfinite(v)]

    @property
    def n(self) -> int:
        return len(self.numbers)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.numbers) if self.numbers else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.numbers) if self.n > 1 else None

    @property
    def reasons(self) -> list[str]:
        """Why the seeds without a number have none, each reason once (seeds named when there are several)."""
        missing = {s: v for s, v in self.by_seed.items() if not isinstance(v, float)}
        if len(self.by_seed) == 1:
            return [str(v) for v in missing.values()]
        grouped: dict[str, list[int]] = {}
        for s, v in missing.items():
            grouped.setdefault(str(v), []).append(s)
        return [f"seed {', '.join(map(str, seeds))}: {why}" for why, seeds in grouped.items()]

    def value(self) -> float | str:
        """What the CSV's ``ours`` column holds: the mean, or why no seed has a number."""
        if self.mean is not None:
            return self.mean
        texts = {str(v) for v in self.by_seed.values()}
        return texts.pop() if len(texts) == 1 else "; ".join(self.reasons)

    def spread_columns(self, name: str, seeds: list[int]) -> dict[str, Any]:
        """The CSV's columns beside ``name``'s value: its std, n and each seed's value."""
        return {f"{name} std": self.std, f"{name} n": self.n,
                **{f"{name} seed {s}": self.by_seed.get(s, "") for s in seeds}}

    def show(self, digits: int) -> str:
        if self.mean is None:
            return str(self.value())
        text = f"{self.mean:.{digits}f}"
        if self.n > 1:
            text += f" ± {self.std:.{digits}f} ({self.n})"
        return text + "".join(f"; {r}" for r in self.reasons)


def _seed_value(column: str, row: dict[str, Any], runs: Runs, fid_set: str, seed: int) -> float | str:
    """Our value for a published column in one seed, or a string saying why there is none."""
    variant = row["variant"]
    if column == "minutes_per_epoch":
        tr = runs.get("train", variant, seed)
        if tr and tr.get("status", "ok") == "ok" and tr.get("train_seconds") and tr.get("epochs"):
            return float(tr["train_seconds"] / tr["epochs"] / 60)
        return runs.diverged(variant, seed) or "not computed"
    stopped = runs.diverged(variant, seed)
    if stopped:
        return stopped
    ev = runs.get("eval", variant, seed)
    if column in PERCENT:
        return 100 * float(ev[column]) if ev and ev.get(column) is not None else "not computed"
    if column in ("is", "fid"):
        fid = runs.get("fid", variant, seed)
        if fid is None:
            return "not computed"
        if fid.get("status") != "ok":
            return str(fid.get("status"))
        scored = fid.get(fid_set)
        if scored is None:
            return f"no {fid_set} samples"
        protocol = row.get("protocol") or scored.get("protocol")
        numbers = (scored.get("protocols") or {}).get(protocol, scored if protocol == scored.get("protocol") else {})
        value = numbers.get(column)
        return float(value) if value is not None else numbers.get("note", f"no {protocol} numbers")
    if column in OOD_KEYS:
        scores = (ev or {}).get("ood", {}).get(row.get("score", ""), {})
        value = scores.get(OOD_KEYS[column])
        return float(value) if value is not None else "not computed"
    raise StageError(f"reports/published.yaml: unknown column {column!r}; known: {', '.join(SOURCES)}")


def measured(column: str, row: dict[str, Any], runs: Runs, fid_set: str) -> Cell:
    """Our value for a published column over the variant's seeds (``not run`` for a variant that did not)."""
    if row["variant"] not in runs.variants:
        return Cell({0: "not run"})
    return Cell({s: _seed_value(column, row, runs, fid_set, s) for s in runs.seeds})


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def protocol_cells(row: dict[str, Any], spec: dict[str, Any], runs: Runs, fid_set: str) -> dict[str, str]:
    """Which IS/FID protocol our numbers use (the paper's where it is known), and the other protocols'
    numbers (mean over seeds)."""
    scored_by_seed = []
    if row["variant"] in runs.variants:
        for s in runs.seeds:
            fid = runs.get("fid", row["variant"], s) or {}
            if fid.get("status") == "ok" and fid.get(fid_set) is not None:
                scored_by_seed.append(fid[fid_set])
    paper = row.get("protocol")
    if not scored_by_seed:
        published = any(row.get(c) is not None for c in ("is", "fid"))
        return {"IS/FID protocol": f"paper: {paper or 'not stated'}" if published else "", "other protocols": ""}
    ours = paper or scored_by_seed[0].get("protocol")
    how = "as the paper" if paper else "the family's; the paper does not say"
    cols = [c for c in ("is", "fid") if c in spec["columns"]]

    def mean_of(name: str, col: str) -> float | None:
        vals = [float(v) for sc in scored_by_seed
                if (v := ((sc.get("protocols") or {}).get(name) or {}).get(col)) is not None]
        return statistics.fmean(vals) if vals else None

    names = [n for n in (scored_by_seed[0].get("protocols") or {}) if n != ours]
    others = "; ".join(f"{name}: " + ", ".join(f"{COLUMN_TITLES[c]} {_num(mean_of(name, c))}" for c in cols)
                       for name in names)
    return {"IS/FID protocol": f"{ours} ({how})", "other protocols": others}


def why_not_comparable(column: str, row: dict[str, Any], spec: dict[str, Any], scale: str) -> str | None:
    """Why ours and the paper's value of ``column`` are not measured the same way (None: they are)."""
    if scale != "paper":
        return f"the {scale} scale"
    if column in SCALE_BOUND:
        return SCALE_BOUND[column]
    if row.get("measured") or spec.get("measured"):
        return "measured differently (see the row's notes)"
    if column in ("is", "fid") and not row.get("protocol"):
        return "the paper does not state which images it scored"
    return None


def comparable(column: str, scale: str) -> bool:
    """Whether a ``diff`` column of ``column`` exists at this scale (its rows may still be blank)."""
    return scale == "paper" and column not in SCALE_BOUND


@dataclass
class Table:
    data: pd.DataFrame  # the CSV: numbers (means), their std and n, each seed's value, notes as numbers
    shown: pd.DataFrame  # the Markdown / LaTeX: formatted cells
    notes: list[str]  # the footnotes, numbered from 1 in this order


class Footnotes:
    """Numbered notes, each text once."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> int:
        text = text if text.endswith(".") else f"{text}."
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1

    def render(self) -> str:
        return "\n".join(f"{i}. {t}" for i, t in enumerate(self.texts, 1))


def build_table(spec: dict[str, Any], runs: Runs, fid_set: str, scale: str = "paper", digits: int = 2) -> Table:
    """Our value (over seeds), the paper's and, where comparable, the difference per column; what the
    paper's numbers mean goes to numbered footnotes."""
    notes = Footnotes()
    records, shown_rows = [], []
    flagged_any = False
    for row in spec["rows"]:
        row = {"protocol": spec.get("protocol"), **row}  # the table's protocol unless the row names one
        rec: dict[str, Any] = {"row": row["label"], "variant": row["variant"]}
        show: dict[str, Any] = {"row": row["label"], "variant": row["variant"]}
        if "score" in row:
            rec["score"] = show["score"] = SCORE_TITLES.get(row["score"], row["score"])
        refs = [notes.ref(t) for t in (row.get("note", ""), row.get("measured", ""), spec.get("measured", "")) if t]
        for col in spec["columns"]:
            cell = measured(col, row, runs, fid_set)
            published = row.get(col)
            rec[f"{col} ours"] = cell.value()
            rec.update(cell.spread_columns(col, runs.seeds))
            rec[f"{col} paper"] = published
            show[f"{col} ours"] = cell.show(digits)
            show[f"{col} paper"] = _fmt(published, digits)
            if comparable(col, scale):
                why = why_not_comparable(col, row, spec, scale)
                diff = cell.mean - published if why is None and cell.mean is not None and \
                    isinstance(published, (int, float)) else None
                flagged = diff is not None and cell.std is not None and abs(diff) > 2 * cell.std
                flagged_any |= flagged
                rec[f"{col} diff"] = diff
                rec[f"{col} outside 2 std"] = flagged if diff is not None else None
                show[f"{col} diff"] = "-" if diff is None else f"{diff:+.{digits}f}" + (f" {FLAG}" if flagged else "")
        if {"is", "fid"} & set(spec["columns"]):
            cells = protocol_cells(row, spec, runs, fid_set)
            rec.update(cells)
            show["IS/FID protocol"] = cells["IS/FID protocol"]
        rec["notes"] = show["notes"] = ", ".join(map(str, refs))
        rec["paper note"] = " ".join(notes.texts[r - 1] for r in refs)
        records.append(rec)
        shown_rows.append(show)
    if scale == "paper" and any(comparable(c, scale) for c in spec["columns"]):
        if flagged_any:
            notes.ref(f"{FLAG}: the difference lies outside two standard deviations of ours (over its seeds)")
        if max(len(runs.seeds), 1) == 1:
            notes.ref("One seed per variant: no spread, so no difference is flagged; list more under `seeds`")
    return Table(pd.DataFrame.from_records(records), pd.DataFrame.from_records(shown_rows), notes.texts)


def robustness_table(runs: Runs) -> pd.DataFrame:
    """Accuracy (%) per attack and radius for every variant that ran (mean over seeds); the papers give a
    figure only."""
    records = []
    for v in runs.variants:
        rec: dict[str, Any] = {"variant": v}
        per: dict[str, list[float]] = {}
        notes: list[str] = []
        got = [(s, rob) for s in runs.seeds
               if (rob := runs.get("robustness", v, s)) and rob.get("status", "ok") == "ok"]
        stopped = [f"seed {s}: {d}" for s in runs.seeds if (d := runs.diverged(v, s))]
        if not got:
            rec["note"] = "; ".join(stopped) or "not computed"
            records.append(rec)
            continue
        for _, rob in got:
            for key, title in (("pgd_linf", "PGD Linf"), ("pgd_l2", "PGD L2")):
                for radius, acc in (rob.get(key) or {}).items():
                    per.setdefault(f"{title} {radius}", []).append(100 * acc)
            bpda = rob.get("bpda") or {}
            if bpda.get("status") == "ok":
                for radius, acc in bpda.items():
                    if radius not in ("status", "norm", "images"):
                        per.setdefault(f"BPDA+EOT {bpda['norm']} {radius}", []).append(100 * acc)
        rob = got[0][1]
        bpda = rob.get("bpda") or {}
        notes.append(f"{rob['images']} test images" + (f" (BPDA: {bpda['images']})" if bpda.get("status") == "ok" else
                                                        f"; BPDA+EOT {bpda.get('status')}: {bpda.get('reason', '')}"))
        if rob.get("pgd_success"):
            notes.append(f"PGD broken by: {rob['pgd_success'].replace('_', ' ')}")
        if len(runs.seeds) > 1:
            notes.append(f"mean of {len(got)} seeds")
        rec.update({k: statistics.fmean(vals) for k, vals in per.items()})
        rec["note"] = "; ".join(notes + stopped)
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    attacks = ("PGD Linf", "PGD L2", "BPDA+EOT")

    def order(col: str) -> tuple[int, float]:  # by attack, then by radius as a number
        attack = next(i for i, a in enumerate(attacks) if col.startswith(a))
        return attack, float(col.rsplit(" ", 1)[1].split("/")[0])

    radii = sorted((c for c in table.columns if c not in ("variant", "note")), key=order)
    return table.reindex(columns=["variant", *radii, "note"])


def divergence_events(train: dict[str, Any]) -> int:
    """A run's divergence events from its train metrics (written before the count existed: its retries)."""
    return int(train.get("divergence_events", train.get("recovery_retries", 0)) or 0)


def stability_table(runs: Runs) -> pd.DataFrame:
    """Per variant: how many of its runs diverged, how often per 1,000 iterations, and when first."""
    records = []
    for v in runs.variants:
        trains = {s: m for s in runs.seeds if (m := runs.get("train", v, s))}
        events = sum(divergence_events(m) for m in trains.values())
        steps = sum(int(m.get("steps", 0) or 0) for m in trains.values())
        diverged = [s for s, m in trains.items() if divergence_events(m)]
        firsts = [m["first_divergence_epoch"] for m in trains.values() if m.get("first_divergence_epoch") is not None]
        signals = Counter(e.get("signal", "?") for m in trains.values() for e in m.get("divergence_log") or [])
        stopped = [f"seed {s}: diverged at epoch {m['diverged_at_epoch']}" for s, m in trains.items()
                   if m.get("status") == "diverged"]
        recovered = [f"seed {s}: {m.get('remedies')}" for s, m in trains.items()
                     if m.get("status", "ok") == "ok" and divergence_events(m)]
        recovery = sorted({str(m.get("recovery", "on")) for m in trains.values()})
        records.append({
            "variant": v, "runs": len(trains), "runs with a divergence": len(diverged),
            "diverged / runs": f"{len(diverged)} / {len(trains)}",
            "events per 1,000 iterations": 1000 * events / steps if steps else None,
            "first divergence epoch": str(min(firsts)) if firsts else "-",
            "signals": ", ".join(f"{k} x{n}" for k, n in sorted(signals.items())) or "-",
            "recovery": "/".join(recovery) or "-",
            "outcome": "; ".join(stopped + [f"{r} (recovered)" for r in recovered]) or "no divergence",
        })
    return pd.DataFrame.from_records(records)


def claim_values(runs: Runs, fid_set: str) -> Any:
    """Per variant and claim metric, each seed's number (or why it has none): ``jem.report.claims.Values``."""

    def values(variant: str, metric: str) -> dict[int, float | str]:
        out: dict[int, float | str] = {}
        for s in runs.seeds:
            tr = runs.get("train", variant, s) or {}
            if metric == "diverged":
                out[s] = float(bool(divergence_events(tr))) if tr else "not run"
                continue
            if metric == "divergence_events_per_1k":
                value = tr.get("events_per_1k_iters")
                out[s] = float(value) if value is not None else "not recorded"
                continue
            if metric.startswith("ood."):
                _, score, ood = metric.split(".")
                row = {"variant": variant, "score": score}
                column = next(k for k, key in OOD_KEYS.items() if key == ood)
            else:
                row, column = {"variant": variant}, metric
            out[s] = _seed_value(column, row, runs, fid_set, s)
        return out

    return values


def _title(col: str) -> str:
    for suffix in (" ours", " paper", " diff"):
        if col.endswith(suffix):
            return f"{COLUMN_TITLES.get(col[:-len(suffix)], col[:-len(suffix)])}{suffix}"
    return col


def render(name: str, title: str, table: pd.DataFrame, out: Path, header: str, digits: int,
           shown: pd.DataFrame | None = None, footnotes: list[str] | None = None, after: str = "") -> str:
    """``<name>.csv`` (``table``), ``.tex`` and ``.md`` (``shown``, else ``table`` formatted); returns the Markdown."""
    if shown is None:
        shown = table.copy()
        for col in shown.columns:
            if col not in ("row", "variant", "score", "notes", "note", "IS/FID protocol", "other protocols"):
                shown[col] = shown[col].map(lambda v: _fmt(v, digits))
    shown = shown.copy()
    shown.columns = [_title(c) for c in shown.columns]
    table.to_csv(out / f"{name}.csv", index=False)
    latex = shown.to_latex(index=False, escape=True, caption=title, label=f"tab:{name}")
    (out / f"{name}.tex").write_text(latex)
    notes = "".join(f"\n{i}. {t}" for i, t in enumerate(footnotes or [], 1))
    md = f"### {title}\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n" + \
        (f"\n*Notes*:\n{notes}\n" if notes else "") + (f"\n{after}\n" if after else "")
    (out / f"{name}.md").write_text(md.replace("\n\n", f"\n\n{header}\n\n", 1))
    return md


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


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
            rows = _read_csv(land)
            landscapes[v] = (np.array([float(r["alpha"]) for r in rows]),
                             np.array([float(r["energy_sum"]) for r in rows]))
        else:
            missing.append(str(land))
        rob = plots / "robustness" / v / run / "curve.csv"
        if rob.exists():
            for r in _read_csv(rob):
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


def summary_table(runs: Runs, variants: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every variant that ran: (CSV with each seed's values, formatted table)."""
    columns = {"test acc %": ("eval", "accuracy", 100), "test acc %, BN re-estimated":
               ("eval", "accuracy_bn_reestimated", 100), "ECE %": ("eval", "ece", 100),
               "val acc %": ("train", "val_acc", 100), "steps": ("train", "steps", 1),
               "train min": ("train", "train_seconds", 1 / 60)}
    data, shown = [], []
    for v in variants:
        described = runs.first("eval", v) or {}
        rec: dict[str, Any] = {"variant": v, "family": described.get("family", "-"),
                               "dataset": f"{described['dataset']} ({described['source']})" if described else "-",
                               "seeds": len(runs.seeds)}
        show = dict(rec)
        for title, (stage, key, scale) in columns.items():
            cell = Cell({})
            for s in runs.seeds:
                m = runs.get(stage, v, s) or {}
                stopped = runs.diverged(v, s) if stage == "eval" else None
                cell.by_seed[s] = stopped or (scale * float(m[key]) if m.get(key) is not None else "-")
            rec[title] = cell.value()
            rec.update(cell.spread_columns(title, runs.seeds))
            show[title] = cell.show(0 if key == "steps" else 2)
        data.append(rec)
        shown.append(show)
    return pd.DataFrame.from_records(data), pd.DataFrame.from_records(shown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", type=Path, required=True, help="metrics folder of this scale")
    ap.add_argument("--plots", type=Path, required=True, help="plots folder of this scale")
    ap.add_argument("--samples", type=Path, required=True, help="samples folder of this scale")
    ap.add_argument("--published", type=Path, required=True)
    ap.add_argument("--claims", type=Path, help="the papers' claims to check (reports/claims.yaml)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    args = ap.parse_args()

    params = load_params()
    cfg = check_settings(args.config, instance_settings(params, "report"))
    scale, variants, seeds = str(cfg["scale"]), list(cfg["variants"]), [int(s) for s in cfg["seeds"]]
    published = yaml.safe_load(args.published.read_text())
    claims = load_claims(args.claims, set(cfg["methods"])) if args.claims else []
    runs = Runs(args.metrics, variants, seeds)
    missing = [f"{v}/seed{s}" for (v, s), m in runs.by_stage["train"].items() if m is None]
    missing += [f"{v}/seed{s}" for (v, s), m in runs.by_stage["eval"].items()
                if m is None and not runs.diverged(v, s) and f"{v}/seed{s}" not in missing]
    if missing:
        raise StageError(f"no train or evaluate metrics for {', '.join(missing)} under {args.metrics}; "
                         "run dvc repro (the train and evaluate stages come first)")
    unknown = sorted({r["variant"] for t in published.values() for r in t["rows"]} - set(cfg["methods"]))
    if unknown:
        raise StageError(f"{args.published}: rows name variants not in params.yaml methods: {', '.join(unknown)}")
    fid_set = str(cfg["fid_set"])
    n_seeds = len(seeds)

    where = f"`metrics/{scale}/<stage>/<variant>/seed<seed>.json`"
    header = (f"Scale **{scale}** (commit {_commit()}), seeds {', '.join(map(str, seeds))}. *ours*: accuracy, ECE and "
              f"OOD from the evaluate stage, IS/FID ({fid_set} samples, under the protocol each row names) from the "
              f"fid stage, run time from the train stage, each in {where}, all written by `dvc repro`"
              + (f"; mean ± std (n) over the {n_seeds} seeds (sample std), each seed's value in the CSV"
                 if n_seeds > 1 else "") + f"; *paper*: `{args.published}`."
              + (f" The {scale} scale uses procedural stand-in data and a WRN-10-1 trained for minutes: "
                 "it shows the pipeline works, not the papers' numbers." if scale != "paper" else ""))
    no_diff = (f"No difference column: at the {scale} scale ours are measured on procedural stand-in data with a "
               "WRN-10-1 trained for minutes and the paper's on CIFAR with a WRN-28-10 trained for hours, so a "
               "difference would mean nothing; the published numbers stand beside ours as a reference."
               )
    with mlflow_run("report", params, {}) as run:
        with building(args.out) as tmp:
            summary, summary_shown = summary_table(runs, variants)
            summary.to_csv(tmp / "summary.csv", index=False)
            (tmp / "summary.tex").write_text(summary_shown.to_latex(index=False, caption="All variants"))
            bn_note = ("*test acc %, BN re-estimated*: the same weights with the batch-norm running statistics "
                       "averaged over the training split, each batch augmented and noised as training's "
                       "labelled batches; it matches *test acc %* when the running statistics describe "
                       "labelled data (the labelled forward runs last in each iteration, as in the reference "
                       "scripts).")
            parts = [f"# Results ({scale} scale)\n\n{header}\n\n## All variants that ran\n\n"
                     f"{summary_shown.to_markdown(index=False, disable_numparse=True)}\n\n{bn_note}\n"]

            stability = stability_table(runs)
            stab_header = (f"From the train stage ({where}): a divergence is a non-finite loss, exploding energies or "
                           "saturated samples (`recovery` in params.yaml). With recovery on, the run rolls back and "
                           "is remedied, and each event counts; with `recovery.enabled: false` it stops at the first "
                           "and is marked diverged, as the papers measured stability.")
            parts.append("## Stability\n")
            parts.append(render("stability", "Stability: divergence per variant over its seeds", stability, tmp,
                                stab_header, 2))

            if claims:
                rows = evaluate_all(claims, claim_values(runs, fid_set), set(variants))
                table = pd.DataFrame.from_records(rows)
                table.to_csv(tmp / "claims.csv", index=False)
                ran = table[table["status"] != "not run"]
                shown = ran[["claim", "source", "status", "ours a", "ours b", "seeds holding"]]
                counts = Counter(table["status"])
                claims_header = (f"The papers' comparative claims (`{args.claims}`) checked on these runs: the first "
                                 "named (*a*) is claimed better than the second (*b*); *holds* when the mean over "
                                 "seeds of *a* is better, *seeds holding* counts the seeds where it is; claims.csv "
                                 "adds each side's variant and metric and why. "
                                 + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".")
                after = (f"{counts.get('not run', 0)} more claims name variants that did not run; all are in "
                         "claims.csv." if counts.get("not run") else "")
                if scale != "paper":
                    after += (f" At the {scale} scale a claim is checked on stand-in data and minutes of training: "
                              "what holds here need not hold on CIFAR, and the reverse.")
                parts.append("## The papers' claims\n")
                parts.append(render("claims_shown", "The papers' claims on these runs", shown, tmp, claims_header, 3,
                                    shown=shown, after=after.strip()))
                (tmp / "claims_shown.csv").unlink()

            parts.append("## The papers' tables\n")
            if scale != "paper":
                parts.append(no_diff + "\n")
            for name, spec in published.items():
                digits = 3 if set(spec["columns"]) <= set(OOD_KEYS) else 2
                built = build_table(spec, runs, fid_set, scale, digits)
                parts.append(render(name, spec["title"], built.data, tmp, header, digits, shown=built.shown,
                                    footnotes=built.notes))
                if scale != "paper":  # said once above the tables in README.md, and in each table's own file
                    md = tmp / f"{name}.md"
                    md.write_text(md.read_text() + f"\n{no_diff}\n")
            rob_header = (f"Accuracy % under attack, from `metrics/{scale}/robustness/<variant>/seed<seed>.json` "
                          "(stage robustness), mean over seeds. L-inf radii in 1/255, L2 radii on [0, 1] images. "
                          "*paper*: SADA-JEM reports robustness as a figure (Fig. 5), with no numbers to compare "
                          "against.")
            parts.append("## Robustness\n")
            parts.append(render("robustness", "Robustness: accuracy (%) under PGD and BPDA+EOT", robustness_table(runs),
                                tmp, rob_header, 1))
            missing_figs = figures(runs, args.plots, args.samples, tmp / "figures")
            missing_figs += write_variant_tables(args.plots, variants, tmp / "plots",  # for dvc plots
                                                 list(cfg["ood_sets"]), f"seed{seeds[0]}")
            fig_list = "\n".join(f"- [{p.name}](figures/{p.name})" for p in sorted((tmp / "figures").glob("*.png")))
            parts.append(f"## Figures\n\nEach variant's seed {seeds[0]}.\n\n{fig_list}\n")
            if missing_figs:
                parts.append("Missing inputs (not drawn): " + ", ".join(f"`{m}`" for m in missing_figs) + "\n")
            (tmp / "README.md").write_text("\n".join(parts))
        run.log_artifact(args.out, "reports")
        n_figs = len(list((args.out / "figures").glob("*.png")))
        print(f"[report] {len(published) + 3 + bool(claims)} tables, {n_figs} figures for {len(variants)} variants "
              f"x {n_seeds} seeds -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
