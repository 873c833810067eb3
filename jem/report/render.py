"""A report table written three ways: CSV (the numbers, each seed's value), LaTeX and Markdown (the
formatted cells, column titles spelled out, footnotes under the Markdown)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

COLUMN_TITLES = {"accuracy": "Acc %", "is": "IS", "fid": "FID", "ece": "ECE %", "svhn": "SVHN",
                 "cifar10_interp": "CIFAR-10 Interp", "cifar100": "CIFAR-100", "celeba": "CelebA",
                 "minutes_per_epoch": "min/epoch"}


def fmt(value: Any, digits: int) -> str:
    """A cell as shown: ``-`` for no value, floats to ``digits``, anything else as it is."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


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
                shown[col] = shown[col].map(lambda v: fmt(v, digits))
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
