"""DVC stage `report`: the papers' tables and figures regenerated from this scale's runs.

    python -m stages.report --metrics metrics/demo --plots plots/demo --samples samples/demo \
        --published reports/published.yaml --out reports/demo

Tables (Markdown, CSV and LaTeX, one set per table, plus ``README.md`` with all of them):
every table in ``reports/published.yaml`` (SADA-JEM Tables 1, 2, 3, 5, 6 and its ECE figures;
JEM++ Tables 2, 3, 4, 5, its OOD and ECE tables) with, for every row, our value, the
published value and the difference, a row whose variant did not run marked ``not run``,
and a note saying how the published number was measured where it differs from ours
(``note``, ``measured`` of the row and of the table in ``published.yaml``);
``summary`` (every variant that ran); ``robustness`` (PGD and BPDA+EOT accuracy per radius;
the papers publish these as a figure only). Where each number comes from:

* accuracy, ECE, OOD AUROC: ``<metrics>/eval/<variant>.json`` (stage ``evaluate@<variant>``);
* IS, FID: ``<metrics>/fid/<variant>.json`` (stage ``fid@<variant>``, replay-buffer samples),
  under the row's ``protocol`` (how the paper selected the images, when known) or else the
  family's (``fid.protocol``), the other protocols' numbers beside them;
* run time: ``<metrics>/train/<variant>.json`` (stage ``train@<variant>``);
* robustness: ``<metrics>/robustness/<variant>.json`` (stage ``robustness@<variant>``).

Figures (PNG, ``figures/``): learning curves, reliability diagrams, OOD score histograms,
robustness curves, energy landscapes (shared and per-model y-axis) and sample grids.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from jem.config.instances import instance_settings
from stages.common import StageError, load_params, main_guard
from stages.declared import check_settings
from stages.figures import plot_landscape, plot_robustness
from stages.outputs import building, read_metrics
from stages.plot_data import write_variant_tables
from stages.tracking import mlflow_run

PERCENT = {"accuracy", "ece"}
COLUMN_TITLES = {"accuracy": "Acc %", "is": "IS", "fid": "FID", "ece": "ECE %", "svhn": "SVHN",
                 "cifar10_interp": "CIFAR-10 Interp", "cifar100": "CIFAR-100", "celeba": "CelebA",
                 "minutes_per_epoch": "min/epoch"}
# published OOD column -> the key under metrics["ood"][score] (the evaluate stage's set names)
OOD_KEYS = {"svhn": "svhn", "cifar10_interp": "interp", "cifar100": "cifar100", "celeba": "celeba"}
SCORE_TITLES = {"log_px": "log p(x)", "max_prob": "max p(y|x)", "grad_norm": "-||d log p(x)/dx||"}
SOURCES = {"accuracy": "eval", "ece": "eval", "is": "fid", "fid": "fid", "minutes_per_epoch": "train",
           **{k: "eval" for k in OOD_KEYS}}
# Columns that ours and the paper's measure the same way only at the paper scale: below it, the
# table shows both values and no difference, and says why.
SCALE_BOUND = {"minutes_per_epoch": "run time is not compared at the {scale} scale: ours is a WRN-10-1 on "
                                    "procedural stand-in data on this machine, the paper's a WRN-28-10 on "
                                    "CIFAR-10 on its GPU, so a difference would mean nothing"}
SAMPLE_GRIDS = ("conditional", "buffer", "fresh", "best_px", "worst_px", "best_pyx", "worst_pyx")


class Runs:
    """The metrics of every variant that ran, by stage."""

    def __init__(self, root: Path, variants: list[str]) -> None:
        self.root = root
        self.variants = variants
        self.by_stage = {stage: {v: read_metrics(root / stage / f"{v}.json") for v in variants}
                         for stage in ("train", "eval", "fid", "robustness")}

    def get(self, stage: str, variant: str) -> dict[str, Any] | None:
        return self.by_stage[stage].get(variant)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def measured(column: str, row: dict[str, Any], runs: Runs, fid_set: str) -> Any:
    """Our value for a published column, or a string saying why there is none."""
    variant = row["variant"]
    if variant not in runs.variants:
        return "not run"
    ev = runs.get("eval", variant)
    if column in PERCENT:
        return 100 * ev[column] if ev and ev.get(column) is not None else "not computed"
    if column == "minutes_per_epoch":
        tr = runs.get("train", variant)
        if tr and tr.get("train_seconds") and tr.get("epochs"):
            return tr["train_seconds"] / tr["epochs"] / 60
        return "not computed"
    if column in ("is", "fid"):
        fid = runs.get("fid", variant)
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
        return value if value is not None else numbers.get("note", f"no {protocol} numbers")
    if column in OOD_KEYS:
        scores = (ev or {}).get("ood", {}).get(row.get("score", ""), {})
        value = scores.get(OOD_KEYS[column])
        return value if value is not None else "not computed"
    raise StageError(f"reports/published.yaml: unknown column {column!r}; known: {', '.join(SOURCES)}")


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def protocol_cells(row: dict[str, Any], spec: dict[str, Any], runs: Runs, fid_set: str) -> dict[str, str]:
    """Which IS/FID protocol our numbers use (the paper's where it is known), and the other protocols' numbers."""
    fid = runs.get("fid", row["variant"]) if row["variant"] in runs.variants else None
    scored = (fid or {}).get(fid_set) if (fid or {}).get("status") == "ok" else None
    paper = row.get("protocol")
    if scored is None:
        published = any(row.get(c) is not None for c in ("is", "fid"))
        return {"IS/FID protocol": f"paper: {paper or 'not stated'}" if published else "", "other protocols": ""}
    ours = paper or scored.get("protocol")
    how = "as the paper" if paper else "the family's; the paper does not say"
    cols = [c for c in ("is", "fid") if c in spec["columns"]]
    others = "; ".join(f"{name}: " + ", ".join(f"{COLUMN_TITLES[c]} {_num(n.get(c))}" for c in cols)
                       for name, n in (scored.get("protocols") or {}).items() if name != ours)
    return {"IS/FID protocol": f"{ours} ({how})", "other protocols": others}


def comparable(column: str, scale: str) -> bool:
    """Whether a ``diff`` of ours and the paper's value means anything at this scale."""
    return scale == "paper" or column not in SCALE_BOUND


def build_table(spec: dict[str, Any], runs: Runs, fid_set: str, scale: str = "paper") -> pd.DataFrame:
    """Our value, the paper's and the difference per column; notes say how the paper's was measured."""
    records = []
    for row in spec["rows"]:
        row = {"protocol": spec.get("protocol"), **row}  # the table's protocol unless the row names one
        rec: dict[str, Any] = {"row": row["label"], "variant": row["variant"]}
        if "score" in row:
            rec["score"] = SCORE_TITLES.get(row["score"], row["score"])
        for col in spec["columns"]:
            ours = measured(col, row, runs, fid_set)
            published = row.get(col)
            rec[f"{col} ours"] = ours
            rec[f"{col} paper"] = published
            both = isinstance(ours, (int, float)) and isinstance(published, (int, float))
            if comparable(col, scale):
                rec[f"{col} diff"] = ours - published if both else None
        if {"is", "fid"} & set(spec["columns"]):
            rec.update(protocol_cells(row, spec, runs, fid_set))
        rec["paper note"] = " ".join(n if n.endswith(".") else f"{n}." for n in (
            row.get("note", ""), row.get("measured", ""), spec.get("measured", "")) if n)
        records.append(rec)
    return pd.DataFrame.from_records(records)


def robustness_table(runs: Runs) -> pd.DataFrame:
    """Accuracy (%) per attack and radius for every variant that ran; the papers give a figure only."""
    records = []
    for v in runs.variants:
        rob = runs.get("robustness", v)
        rec: dict[str, Any] = {"variant": v}
        if rob is None:
            rec["note"] = "not computed"
            records.append(rec)
            continue
        for key, title in (("pgd_linf", "PGD Linf"), ("pgd_l2", "PGD L2")):
            for radius, acc in (rob.get(key) or {}).items():
                rec[f"{title} {radius}"] = 100 * acc
        bpda = rob.get("bpda") or {}
        if bpda.get("status") == "ok":
            for radius, acc in bpda.items():
                if radius not in ("status", "norm", "images"):
                    rec[f"BPDA+EOT {bpda['norm']} {radius}"] = 100 * acc
            rec["note"] = f"{rob['images']} test images (BPDA: {bpda['images']})"
        else:
            rec["note"] = f"{rob['images']} test images; BPDA+EOT {bpda.get('status')}: {bpda.get('reason', '')}"
        if rob.get("pgd_success"):
            rec["note"] += f"; PGD broken by: {rob['pgd_success'].replace('_', ' ')}"
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    attacks = ("PGD Linf", "PGD L2", "BPDA+EOT")

    def order(col: str) -> tuple[int, float]:  # by attack, then by radius as a number
        attack = next(i for i, a in enumerate(attacks) if col.startswith(a))
        return attack, float(col.rsplit(" ", 1)[1].split("/")[0])

    radii = sorted((c for c in table.columns if c not in ("variant", "note")), key=order)
    return table.reindex(columns=["variant", *radii, "note"])


def _title(col: str) -> str:
    for suffix in (" ours", " paper", " diff"):
        if col.endswith(suffix):
            return f"{COLUMN_TITLES.get(col[:-len(suffix)], col[:-len(suffix)])}{suffix}"
    return col


def render(name: str, title: str, table: pd.DataFrame, out: Path, header: str, digits: int) -> str:
    shown = table.copy()
    for col in shown.columns:
        if col not in ("row", "variant", "score", "paper note", "note", "IS/FID protocol", "other protocols"):
            shown[col] = shown[col].map(lambda v: _fmt(v, digits))
    shown.columns = [_title(c) for c in shown.columns]
    table.to_csv(out / f"{name}.csv", index=False)
    latex = shown.to_latex(index=False, escape=True, caption=title, label=f"tab:{name}")
    (out / f"{name}.tex").write_text(latex)
    md = f"### {title}\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n"
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


def figures(runs: Runs, plots: Path, samples: Path, out: Path) -> list[str]:
    """Collect and draw the report's figures into ``out``; returns what is missing."""
    out.mkdir(parents=True, exist_ok=True)
    missing = []

    def copy(src: Path, name: str) -> None:
        if src.exists():
            shutil.copyfile(src, out / name)
        else:
            missing.append(str(src))

    landscapes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for v in runs.variants:
        copy(plots / "train" / v / "curves.png", f"learning_curves_{v}.png")
        copy(plots / "eval" / v / "reliability.png", f"reliability_{v}.png")
        copy(plots / "eval" / v / "ood_histograms.png", f"ood_histograms_{v}.png")
        land = plots / "eval" / v / "landscape.csv"
        if land.exists():
            rows = _read_csv(land)
            landscapes[v] = (np.array([float(r["alpha"]) for r in rows]),
                             np.array([float(r["energy_sum"]) for r in rows]))
        else:
            missing.append(str(land))
        rob = plots / "robustness" / v / "curve.csv"
        if rob.exists():
            for r in _read_csv(rob):
                radii, accs = curves.setdefault(r["attack"], {}).setdefault(v, ([], []))
                radii.append(float(r["radius"]))
                accs.append(float(r["accuracy"]))
        else:
            missing.append(str(rob))
        info = _read(samples / v / "info.json") or {}
        if info.get("generative"):
            for grid in SAMPLE_GRIDS:
                copy(samples / v / f"{grid}.png", f"samples_{v}_{grid}.png")
    if landscapes:
        plot_landscape(landscapes, out / "landscape_shared_y.png", shared_y=True,
                       title="Energy landscape: sum of E(x) over training images")
        plot_landscape(landscapes, out / "landscape_per_model.png", shared_y=False,
                       title="Energy landscape, one y-axis per model")
    for attack, by_variant in curves.items():
        plot_robustness({attack: by_variant}, out / f"robustness_{attack.replace('+', '_').replace(' ', '_')}.png",
                        title=f"Accuracy under {attack}")
    return missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", type=Path, required=True, help="metrics folder of this scale")
    ap.add_argument("--plots", type=Path, required=True, help="plots folder of this scale")
    ap.add_argument("--samples", type=Path, required=True, help="samples folder of this scale")
    ap.add_argument("--published", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    args = ap.parse_args()

    params = load_params()
    cfg = check_settings(args.config, instance_settings(params, "report"))
    scale, variants = str(cfg["scale"]), list(cfg["variants"])
    published = yaml.safe_load(args.published.read_text())
    runs = Runs(args.metrics, variants)
    missing = [v for v, m in runs.by_stage["eval"].items() if m is None]
    if missing:
        raise StageError(f"no evaluate metrics for {', '.join(missing)} under {args.metrics / 'eval'}; "
                         "run dvc repro (the evaluate stages come first)")
    unknown = sorted({r["variant"] for t in published.values() for r in t["rows"]} - set(cfg["methods"]))
    if unknown:
        raise StageError(f"{args.published}: rows name variants not in params.yaml methods: {', '.join(unknown)}")
    fid_set = str(cfg["fid_set"])

    header = (f"Scale **{scale}** (commit {_commit()}). *ours*: accuracy, ECE and OOD from "
              f"`metrics/{scale}/eval/<variant>.json`, IS/FID ({fid_set} samples, under the protocol each row "
              f"names) from "
              f"`metrics/{scale}/fid/<variant>.json`, run time from `metrics/{scale}/train/<variant>.json`, "
              f"all written by `dvc repro`; *paper*: `{args.published}`."
              + (f" The {scale} scale uses procedural stand-in data and a WRN-10-1 trained for minutes: "
                 "it shows the pipeline works, not the papers' numbers." if scale != "paper" else ""))
    with mlflow_run("report", params, {}) as run:
        with building(args.out) as tmp:
            summary = pd.DataFrame.from_records([
                {"variant": v, "family": runs.get("eval", v)["family"],
                 "dataset": f"{runs.get('eval', v)['dataset']} ({runs.get('eval', v)['source']})",
                 "test acc %": 100 * runs.get("eval", v)["accuracy"],
                 "test acc %, BN re-estimated": (100 * runs.get("eval", v)["accuracy_bn_reestimated"]
                                                 if runs.get("eval", v).get("accuracy_bn_reestimated") is not None
                                                 else None),
                 "ECE %": 100 * runs.get("eval", v)["ece"],
                 "val acc %": (100 * runs.get("train", v)["val_acc"]
                               if runs.get("train", v) and runs.get("train", v).get("val_acc") is not None else None),
                 "steps": runs.get("train", v)["steps"] if runs.get("train", v) else None,
                 "train min": runs.get("train", v)["train_seconds"] / 60 if runs.get("train", v) else None}
                for v in variants])
            summary.to_csv(tmp / "summary.csv", index=False)
            (tmp / "summary.tex").write_text(summary.to_latex(index=False, float_format="%.2f", caption="All variants"))
            bn_note = ("*test acc %, BN re-estimated*: the same weights with the batch-norm running statistics "
                       "averaged over the training split, each batch augmented and noised as training's "
                       "labelled batches; it matches *test acc %* when the running statistics describe "
                       "labelled data (the labelled forward runs last in each iteration, as in the reference "
                       "scripts).")
            parts = [f"# Results ({scale} scale)\n\n{header}\n\n## All variants that ran\n\n"
                     f"{summary.to_markdown(index=False, floatfmt='.2f')}\n\n{bn_note}\n\n## The papers' tables\n"]
            for name, spec in published.items():
                digits = 3 if set(spec["columns"]) <= set(OOD_KEYS) else 2
                why = [SCALE_BOUND[c].format(scale=scale) for c in spec["columns"] if not comparable(c, scale)]
                table_header = header + "".join(f" No *diff* column: {w}." for w in why)
                parts.append(render(name, spec["title"], build_table(spec, runs, fid_set, scale), tmp, table_header,
                                    digits))
                parts += [f"No *diff* column: {w}.\n" for w in why]
            rob_header = (f"Accuracy % under attack, from `metrics/{scale}/robustness/<variant>.json` (stage "
                          "robustness). L-inf radii in 1/255, L2 radii on [0, 1] images. *paper*: SADA-JEM reports "
                          "robustness as a figure (Fig. 5), with no numbers to compare against.")
            parts.append("## Robustness\n")
            parts.append(render("robustness", "Robustness: accuracy (%) under PGD and BPDA+EOT", robustness_table(runs),
                                tmp, rob_header, 1))
            missing_figs = figures(runs, args.plots, args.samples, tmp / "figures")
            missing_figs += write_variant_tables(args.plots, variants, tmp / "plots",  # for dvc plots
                                                 list(cfg["ood_sets"]))
            fig_list = "\n".join(f"- [{p.name}](figures/{p.name})" for p in sorted((tmp / "figures").glob("*.png")))
            parts.append(f"## Figures\n\n{fig_list}\n")
            if missing_figs:
                parts.append("Missing inputs (not drawn): " + ", ".join(f"`{m}`" for m in missing_figs) + "\n")
            (tmp / "README.md").write_text("\n".join(parts))
        run.log_artifact(args.out, "reports")
        n_figs = len(list((args.out / "figures").glob("*.png")))
        print(f"[report] {len(published) + 2} tables, {n_figs} figures for {len(variants)} variants -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
