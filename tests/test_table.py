"""`python -m stages.table`'s own parts: choosing a table keeps params.yaml as its author wrote it, and
the workers' devices. The end-to-end run (two workers against a sequential repro, a killed worker) is in
tests/test_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.common import StageError
from stages.table import set_variants, slots

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
