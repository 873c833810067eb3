"""The report stage on hand-written metrics: exactly the rows of the variants that ran, paper values, differences."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from jem.config.errors import InputError
from jem.config.instances import instance_settings
from jem.report.build import read_inputs
from jem.report.published import FLAG, Footnotes, build_table
from jem.report.runs import Runs
from pipeline.outputs import read_metrics, write_metrics

from .conftest import ROOT, run_ok, stage_env

RAN = ("softmax", "sadajem_k5")


def _write(path: Path, data: dict) -> None:
    """As the stages write metrics: numbers in ``path``, the rest in its ``.notes.json``."""
    write_metrics(path, data)


SEEDS = (1, 2)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """Two variants, two seeds each: seed 2's accuracy is 2 points above seed 1's."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["variants"] = list(RAN)
    params["seeds"] = list(SEEDS)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "reports").mkdir()
    for name in ("published.yaml", "claims.yaml"):
        shutil.copy(ROOT / "reports" / name, tmp_path / "reports" / name)
    m = tmp_path / "metrics" / "demo"
    for i, v in enumerate(RAN):
        for seed in SEEDS:
            run = f"{v}/seed{seed}.json"
            _write(m / "eval" / run, {
                "variant": v, "seed": seed, "status": "ok", "family": v.split("_")[0], "dataset": "cifar10",
                "source": "shapes", "accuracy": 0.5 + 0.1 * i + 0.02 * (seed - 1), "ece": 0.02 * (i + 1),
                "ood": {s: {"svhn": 0.6 + 0.01 * i, "interp": 0.55, "cifar100": 0.52, "celeba": 0.7}
                        for s in ("log_px", "max_prob", "grad_norm")}})
            _write(m / "train" / run, {"steps": 100, "epochs": 2, "train_seconds": 60.0 * (i + 1), "val_acc": 0.5,
                                       "status": "ok", "diverged": 0, "divergence_events": 0,
                                       "events_per_1k_iters": 0.0})
            _write(m / "robustness" / run, {
                "variant": v, "images": 10, "pgd_linf": {"2/255": 0.4, "8/255": 0.1}, "pgd_l2": {"0.5": 0.3},
                "bpda": ({"status": "not applicable", "reason": "softmax baseline"} if v == "softmax" else
                         {"status": "ok", "norm": "linf", "images": 5, "8/255": 0.2})})
    for seed in SEEDS:
        _write(m / "fid" / f"softmax/seed{seed}.json", {"variant": "softmax", "status": "not applicable",
                                                       "reason": "no samples"})
        _write(m / "fid" / f"sadajem_k5/seed{seed}.json", {
            "variant": "sadajem_k5", "status": "ok", "protocol": "sadajem",
            "buffer": {"n": 500, "protocol": "sadajem", "is": 7.5, "is_std": 0.1, "fid": 20.0, "protocols": {
                "whole": {"is": 6.5, "is_std": 0.2, "fid": 25.0}, "sadajem": {"is": 7.5, "is_std": 0.1, "fid": 20.0}}}})
    # seed 2 of sadajem_k5 diverged once and recovered
    _write(m / "train" / "sadajem_k5/seed2.json", {
        "steps": 100, "epochs": 2, "train_seconds": 120.0, "val_acc": 0.5, "status": "ok", "diverged": 1,
        "divergence_events": 1, "events_per_1k_iters": 10.0, "first_divergence_epoch": 2, "remedies": "reseed",
        "divergence_log": [{"step": 60, "epoch": 2, "signal": "non_finite", "reason": "non-finite loss",
                            "remedy": "reseed"}]})
    return tmp_path


def test_report_rows_values_spread_and_footnotes(workspace: Path):
    env = {**stage_env(), "DVC_ROOT": str(workspace), "PYTHONPATH": str(ROOT)}
    run_ok([sys.executable, "-m", "stages.report", "--metrics", "metrics/demo", "--plots", "plots/demo",
            "--samples", "samples/demo", "--published", "reports/published.yaml", "--claims", "reports/claims.yaml",
            "--out", "reports/demo"], workspace, env)
    out = workspace / "reports" / "demo"
    summary = pd.read_csv(out / "summary.csv").set_index("variant")
    assert summary.index.tolist() == list(RAN)
    assert summary.loc["sadajem_k5", "test acc %"] == pytest.approx(61.0)
    assert summary.loc["sadajem_k5", "test acc % seed 2"] == pytest.approx(62.0)
    assert pd.read_csv(out / "robustness.csv")["variant"].tolist() == list(RAN)

    published = yaml.safe_load((workspace / "reports" / "published.yaml").read_text())
    t1 = pd.read_csv(out / "sadajem_table1.csv")
    assert t1["variant"].tolist() == [r["variant"] for r in published["sadajem_table1"]["rows"]]
    sada = t1.set_index("variant").loc["sadajem_k5"]
    # mean +- std (n) over the seeds, each seed's value beside them
    assert float(sada["accuracy ours"]) == pytest.approx(61.0) and float(sada["accuracy n"]) == 2
    assert float(sada["accuracy std"]) == pytest.approx(2 ** 0.5)
    assert float(sada["accuracy seed 1"]) == pytest.approx(60.0)
    assert float(sada["accuracy seed 2"]) == pytest.approx(62.0)
    assert float(sada["accuracy paper"]) == 95.5 and float(sada["fid ours"]) == 20.0
    # the demo scale: the published numbers beside ours, no difference anywhere, and one sentence why
    assert not [c for c in t1.columns if c.endswith("diff")]
    assert t1.set_index("variant").loc["softmax", "fid ours"] == "not applicable"
    for v in set(t1["variant"]) - set(RAN):
        assert t1.set_index("variant").loc[v, "accuracy ours"] == "not run"

    # IS/FID under the paper's protocol, the other protocol beside it; notes say what differs
    assert sada["IS/FID protocol"] == "sadajem (as the paper)"
    assert sada["other protocols"] == "whole: IS 6.50, FID 25.00"
    assert "all 50,000 training images" in sada["paper note"]
    notes = t1.set_index("variant")["paper note"]
    assert "ensemble" in notes["jem_k20"] and "copied from JEM++ Table 2" in notes["jempp_m10"]
    md = (out / "sadajem_table1.md").read_text()
    assert "| 61.00 ± 1.41 (2) |" in md and "95.50" in md
    assert "No difference column: at the demo scale" in md
    # footnotes: numbered, each text said once, the rows pointing at them
    assert "*Notes*:" in md and md.count("trains on all 50,000 training images") == 1
    note_no = str(sada["notes"]).split(", ")[0]
    assert f"\n{note_no}. " in md and "paper note" not in md
    ece = pd.read_csv(out / "sadajem_ece.csv")
    assert ece["variant"].tolist() == ["c100_sadajem_k10", "c100_jem_k20", "c100_softmax", "sadajem_k10", "jem_k20",
                                       "softmax"]
    assert all("CIFAR-10" in n and "CIFAR-100" in n for n in ece["paper note"])  # the ambiguity on every row
    assert (out / "sadajem_ece.md").read_text().count("Fig. 4's caption") == 1  # but said once
    assert float(ece.set_index("variant").loc["softmax", "ece ours"]) == pytest.approx(2.0)  # the CIFAR-10 comparison
    assert all("CelebA" in n for n in pd.read_csv(out / "sadajem_table3.csv")["paper note"])

    t3 = pd.read_csv(out / "sadajem_table3.csv")
    row = t3[(t3["variant"] == "sadajem_k5") & (t3["score"] == "log p(x)")].iloc[0]
    assert float(row["cifar10_interp ours"]) == 0.55 and float(row["svhn ours"]) == pytest.approx(0.61)
    t4 = pd.read_csv(out / "jempp_table4.csv").set_index("variant")
    assert t4.loc["jempp_m10", "minutes_per_epoch ours"] == "not run"
    assert "minutes_per_epoch paper" in t4.columns and "minutes_per_epoch diff" not in t4.columns
    rob = pd.read_csv(out / "robustness.csv").set_index("variant")
    assert rob.loc["sadajem_k5", "BPDA+EOT linf 8/255"] == 20.0 and rob.loc["softmax", "PGD Linf 8/255"] == 10.0

    # stability: seed 2 of sadajem_k5 diverged once and recovered
    stab = pd.read_csv(out / "stability.csv").set_index("variant")
    assert stab.loc["sadajem_k5", "diverged / runs"] == "1 / 2" and stab.loc["softmax", "diverged / runs"] == "0 / 2"
    assert stab.loc["sadajem_k5", "events per 1,000 iterations"] == pytest.approx(5.0)
    assert str(stab.loc["sadajem_k5", "first divergence epoch"]) == "2"
    assert stab.loc["sadajem_k5", "signals"] == "non_finite x1"
    assert stab.loc["sadajem_k5", "outcome"] == "seed 2: reseed (recovered)"

    # claims: every claim in the CSV; the shown ones are those whose variants ran
    claims = pd.read_csv(out / "claims.csv").set_index("id")
    assert len(claims) == len(yaml.safe_load((ROOT / "reports" / "claims.yaml").read_text())["claims"])
    ran = claims[claims["status"] != "not run"]
    assert len(ran) and set(ran["status"]) <= {"holds", "does not hold", "not measured"}
    text = (out / "README.md").read_text()
    assert "## The papers' claims" in text and "## Stability" in text
    assert "metrics/demo/<stage>/<variant>/seed<seed>.json" in text and "SADA-JEM Table 6" in text
    assert text.count("No difference column") == 1  # once above the tables
    assert "Missing inputs" in text  # no plots or samples were given: said so, not hidden


def test_missing_metrics_and_unknown_published_variants_stop_the_report_before_it_writes(workspace: Path):
    """read_inputs: a published row naming a variant params.yaml does not define, or a run without train or
    evaluate metrics, is one line that says what is wrong (the stage checks them before it starts its run)."""
    settings = instance_settings(yaml.safe_load((workspace / "params.yaml").read_text()), "report")
    metrics, claims = workspace / "metrics" / "demo", workspace / "reports" / "claims.yaml"
    published = workspace / "reports" / "published.yaml"
    inputs = read_inputs(settings, metrics, published, claims, read_metrics)
    assert inputs.runs.variants == list(RAN) and inputs.runs.seeds == list(SEEDS) and inputs.claims

    text = published.read_text()
    published.write_text(text.replace("{variant: softmax,", "{variant: no_such_variant,", 1))
    with pytest.raises(InputError, match=r"published\.yaml: rows name variants not in params\.yaml methods: "
                                         r"no_such_variant$"):
        read_inputs(settings, metrics, published, claims, read_metrics)
    published.write_text(text)

    (metrics / "eval" / "softmax" / "seed2.json").unlink()
    (metrics / "train" / "sadajem_k5" / "seed1.json").unlink()
    with pytest.raises(InputError, match=r"^no train or evaluate metrics for sadajem_k5/seed1, softmax/seed2 "
                                         r"under .*demo; run dvc repro \(the train and evaluate stages come first\)$"):
        read_inputs(settings, metrics, published, claims, read_metrics)


def test_at_the_paper_scale_a_difference_is_printed_only_like_for_like_and_flagged_outside_two_std(tmp_path: Path):
    for seed, acc in ((1, 0.60), (2, 0.62), (3, 0.61)):
        _write(tmp_path / "eval" / "sadajem_k5" / f"seed{seed}.json", {"accuracy": acc, "ece": 0.02, "status": "ok"})
        _write(tmp_path / "eval" / "softmax" / f"seed{seed}.json", {"accuracy": 0.95, "ece": 0.02, "status": "ok"})
    runs = Runs(tmp_path, ["sadajem_k5", "softmax"], [1, 2, 3], read=read_metrics)
    spec = {"columns": ["accuracy", "minutes_per_epoch"], "rows": [
        {"variant": "sadajem_k5", "label": "same way", "accuracy": 95.5},
        {"variant": "softmax", "label": "within", "accuracy": 95.0},
        {"variant": "softmax", "label": "other way", "accuracy": 95.8, "measured": "ensemble of models"}]}
    table = build_table(spec, runs, "buffer", "paper")
    data, shown = table.data.set_index("row"), table.shown.set_index("row")
    assert data.loc["same way", "accuracy diff"] == pytest.approx(61.0 - 95.5)
    assert bool(data.loc["same way", "accuracy outside 2 std"])
    assert shown.loc["same way", "accuracy diff"].endswith(FLAG)
    assert data.loc["within", "accuracy diff"] == pytest.approx(0.0)
    assert not shown.loc["within", "accuracy diff"].endswith(FLAG)
    assert pd.isna(data.loc["other way", "accuracy diff"]) and shown.loc["other way", "accuracy diff"] == "-"
    assert "minutes_per_epoch diff" not in data.columns  # never measured the same way
    assert table.notes[0] == "ensemble of models." and shown.loc["other way", "notes"] == "1"
    assert any(n.startswith(FLAG) for n in table.notes)
    assert shown.loc["same way", "accuracy ours"] == "61.00 ± 1.00 (3)"
    one = build_table(spec, Runs(tmp_path, ["sadajem_k5", "softmax"], [1], read=read_metrics), "buffer", "paper")
    assert any("One seed per variant" in n for n in one.notes)  # no spread: nothing can be flagged


def test_footnotes_number_each_text_once():
    notes = Footnotes()
    assert [notes.ref("a"), notes.ref("b."), notes.ref("a."), notes.ref("c")] == [1, 2, 1, 3]
    assert notes.render() == "1. a.\n2. b.\n3. c."


def test_a_row_without_a_stated_protocol_gets_the_familys_and_says_so(tmp_path: Path):
    _write(tmp_path / "fid" / "jem_k20" / "seed1.json", {"variant": "jem_k20", "status": "ok", "buffer": {
        "n": 100, "protocol": "whole", "is": 5.0, "fid": 40.0,
        "protocols": {"whole": {"is": 5.0, "fid": 40.0}, "sadajem": {"is": 6.0, "fid": 35.0}}}})
    runs = Runs(tmp_path, ["jem_k20"], read=read_metrics)
    spec = {"columns": ["is", "fid"], "rows": [
        {"variant": "jem_k20", "label": "not stated", "is": 8.76, "fid": 38.4, "protocol": None,
         "measured": "ensemble"},
        {"variant": "jem_k20", "label": "stated", "is": 8.0, "fid": 30.0, "protocol": "sadajem"}]}
    table = build_table(spec, runs, "buffer").data.set_index("row")
    assert table.loc["not stated", "fid ours"] == 40.0 and table.loc["stated", "fid ours"] == 35.0
    assert table.loc["not stated", "IS/FID protocol"] == "whole (the family's; the paper does not say)"
    assert table.loc["stated", "IS/FID protocol"] == "sadajem (as the paper)"
    assert table.loc["stated", "other protocols"] == "whole: IS 5.00, FID 40.00"
    assert table.loc["not stated", "paper note"] == "ensemble."
    assert table.loc["stated", "fid diff"] == pytest.approx(5.0)


def test_every_published_is_fid_row_names_its_protocol_or_says_why_not():
    """Like with like: an IS/FID row states how the paper selected the images (sadajem or whole),
    or is null with a note saying how the published number was measured (ensemble, not stated)."""
    from jem.config.settings import PROTOCOLS

    published = yaml.safe_load((ROOT / "reports" / "published.yaml").read_text())
    checked = 0
    for name, spec in published.items():
        if not {"is", "fid"} & set(spec["columns"]):
            continue
        for row in spec["rows"]:
            if all(row.get(c) is None for c in ("is", "fid")):
                continue  # no published IS/FID to compare with
            protocol = row.get("protocol", spec.get("protocol", "missing"))
            assert protocol in (*PROTOCOLS, None), f"{name} {row['label']}: protocol {protocol!r}"
            if protocol is None:
                assert "ensemble" in row.get("measured", "") or "not stated" in row.get("measured", ""), \
                    f"{name} {row['label']}: no protocol and no note on how it was measured"
            checked += 1
    assert checked >= 30
    ece = published["sadajem_ece"]["rows"]
    assert all("CIFAR-10" in r["measured"] and "CIFAR-100" in r["measured"] for r in ece)
