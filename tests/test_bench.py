"""The benchmark entry point: what it times, what it writes, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jem.bench import main

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")


def test_side_by_side_training_rows_and_report(tmp_path):
    report, out = tmp_path / "performance.md", tmp_path / "bench.json"
    rc = main(["--params", PARAMS, "--variant", "softmax", "--device", "cpu", "--batch", "4", "--steps", "1",
               "--warmup", "0", "--compare", "--compile", "off", "--report", str(report), "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["baseline", "fast"]
    for r in rows:
        assert r["batch"] == 4 and r["ms_per_iter"] > 0
        assert abs(r["images_per_s"] - 4 / (r["ms_per_iter"] / 1e3)) < 1e-6 * r["images_per_s"]
    assert rows[0]["perf"]["channels_last"] is False and rows[1]["perf"]["channels_last"] is True
    text = report.read_text()
    assert "## Training" in text and "| softmax | baseline |" in text and "| softmax | fast |" in text
    assert "- softmax: **" in text and "## FID" not in text


@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore:invalid value encountered")  # 6 samples, 2048 dims
def test_fid_timing_of_the_fid_stages_work(tmp_path):
    report, out = tmp_path / "performance.md", tmp_path / "bench.json"
    rc = main(["--params", PARAMS, "--device", "cpu", "--skip-train", "--fid", "6", "--fid-batch", "4",
               "--report", str(report), "--json", str(out)])
    assert rc == 0
    fid = json.loads(out.read_text())["fid"]
    assert fid["images"] == 6 and fid["weights"].startswith("random")
    assert fid["total_s"] >= fid["features_s"] > 0
    # the per-sample part scales to 50,000; the square root does not
    per_sample = (fid["features_s"] + fid["stats_is_s"]) / 6
    assert abs(fid["projected_50k_s"] - (50_000 * per_sample + fid["frechet_s"])) < 1e-6 * fid["projected_50k_s"]
    text = report.read_text()
    assert "## FID and IS" in text and "## Training" not in text and "| 6 |" in text


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["--params", PARAMS, "--skip-train"]) == 2
    assert "add --fid N" in capsys.readouterr().err
    assert main(["--params", PARAMS, "--skip-train", "--fid", "1"]) == 2
    assert "at least 2 samples" in capsys.readouterr().err
    assert main(["--params", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read --params" in capsys.readouterr().err
    assert main(["--params", PARAMS, "--variant", "no_such_variant", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    missing = tmp_path / "weights.pth"
    assert main(["--params", PARAMS, "--device", "cpu", "--skip-train", "--fid", "4",
                 "--inception-weights", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
