"""The papers' claims (reports/claims.yaml): well formed, true of the papers' own numbers, and
evaluated on hand-built runs as holds / does not hold / not run / not measured, seed by seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jem.config.errors import InputError
from jem.report.claims import PAPERS, Claim, Side, claim_values, evaluate, evaluate_all, load_claims
from jem.report.runs import Runs
from pipeline.outputs import read_metrics, write_metrics

from .conftest import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
PUBLISHED = yaml.safe_load((ROOT / "reports" / "published.yaml").read_text())
OOD_COLUMNS = {"svhn": "svhn", "interp": "cifar10_interp", "cifar100": "cifar100", "celeba": "celeba"}


def _claims() -> list[Claim]:
    return load_claims(ROOT / "reports" / "claims.yaml", set(PARAMS["methods"]))


def test_the_claims_file_names_its_sources_and_covers_what_the_papers_argue():
    claims = _claims()
    assert all(c.source.split(",")[0] in PAPERS and c.claim for c in claims)
    metrics = {(c.a.metric, c.b.metric) for c in claims}
    pairs = {(c.a.variant, c.b.variant, c.a.metric) for c in claims}
    # SADA-JEM more stable and more accurate than JEM and JEM++; the JEM family better calibrated than
    # a softmax classifier; log p(x) against the classifier's confidence; SAM and FID; sampler steps
    assert ("sadajem_k5", "jem_k20", "diverged") in pairs
    assert ("sadajem_k5", "jem_k20", "accuracy") in pairs and ("sadajem_k5", "jempp_m10", "accuracy") in pairs
    assert {("sadajem_k10", "softmax", "ece"), ("jempp_m10", "softmax", "ece")} <= pairs
    assert any(a.startswith("ood.log_px") and b.startswith("ood.max_prob") for a, b in metrics)
    assert ("jem_k10_sam", "jem_k10", "fid") in pairs and ("sadajem_k10", "sadajem_k10_nosam", "fid") in pairs
    assert ("sadajem_k20", "sadajem_k5", "accuracy") in pairs and ("jempp_m10", "jempp_m5", "accuracy") in pairs
    assert {"SADA-JEM", "JEM++"} <= {c.source.split(",")[0] for c in claims}


def _published_values(variant: str, metric: str) -> list[tuple[str, str, float]]:
    """(table, row label, value) of every published number of ``variant`` for a claim metric."""
    found = []
    for name, spec in PUBLISHED.items():
        for row in spec["rows"]:
            if row["variant"] != variant:
                continue
            if metric.startswith("ood."):
                _, score, ood = metric.split(".")
                value = row.get(OOD_COLUMNS[ood]) if row.get("score") == score else None
            else:
                value = row.get(metric)
            if isinstance(value, (int, float)):
                found.append((name, row.get("score", ""), float(value)))
    return found


def test_every_claim_with_published_numbers_holds_on_them():
    """A claim transcribed from a table is true of that table: a better than b in every table giving both."""
    checked = 0
    for c in _claims():
        a = {(t, s): v for t, s, v in _published_values(c.a.variant, c.a.metric)}
        b = {(t, s): v for t, s, v in _published_values(c.b.variant, c.b.metric)}
        tables = {t for t, _ in a} & {t for t, _ in b}
        for table in tables:
            for va in (v for (t, _), v in a.items() if t == table):
                for vb in (v for (t, _), v in b.items() if t == table):
                    assert (va > vb) if c.better == "higher" else (va < vb), f"{c.id} in {table}: {va} vs {vb}"
                    checked += 1
    assert checked >= 50


def _values(table: dict[tuple[str, str], dict[int, float | str]]):
    return lambda variant, metric: table.get((variant, metric), {})


def test_a_claim_holds_fails_is_not_run_or_not_measured_and_counts_its_seeds():
    better_acc = Claim("acc", "a classifies better", "SADA-JEM, Table 1", "higher", Side("a", "accuracy"),
                       Side("b", "accuracy"), "accuracy")
    values = _values({("a", "accuracy"): {1: 0.9, 2: 0.7, 3: 0.95}, ("b", "accuracy"): {1: 0.8, 2: 0.75, 3: 0.8},
                      ("a", "fid"): {1: "unavailable", 2: "unavailable"}, ("b", "fid"): {1: 30.0, 2: 31.0}})
    row = evaluate(better_acc, values, {"a", "b"})
    assert row["status"] == "holds" and row["seeds holding"] == "2 of 3"  # seed 2: 0.7 < 0.75
    assert row["ours a"] == "0.85 ± 0.13 (3)" and row["ours b"] == "0.7833 ± 0.029 (3)"

    lower_is_better = Claim("ece", "b calibrated better", "JEM++, Table 6", "lower", Side("a", "accuracy"),
                            Side("b", "accuracy"), "accuracy")
    row = evaluate(lower_is_better, values, {"a", "b"})
    assert row["status"] == "does not hold" and row["seeds holding"] == "1 of 3"

    assert evaluate(better_acc, values, {"a"})["status"] == "not run"
    assert "b did not run" in evaluate(better_acc, values, {"a"})["why"]
    fid = Claim("fid", "a better FID", "SADA-JEM, Table 5", "lower", Side("a", "fid"), Side("b", "fid"), "fid")
    row = evaluate(fid, values, {"a", "b"})
    assert row["status"] == "not measured" and "a fid: unavailable" in row["why"]

    # two metrics of one variant (OOD by log p(x) vs by the classifier's confidence), seeds paired
    ood = Claim("ood", "log p(x) separates SVHN better", "JEM++, Table 7", "higher",
                Side("a", "ood.log_px.svhn"), Side("a", "ood.max_prob.svhn"), None)
    values = _values({("a", "ood.log_px.svhn"): {1: 0.9, 2: 0.7}, ("a", "ood.max_prob.svhn"): {1: 0.85, 2: 0.85}})
    row = evaluate(ood, values, {"a"})
    assert row["status"] == "does not hold" and row["seeds holding"] == "1 of 2" and row["metric"] == \
        "ood.log_px.svhn vs ood.max_prob.svhn"
    tie = Claim("tie", "a diverges less", "SADA-JEM, Sec. 4", "lower", Side("a", "diverged"), Side("b", "diverged"),
                "diverged")
    row = evaluate_all([tie], _values({("a", "diverged"): {1: 0.0}, ("b", "diverged"): {1: 0.0}}), {"a", "b"})[0]
    assert row["status"] == "does not hold" and "(a tie)" in row["why"]


def test_claim_values_are_each_seeds_number_from_the_runs_metrics_or_why_there_is_none(tmp_path: Path):
    """What a claim's sides read: the papers' tables' per-seed values (accuracy in %, OOD AUROC by score and
    set), divergence from the train metrics, and why a seed has no number."""
    write_metrics(tmp_path / "train" / "a" / "seed1.json", {"status": "ok", "divergence_events": 2,
                                                           "events_per_1k_iters": 4.0})
    write_metrics(tmp_path / "train" / "a" / "seed2.json", {"status": "diverged", "diverged_at_epoch": 3,
                                                           "divergence_events": 1})
    write_metrics(tmp_path / "eval" / "a" / "seed1.json", {"status": "ok", "accuracy": 0.9,
                                                          "ood": {"log_px": {"svhn": 0.8}}})
    values = claim_values(Runs(tmp_path, ["a"], [1, 2, 3], read=read_metrics), "buffer")
    assert values("a", "accuracy") == {1: pytest.approx(90.0), 2: "diverged at epoch 3", 3: "not computed"}
    assert values("a", "ood.log_px.svhn")[1] == pytest.approx(0.8)
    assert values("a", "ood.max_prob.svhn")[1] == "not computed"
    assert values("a", "diverged") == {1: 1.0, 2: 1.0, 3: "not run"}
    assert values("a", "divergence_events_per_1k") == {1: 4.0, 2: "not recorded", 3: "not recorded"}
    assert values("a", "fid")[1] == "not computed"


@pytest.mark.parametrize(("entry", "message"), [
    ({"metric": "accuracy_top5"}, "unknown metric 'accuracy_top5'"),
    ({"a": "sadajem_k55"}, "variant 'sadajem_k55' is not under `methods`"),
    ({"better": "bigger"}, "better = 'bigger': expected 'higher' or 'lower'"),
    ({"source": None, "claim": None}, None),
])
def test_a_malformed_claim_is_one_line_naming_it(tmp_path: Path, entry, message):
    good = {"id": "x", "claim": "c", "source": {"paper": "SADA-JEM", "where": "Table 1"}, "metric": "accuracy",
            "better": "higher", "a": "sadajem_k5", "b": "jem_k20"}
    raw = {k: v for k, v in {**good, **entry}.items() if v is not None}
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": [raw]}))
    with pytest.raises(InputError) as err:
        load_claims(path, set(PARAMS["methods"]))
    assert "claims[0] (x)" in str(err.value) and "\n" not in str(err.value)
    assert (message or "missing claim, source") in str(err.value)
