"""The papers' comparative claims (``reports/claims.yaml``), checked on this scale's runs.

A claim compares one measured quantity of two variants (or two quantities of one variant):
side ``a`` is claimed better than side ``b`` for ``metric``, where ``better`` says whether a higher
or a lower value is better. Each side is a variant name, or ``{variant: ..., metric: ...}``.

On the user's runs a claim:

* **holds** when the mean over seeds of ``a`` is better than that of ``b``;
* **does not hold** when it is not (a tie included);
* **not run** when a side's variant is not among the runs;
* **not measured** when both ran but no seed gave a number for a side (e.g. FID without the
  Inception weights, or every seed diverged with recovery off).

Seeds are paired: "holds in k of n seeds" counts the seeds where both sides have a number and
``a`` is better than ``b`` in that seed.

A side's number in each seed (``claim_values``) is the one the papers' tables show for that
variant and column (``jem.report.runs``); ``diverged`` and ``divergence_events_per_1k`` come
from the train metrics.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jem.config.errors import InputError
from jem.report.runs import OOD_KEYS, Runs, divergence_events, seed_value

METRICS = ("accuracy", "ece", "is", "fid", "minutes_per_epoch", "diverged", "divergence_events_per_1k")
OOD_SCORES = ("log_px", "max_prob", "grad_norm")
OOD_SETS = ("svhn", "interp", "cifar100", "celeba")
PAPERS = ("SADA-JEM", "JEM++", "JEM")

# per variant and metric: seed -> a number, or a string saying why there is none for that seed
Values = Callable[[str, str], dict[int, "float | str"]]


@dataclass
class Side:
    variant: str
    metric: str

    def label(self, shared_metric: str | None) -> str:
        return self.variant if self.metric == shared_metric else f"{self.variant} {self.metric}"


@dataclass
class Claim:
    id: str
    claim: str
    source: str
    better: str
    a: Side
    b: Side
    metric: str | None

    @property
    def variants(self) -> set[str]:
        return {self.a.variant, self.b.variant}


def known_metric(metric: str) -> bool:
    if metric in METRICS:
        return True
    parts = metric.split(".")
    return len(parts) == 3 and parts[0] == "ood" and parts[1] in OOD_SCORES and parts[2] in OOD_SETS


def _side(raw: Any, metric: str | None, where: str) -> Side:
    if isinstance(raw, str):
        if metric is None:
            raise InputError(f"{where}: a side given as a variant name needs the claim's `metric`")
        return Side(raw, metric)
    if isinstance(raw, dict) and "variant" in raw and (raw.get("metric") or metric):
        return Side(str(raw["variant"]), str(raw.get("metric") or metric))
    raise InputError(f"{where} = {raw!r}: expected a variant name or {{variant: ..., metric: ...}}")


def load_claims(path: Path, methods: set[str]) -> list[Claim]:
    """The claims of ``path``, checked: known metrics, variants defined under ``methods``, unique ids."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} not found; it lists the papers' claims the report checks") from None
    raw = (data or {}).get("claims") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{path}: expected a non-empty list under `claims:`")
    claims: list[Claim] = []
    for i, c in enumerate(raw):
        where = f"{path}: claims[{i}]" + (f" ({c.get('id')})" if isinstance(c, dict) and c.get("id") else "")
        if not isinstance(c, dict):
            raise InputError(f"{where}: expected a mapping")
        missing = [k for k in ("id", "claim", "source", "better", "a", "b") if k not in c]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        if c["better"] not in ("higher", "lower"):
            raise InputError(f"{where}.better = {c['better']!r}: expected 'higher' or 'lower'")
        metric = c.get("metric")
        a, b = _side(c["a"], metric, f"{where}.a"), _side(c["b"], metric, f"{where}.b")
        for side in (a, b):
            if not known_metric(side.metric):
                raise InputError(f"{where}: unknown metric {side.metric!r}; one of {', '.join(METRICS)} or "
                                 f"ood.<{'|'.join(OOD_SCORES)}>.<{'|'.join(OOD_SETS)}>")
            if side.variant not in methods:
                raise InputError(f"{where}: variant {side.variant!r} is not under `methods` in params.yaml")
        source = c["source"]
        if isinstance(source, dict):
            source = f"{source.get('paper', '?')}, {source.get('where', '?')}"
        claims.append(Claim(str(c["id"]), str(c["claim"]), str(source), str(c["better"]), a, b,
                            None if metric is None else str(metric)))
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: claim ids must be unique; repeated: "
                         f"{', '.join(sorted({i for i in ids if ids.count(i) > 1}))}")
    return claims


def claim_values(runs: Runs, fid_set: str) -> Values:
    """Per variant and claim metric, each seed's number (or why it has none): ``Values``."""

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
            out[s] = seed_value(column, row, runs, fid_set, s)
        return out

    return values


def spread(values: list[float]) -> str:
    """``mean`` for one value, ``mean +- std (n)`` for several (sample standard deviation)."""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g} ({len(values)})"


def _reasons(values: dict[int, float | str]) -> str:
    """Why a side has no number: each seed's reason, once."""
    return "; ".join(sorted({str(v) for v in values.values()})) or "no runs"


def evaluate(claim: Claim, values: Values, ran: set[str]) -> dict[str, Any]:
    """One claim on the runs: its status, both sides' numbers and spread, and the seeds where it holds."""
    row: dict[str, Any] = {"id": claim.id, "claim": claim.claim, "source": claim.source,
                           "a": claim.a.label(claim.metric), "b": claim.b.label(claim.metric),
                           "metric": claim.metric or f"{claim.a.metric} vs {claim.b.metric}",
                           "better": claim.better}
    absent = sorted(claim.variants - ran)
    if absent:
        return {**row, "status": "not run", "ours a": "", "ours b": "", "seeds holding": "",
                "why": f"{', '.join(absent)} did not run"}
    va, vb = values(claim.a.variant, claim.a.metric), values(claim.b.variant, claim.b.metric)
    na = [v for v in va.values() if isinstance(v, float) and math.isfinite(v)]
    nb = [v for v in vb.values() if isinstance(v, float) and math.isfinite(v)]
    shown_a = spread(na) if na else _reasons(va)
    shown_b = spread(nb) if nb else _reasons(vb)
    if not na or not nb:
        side, reasons = (claim.a, shown_a) if not na else (claim.b, shown_b)
        return {**row, "status": "not measured", "ours a": shown_a, "ours b": shown_b, "seeds holding": "",
                "why": f"{side.variant} {side.metric}: {reasons}"}

    def better(x: float, y: float) -> bool:
        return x > y if claim.better == "higher" else x < y

    paired = [s for s in va if s in vb and isinstance(va[s], float) and isinstance(vb[s], float)]
    holding = sum(better(va[s], vb[s]) for s in paired)  # type: ignore[arg-type]
    mean_a, mean_b = statistics.fmean(na), statistics.fmean(nb)
    holds = better(mean_a, mean_b)
    why = f"{claim.better} is better; mean {mean_a:.4g} vs {mean_b:.4g}" + (" (a tie)" if mean_a == mean_b else "")
    return {**row, "status": "holds" if holds else "does not hold", "ours a": shown_a, "ours b": shown_b,
            "seeds holding": f"{holding} of {len(paired)}", "why": why}


def evaluate_all(claims: list[Claim], values: Values, ran: set[str]) -> list[dict[str, Any]]:
    return [evaluate(c, values, ran) for c in claims]
