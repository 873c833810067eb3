"""The runs a report is built from: every variant x seed's metrics, by stage, and our value of a
published column in each seed.

A run is a variant trained with one seed (``variants`` x ``seeds``). Its metrics are the files the
stages wrote under ``<metrics>/<stage>/<variant>/seed<seed>.json`` (``train``, ``eval``, ``fid``,
``robustness``); the reader that joins a metrics file with its notes is passed in, so this package
reads them as the stages wrote them without depending on the stages' output layer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jem.config.errors import InputError

# a metrics file's numbers and notes joined (None when the stage did not write it)
ReadMetrics = Callable[[Path], dict[str, Any] | None]

PERCENT = {"accuracy", "ece"}
# published OOD column -> the key under metrics["ood"][score] (the evaluate stage's set names)
OOD_KEYS = {"svhn": "svhn", "cifar10_interp": "interp", "cifar100": "cifar100", "celeba": "celeba"}
SOURCES = {"accuracy": "eval", "ece": "eval", "is": "fid", "fid": "fid", "minutes_per_epoch": "train",
           **{k: "eval" for k in OOD_KEYS}}


class Runs:
    """The metrics of every run (variant x seed) that ran, by stage."""

    def __init__(self, root: Path, variants: list[str], seeds: list[int] | None = None, *,
                 read: ReadMetrics) -> None:
        self.root = root
        self.variants = variants
        self.seeds = list(seeds or [1])
        self.by_stage = {stage: {(v, s): read(root / stage / v / f"seed{s}.json")
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

    def check_complete(self) -> None:
        """Every run has its train and (unless it diverged) its evaluate metrics: the report needs both."""
        missing = [f"{v}/seed{s}" for (v, s), m in self.by_stage["train"].items() if m is None]
        missing += [f"{v}/seed{s}" for (v, s), m in self.by_stage["eval"].items()
                    if m is None and not self.diverged(v, s) and f"{v}/seed{s}" not in missing]
        if missing:
            raise InputError(f"no train or evaluate metrics for {', '.join(missing)} under {self.root}; "
                             "run dvc repro (the train and evaluate stages come first)")


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


def seed_value(column: str, row: dict[str, Any], runs: Runs, fid_set: str, seed: int) -> float | str:
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
    raise InputError(f"reports/published.yaml: unknown column {column!r}; known: {', '.join(SOURCES)}")


def measured(column: str, row: dict[str, Any], runs: Runs, fid_set: str) -> Cell:
    """Our value for a published column over the variant's seeds (``not run`` for a variant that did not)."""
    if row["variant"] not in runs.variants:
        return Cell({0: "not run"})
    return Cell({s: seed_value(column, row, runs, fid_set, s) for s in runs.seeds})


def divergence_events(train: dict[str, Any]) -> int:
    """A run's divergence events from its train metrics (written before the count existed: its retries)."""
    return int(train.get("divergence_events", train.get("recovery_retries", 0)) or 0)
