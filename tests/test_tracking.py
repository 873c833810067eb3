"""What DVC reads from the stages: numbers-only metrics files, cross-variant plot tables, and the
params check that runs before DVC looks up ``scale`` and ``variants``."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jem.report.plot_data import write_ood_histograms, write_variant_tables
from pipeline.outputs import notes_path, read_metrics, write_metrics

from .conftest import copy_repo, run_ok, stage_env


def test_metrics_files_hold_numbers_and_the_notes_file_the_rest(tmp_path: Path):
    data = {"variant": "v", "accuracy": 0.5, "steps": 10, "val_acc": None, "ok": True, "bad": math.nan,
            "bpda": {"status": "ok", "norm": "linf", "8/255": 0.25}, "fid": {"status": "unavailable"}}
    path = tmp_path / "m" / "v.json"
    write_metrics(path, data)
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "steps": 10, "bpda": {"8/255": 0.25}}
    notes = json.loads(notes_path(path).read_text())
    assert notes_path(path).name == "v.notes.json"
    assert notes["variant"] == "v" and notes["val_acc"] is None and notes["ok"] is True
    assert notes["bpda"] == {"status": "ok", "norm": "linf"} and notes["fid"] == {"status": "unavailable"}
    joined = read_metrics(path)
    assert math.isnan(joined.pop("bad")) and joined == {k: v for k, v in data.items() if k != "bad"}
    assert read_metrics(tmp_path / "m" / "absent.json") is None


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_plot_tables_put_each_variant_in_its_own_column(tmp_path: Path):
    plots, out = tmp_path / "plots", tmp_path / "out"
    for i, v in enumerate(("a", "b")):
        _csv(plots / "train" / v / "val.csv", ["epoch", "step", "val_acc", "val_ece"], [[1, 8, 0.1 + i, 0.0]])
        _csv(plots / "train" / v / "steps.csv", ["step", "loss"], [[4, 2.0], [8, 1.0 + i]])
        _csv(plots / "eval" / v / "reliability.csv", ["bin_low", "bin_high", "confidence", "accuracy", "count"],
             [[0.0, 0.5, 0.3, 0.2, 4], [0.5, 1.0, 0.0, 0.0, 0]])
        _csv(plots / "eval" / v / "landscape.csv", ["alpha", "energy_sum"], [[-1, 5.0], [0, 1.0], [1, 4.0]])
        attacks = [["PGD linf", "linf", 8, 0.5], ["PGD l2", "l2", 0.5, 0.6]]
        if v == "b":
            attacks.append(["BPDA+EOT linf", "linf", 8, 0.4])
        _csv(plots / "robustness" / v / "curve.csv", ["attack", "norm", "radius", "accuracy"], attacks)
    write_ood_histograms(plots / "eval" / "a", {"test": {"log_px": np.array([0.0, 1.0, 2.0])},
                                                "svhn": {"log_px": np.array([-1.0, 0.0])}}, ("log_px",), bins=4)
    missing = write_variant_tables(plots, ["a", "b"], out, ["svhn", "cifar100"])

    assert _rows(out / "val_acc.csv") == [{"epoch": "1.0", "a": "0.1", "b": "1.1"}]
    assert [r["b"] for r in _rows(out / "train_loss.csv")] == ["2.0", "2.0"]
    assert _rows(out / "reliability.csv") == [{"confidence": "0.25", "a": "0.2", "b": "0.2"}]  # empty bin left out
    assert _rows(out / "robustness_bpda_eot_linf.csv") == [{"radius": "8.0", "a": "", "b": "0.4"}]
    assert len(_rows(out / "landscape.csv")) == 3
    hist = _rows(out / "ood" / "a_log_px.csv")
    assert list(hist[0]) == ["score", "test", "svhn", "cifar100"] and len(hist) == 4
    assert all(r["cifar100"] == "" for r in hist)  # a set the variant skipped: a blank column, not a missing one
    width = float(hist[1]["score"]) - float(hist[0]["score"])
    assert sum(float(r["test"]) for r in hist) * width == pytest.approx(1.0)  # a density
    assert missing == [str(plots / "eval" / "b" / "ood_<score>.csv")]


def test_an_unknown_scale_stops_dvc_repro_with_our_one_line_before_dvc_looks_it_up(tmp_path: Path):
    copy_repo(tmp_path)
    env = stage_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run_ok(cmd, tmp_path, env)
    dvc = [sys.executable, "-m", "dvc"]
    for key, value, allowed in (("scale", "nonsense", "defined: demo, paper, tiny"),
                                ("variants", ["softmax", "nope"], "defined: c100_jem_k20")):
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        params[key] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = subprocess.run([*dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        shown = value if isinstance(value, str) else value[1]
        assert len(errors) == 1 and f"{key}: '{shown}' is not defined; {allowed}" in errors[0], out
        assert "missing from 'params.yaml'" not in out and "Running stage 'prepare" not in out, out
        assert not (tmp_path / "data" / str(value)).exists()
        run_ok(["git", "checkout", "params.yaml"], tmp_path, env)
