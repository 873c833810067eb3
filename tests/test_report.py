"""The report stage on hand-written metrics: exactly the rows of the variants that ran, paper values, differences."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages.outputs import write_metrics

from .conftest import ROOT, run_ok, stage_env

RAN = ("softmax", "sadajem_k5")


def _write(path: Path, data: dict) -> None:
    """As the stages write metrics: numbers in ``path``, the rest in its ``.notes.json``."""
    write_metrics(path, data)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["variants"] = list(RAN)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "reports").mkdir()
    shutil.copy(ROOT / "reports" / "published.yaml", tmp_path / "reports" / "published.yaml")
    m = tmp_path / "metrics" / "demo"
    for i, v in enumerate(RAN):
        _write(m / "eval" / f"{v}.json", {
            "variant": v, "family": v.split("_")[0], "dataset": "cifar10", "source": "shapes",
            "accuracy": 0.5 + 0.1 * i, "ece": 0.02 * (i + 1),
            "ood": {s: {"svhn": 0.6 + 0.01 * i, "interp": 0.55, "cifar100": 0.52, "celeba": 0.7}
                    for s in ("log_px", "max_prob", "grad_norm")}})
        _write(m / "train" / f"{v}.json", {"steps": 100, "epochs": 2, "train_seconds": 60.0 * (i + 1),
                                           "val_acc": 0.5})
        _write(m / "robustness" / f"{v}.json", {
            "variant": v, "images": 10, "pgd_linf": {"2/255": 0.4, "8/255": 0.1}, "pgd_l2": {"0.5": 0.3},
            "bpda": ({"status": "not applicable", "reason": "softmax baseline"} if v == "softmax" else
                     {"status": "ok", "norm": "linf", "images": 5, "8/255": 0.2})})
    _write(m / "fid" / "softmax.json", {"variant": "softmax", "status": "not applicable", "reason": "no samples"})
    _write(m / "fid" / "sadajem_k5.json", {"variant": "sadajem_k5", "status": "ok", "protocol": "sadajem",
                                           "buffer": {"n": 500, "protocol": "sadajem", "is": 7.5, "is_std": 0.1,
                                                      "fid": 20.0, "protocols": {
                                                          "whole": {"is": 6.5, "is_std": 0.2, "fid": 25.0},
                                                          "sadajem": {"is": 7.5, "is_std": 0.1, "fid": 20.0}}}})
    return tmp_path


def test_report_rows_values_and_differences(workspace: Path):
    env = {**stage_env(), "DVC_ROOT": str(workspace), "PYTHONPATH": str(ROOT)}
    run_ok([sys.executable, "-m", "stages.report", "--metrics", "metrics/demo", "--plots", "plots/demo",
            "--samples", "samples/demo", "--published", "reports/published.yaml", "--out", "reports/demo"],
           workspace, env)
    out = workspace / "reports" / "demo"
    assert pd.read_csv(out / "summary.csv")["variant"].tolist() == list(RAN)
    assert pd.read_csv(out / "robustness.csv")["variant"].tolist() == list(RAN)

    published = yaml.safe_load((workspace / "reports" / "published.yaml").read_text())
    t1 = pd.read_csv(out / "sadajem_table1.csv")
    assert t1["variant"].tolist() == [r["variant"] for r in published["sadajem_table1"]["rows"]]
    sada = t1.set_index("variant").loc["sadajem_k5"]
    assert float(sada["accuracy ours"]) == pytest.approx(60.0)
    assert float(sada["accuracy paper"]) == 95.5 and float(sada["accuracy diff"]) == pytest.approx(60.0 - 95.5)
    assert float(sada["fid ours"]) == 20.0 and float(sada["fid diff"]) == pytest.approx(20.0 - 9.41)
    assert t1.set_index("variant").loc["softmax", "fid ours"] == "not applicable"
    for v in set(t1["variant"]) - set(RAN):
        assert t1.set_index("variant").loc[v, "accuracy ours"] == "not run"

    # IS/FID under the paper's protocol, the other protocol beside it; notes say what differs
    assert sada["IS/FID protocol"] == "sadajem (as the paper)"
    assert sada["other protocols"] == "whole: IS 6.50, FID 25.00"
    assert "all 50,000 training images" in sada["paper note"]
    notes = t1.set_index("variant")["paper note"]
    assert "ensemble" in notes["jem_k20"] and "copied from JEM++ Table 2" in notes["jempp_m10"]
    ece = pd.read_csv(out / "sadajem_ece.csv")
    assert ece["variant"].tolist() == ["c100_sadajem_k10", "c100_jem_k20", "c100_softmax", "sadajem_k10", "jem_k20",
                                       "softmax"]
    assert all("CIFAR-10" in n and "CIFAR-100" in n for n in ece["paper note"])  # the ambiguity on every row
    assert float(ece.set_index("variant").loc["softmax", "ece ours"]) == pytest.approx(2.0)  # the CIFAR-10 comparison
    assert all("CelebA" in n for n in pd.read_csv(out / "sadajem_table3.csv")["paper note"])

    t3 = pd.read_csv(out / "sadajem_table3.csv")
    row = t3[(t3["variant"] == "sadajem_k5") & (t3["score"] == "log p(x)")].iloc[0]
    assert float(row["cifar10_interp ours"]) == 0.55 and float(row["svhn ours"]) == pytest.approx(0.61)
    t4 = pd.read_csv(out / "jempp_table4.csv").set_index("variant")
    assert t4.loc["jempp_m10", "minutes_per_epoch ours"] == "not run"
    # demo minutes of a WRN-10-1 beside the paper's WRN-28-10 GPU minutes: both shown, no difference
    assert "minutes_per_epoch paper" in t4.columns and "minutes_per_epoch diff" not in t4.columns
    rob = pd.read_csv(out / "robustness.csv").set_index("variant")
    assert rob.loc["sadajem_k5", "BPDA+EOT linf 8/255"] == 20.0 and rob.loc["softmax", "PGD Linf 8/255"] == 10.0
    text = (out / "README.md").read_text()
    assert "metrics/demo/eval/<variant>.json" in text and "SADA-JEM Table 6" in text
    assert "No *diff* column: run time is not compared at the demo scale" in text
    assert "Missing inputs" in text  # no plots or samples were given: said so, not hidden


def test_a_row_without_a_stated_protocol_gets_the_familys_and_says_so(tmp_path: Path):
    from stages.report import Runs, build_table

    _write(tmp_path / "fid" / "jem_k20.json", {"variant": "jem_k20", "status": "ok", "buffer": {
        "n": 100, "protocol": "whole", "is": 5.0, "fid": 40.0,
        "protocols": {"whole": {"is": 5.0, "fid": 40.0}, "sadajem": {"is": 6.0, "fid": 35.0}}}})
    runs = Runs(tmp_path, ["jem_k20"])
    spec = {"columns": ["is", "fid"], "rows": [
        {"variant": "jem_k20", "label": "not stated", "is": 8.76, "fid": 38.4, "protocol": None,
         "measured": "ensemble"},
        {"variant": "jem_k20", "label": "stated", "is": 8.0, "fid": 30.0, "protocol": "sadajem"}]}
    table = build_table(spec, runs, "buffer").set_index("row")
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
