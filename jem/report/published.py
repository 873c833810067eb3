"""The papers' tables beside ours (``reports/published.yaml``): per row our value over seeds, the
published value and, at the paper scale, the difference where ours and the paper's were measured
the same way, flagged when it lies outside two standard deviations of ours. What a row's published
number means goes to numbered footnotes, each said once."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from jem.report.render import COLUMN_TITLES, fmt
from jem.report.runs import Runs, measured

SCORE_TITLES = {"log_px": "log p(x)", "max_prob": "max p(y|x)", "grad_norm": "-||d log p(x)/dx||"}
# Columns that ours and the paper's never measure the same way, whatever the scale.
SCALE_BOUND = {"minutes_per_epoch": "run time is not differenced: the paper's minutes are on the authors' GPU, ours "
                                    "on whatever ran this scale; compare ratios between rows"}
FLAG = "†"


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
            show[f"{col} paper"] = fmt(published, digits)
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

