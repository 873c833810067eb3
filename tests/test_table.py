"""`python -m stages.table`'s own parts: choosing a table keeps params.yaml as its author wrote it, and
the workers' devices. The end-to-end run (two workers against a sequential repro, a killed worker) is in
tests/test_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.common import StageError
from pipeline.table import set_variants, slots

ROOT = Path(__file__).resolve().parents[1]


def test_choosing_a_table_sets_variants_and_keeps_every_comment(tmp_path: Path):
    original = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(original)
    table = yaml.safe_load(original)["tables"]["sadajem_table5"]
    set_variants(path, table)
    edited = path.read_text()
    before, after = yaml.safe_load(original), yaml.safe_load(edited)
    assert after["variants"] == table
    assert {k: v for k, v in after.items() if k != "variants"} == {k: v for k, v in before.items() if k != "variants"}
    comments = [line.strip() for line in original.splitlines() if line.strip().startswith("#")]
    assert all(c in edited for c in comments)
    assert len(edited.splitlines()) <= len(original.splitlines())  # the list on one line, nothing else moved


def test_workers_and_their_devices():
    assert slots("0,1", 2, None) == ["0", "0", "1", "1"]
    assert slots(None, 1, 3) == [None, None, None]
    assert slots(None, 1, None) == [None, None]
    with pytest.raises(StageError, match=r"--devices 'cuda:0': expected CUDA device indices"):
        slots("cuda:0", 1, None)


def test_only_picks_runs_by_variant_run_or_array_index():
    from pipeline.table import pick, runs_of

    table = ["sadajem_k5", "softmax", "jem_k20"]
    assert pick(table, ["2"]) == ["jem_k20-1"]
    assert pick(table, ["softmax,0", "softmax"]) == ["softmax-1", "sadajem_k5-1"]
    with pytest.raises(StageError, match=r"--only 3: the table has 3 runs \(3 variants x 1 seeds; indices 0-2"):
        pick(table, ["3"])
    with pytest.raises(StageError, match=r"--only jem_k10: not a variant or run of this table"):
        pick(table, ["jem_k10"])
    # two seeds: one array task per run, a variant name takes all its seeds
    assert runs_of(table, [1, 2])[:3] == ["sadajem_k5-1", "sadajem_k5-2", "softmax-1"]
    assert pick(table, ["3"], [1, 2]) == ["softmax-2"]
    assert pick(table, ["jem_k20", "softmax-2"], [1, 2]) == ["jem_k20-1", "jem_k20-2", "softmax-2"]


def test_the_tasks_of_one_slurm_array_share_their_table_run(monkeypatch):
    from pipeline.table import default_run_id

    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    assert default_run_id("sadajem_table1") == "sadajem_table1-slurm4242"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert default_run_id(None).startswith("variants-20")


def test_the_printed_link_opens_the_runs_table_filtered_to_the_table_run(tmp_path, monkeypatch):
    """MLflow's UI reads ``workflowType`` and ``searchFilter`` from the URL (the served bundle is checked
    in tests/test_pipeline.py): the link lands on the runs table, not the GenAI overview."""
    from urllib.parse import unquote

    from mlflow.tracking import MlflowClient

    from pipeline.table import runs_url

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert runs_url({}, "tiny", "demo-1") is None  # no experiment yet: no link
    experiment = MlflowClient(tracking_uri=store).create_experiment("jem-tiny")
    url = runs_url({}, "tiny", "demo-1")
    assert url == (f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning"
                   "&searchFilter=tags.table_run%20%3D%20%27demo-1%27")
    assert unquote(url.split("searchFilter=")[1]) == "tags.table_run = 'demo-1'"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000/")
    monkeypatch.setattr("mlflow.tracking.MlflowClient.get_experiment_by_name",
                        lambda self, name: type("E", (), {"experiment_id": "7"})())
    assert runs_url({}, "paper", "t").startswith("http://mlflow.lab:5000/#/experiments/7/runs?")
