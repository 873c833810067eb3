"""The tables of our runs alone, with no published column beside them: every variant that ran
(``summary``), accuracy under attack (``robustness``; the papers publish it as a figure only) and
divergence per variant (``stability``)."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import pandas as pd

from jem.report.runs import Cell, Runs, divergence_events


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
