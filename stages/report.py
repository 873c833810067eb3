"""DVC stage `report`: the papers' tables regenerated from this scale's runs.

    python -m stages.report --metrics metrics/demo --published reports/published.yaml --out reports/demo

For every table in ``reports/published.yaml`` and every row whose variant is defined, the
value measured here, the published value and the difference, as Markdown, CSV and LaTeX;
a variant that did not run (not in ``variants``) is marked so. ``summary.*`` lists every
variant that ran with its training and test metrics. Our numbers come from
``<metrics>/eval/<variant>.json`` (stage ``evaluate@<variant>``) and
``<metrics>/train/<variant>.json`` (stage ``train@<variant>``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from jem.params import scale_name, selected_variants
from stages.common import StageError, load_params, main_guard, mlflow_run

PERCENT = {"accuracy", "ece"}
COLUMN_TITLES = {"accuracy": "Acc %", "is": "IS", "fid": "FID", "ece": "ECE %", "svhn": "SVHN",
                 "cifar10_interp": "CIFAR-10 Interp", "cifar100": "CIFAR-100", "celeba": "CelebA",
                 "minutes_per_epoch": "min/epoch"}


def measured(column: str, row: dict[str, Any], ev: dict[str, Any] | None, tr: dict[str, Any] | None) -> Any:
    """Our value for a published column, or a string saying why there is none."""
    if ev is None:
        return "not run"
    if column in PERCENT:
        return 100 * ev[column] if ev.get(column) is not None else "not computed"
    if column == "minutes_per_epoch":
        if tr and tr.get("train_seconds") and tr.get("epochs"):
            return tr["train_seconds"] / tr["epochs"] / 60
        return "not computed"
    if column in ("is", "fid"):
        value = ev.get(column)
        return value if isinstance(value, (int, float)) else ev.get(f"{column}_status", "not computed")
    ood = ev.get("ood", {}).get(row.get("score", ""), {})
    return ood.get(column, "not computed")


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def build_table(spec: dict[str, Any], evals: dict[str, dict], trains: dict[str, dict]) -> pd.DataFrame:
    records = []
    for row in spec["rows"]:
        variant = row["variant"]
        rec: dict[str, Any] = {"row": row["label"], "variant": variant}
        if "score" in row:
            rec["score"] = {"log_px": "log p(x)", "max_prob": "max p(y|x)", "grad_norm": "-||d log p(x)/dx||"}.get(
                row["score"], row["score"])
        for col in spec["columns"]:
            ours = measured(col, row, evals.get(variant), trains.get(variant))
            published = row.get(col)
            rec[f"{col} ours"] = ours
            rec[f"{col} paper"] = published
            both = isinstance(ours, (int, float)) and isinstance(published, (int, float))
            rec[f"{col} diff"] = ours - published if both else None
        rec["paper note"] = row.get("note", "")
        records.append(rec)
    return pd.DataFrame.from_records(records)


def render(name: str, spec: dict[str, Any], table: pd.DataFrame, out: Path, header: str) -> str:
    digits = 2 if any(c in spec["columns"] for c in ("accuracy", "ece", "minutes_per_epoch", "is", "fid")) else 3
    shown = table.copy()
    for col in shown.columns:
        if col.endswith((" ours", " paper", " diff")):
            shown[col] = shown[col].map(lambda v: _fmt(v, digits))
    shown.columns = [_title(c) for c in shown.columns]
    table.to_csv(out / f"{name}.csv", index=False)
    latex = shown.to_latex(index=False, escape=True, caption=spec["title"], label=f"tab:{name}")
    (out / f"{name}.tex").write_text(latex)
    md = f"### {spec['title']}\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n"
    (out / f"{name}.md").write_text(md.replace("\n\n", f"\n\n{header}\n\n", 1))
    return md


def _title(col: str) -> str:
    for suffix in (" ours", " paper", " diff"):
        if col.endswith(suffix):
            return f"{COLUMN_TITLES.get(col[:-len(suffix)], col[:-len(suffix)])}{suffix}"
    return col


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", type=Path, required=True, help="metrics folder of this scale")
    ap.add_argument("--published", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    params = load_params()
    scale = scale_name(params)
    variants = selected_variants(params)
    published = yaml.safe_load(args.published.read_text())
    evals = {v: _read(args.metrics / "eval" / f"{v}.json") for v in variants}
    trains = {v: _read(args.metrics / "train" / f"{v}.json") for v in variants}
    missing = [v for v, m in evals.items() if m is None]
    if missing:
        raise StageError(f"no evaluate metrics for {', '.join(missing)} under {args.metrics / 'eval'}; "
                         "run dvc repro (the evaluate stages come first)")
    unknown = sorted({r["variant"] for t in published.values() for r in t["rows"]} - set(params["methods"]))
    if unknown:
        raise StageError(f"{args.published}: rows name variants not in params.yaml methods: {', '.join(unknown)}")

    header = (f"Scale **{scale}** (commit {_commit()}). *ours*: `metrics/{scale}/eval/<variant>.json` from "
              f"`dvc repro`; *paper*: `{args.published}`."
              + (" Demo-scale runs use procedural stand-in data and a WRN-10-1 trained for minutes: "
                 "they show the pipeline works, not the papers' numbers." if scale != "paper" else ""))
    with mlflow_run("report", params, {}) as run:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
        try:
            summary = pd.DataFrame.from_records([
                {"variant": v, "family": evals[v]["family"], "dataset": f"{evals[v]['dataset']} ({evals[v]['source']})",
                 "test acc %": 100 * evals[v]["accuracy"], "ECE %": 100 * evals[v]["ece"],
                 "val acc %": (100 * trains[v]["val_acc"]
                               if trains[v] and trains[v].get("val_acc") is not None else None),
                 "steps": trains[v]["steps"] if trains[v] else None,
                 "train min": trains[v]["train_seconds"] / 60 if trains[v] else None}
                for v in variants])
            summary.to_csv(tmp / "summary.csv", index=False)
            parts = [f"# Results ({scale} scale)\n\n{header}\n\n## All variants that ran\n\n"
                     f"{summary.to_markdown(index=False, floatfmt='.2f')}\n"]
            (tmp / "summary.tex").write_text(summary.to_latex(index=False, float_format="%.2f", caption="All variants"))
            for name, spec in published.items():
                table = build_table(spec, evals, trains)
                parts.append(render(name, spec, table, tmp, header))
            (tmp / "README.md").write_text("\n".join(parts))
            if args.out.exists():
                shutil.rmtree(args.out)
            tmp.rename(args.out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        run.log_artifact(args.out, "reports")
        print(f"[report] {len(published)} tables + summary for {len(variants)} variants -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
