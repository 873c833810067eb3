"""A malformed params.yaml stops every stage before it touches anything: one line, exit status 2,
and every output already there (data, statistics, checkpoints, models, metrics, reports, the
MLflow store) left byte for byte as it was."""

from __future__ import annotations

import hashlib
import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from .test_settings import MALFORMED, edit, setitem

V = "sadajem_k5"
STAGES = {
    "configure": ["stages.configure", "--out", "config/demo/settings"],
    "prepare": ["stages.prepare", "--role", "cifar10", "--out", "data/demo/cifar10"],
    "gmm": ["stages.gmm", "--data", "data/demo/cifar10", "--out", "gmm/demo/cifar10"],
    "train": ["stages.train", "--variant", V, "--data", "data/demo", "--gmm", "gmm/demo", "--out", f"models/demo/{V}",
              "--metrics", f"metrics/demo/train/{V}.json", "--plots", f"plots/demo/train/{V}",
              "--checkpoints", f"checkpoints/demo/{V}"],
    "sample": ["stages.sample", "--model", f"models/demo/{V}", "--gmm", "gmm/demo", "--out", f"samples/demo/{V}"],
    "evaluate": ["stages.evaluate", "--model", f"models/demo/{V}", "--data", "data/demo",
                 "--metrics", f"metrics/demo/eval/{V}.json", "--plots", f"plots/demo/eval/{V}"],
    "fid_ref": ["stages.fid", "reference", "--data", "data/demo/cifar10", "--out", "fid_ref/demo/cifar10"],
    "fid": ["stages.fid", "score", "--samples", f"samples/demo/{V}", "--ref", "fid_ref/demo",
            "--metrics", f"metrics/demo/fid/{V}.json"],
    "robustness": ["stages.robustness", "--model", f"models/demo/{V}", "--data", "data/demo",
                   "--metrics", f"metrics/demo/robustness/{V}.json", "--plots", f"plots/demo/robustness/{V}"],
    "report": ["stages.report", "--metrics", "metrics/demo", "--plots", "plots/demo", "--samples", "samples/demo",
               "--published", "reports/published.yaml", "--out", "reports/demo"],
}
# what a finished (or interrupted) run leaves behind; the contents do not matter, only that they survive
EXISTING = [
    "data/demo/cifar10/train.npz", "data/demo/cifar10/meta.json", "gmm/demo/cifar10/stats.npz",
    f"checkpoints/demo/{V}/step-000000100.pt", f"models/demo/{V}/final.pt", f"metrics/demo/train/{V}.json",
    f"plots/demo/train/{V}/curves.png", f"samples/demo/{V}/samples.npz", f"samples/demo/{V}/info.json",
    f"metrics/demo/eval/{V}.json", f"plots/demo/eval/{V}/reliability.png", "fid_ref/demo/cifar10/stats.npz",
    f"metrics/demo/fid/{V}.json", f"metrics/demo/robustness/{V}.json", "reports/demo/README.md",
    "reports/published.yaml", "mlflow.db", f"config/demo/settings/train/{V}.yaml",
    f"config/demo/inputs/data/train/{V}.json",
]
NOT_YAML = "scale: demo\nvariants: [softmax\n"


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "params.yaml"}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for i, rel in enumerate(EXISTING):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"output {i} of an earlier run\n".encode() * 50)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def run_stage(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [argv[0], *argv[1:]])
    monkeypatch.delitem(sys.modules, argv[0], raising=False)  # run it as `python -m` would, from scratch
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=False)
    return int(stopped.value.code), capsys.readouterr().err


def check_rejected(workspace: Path, stage: str, params_text: str, message: str,
                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (workspace / "params.yaml").write_text(params_text)
    before = snapshot(workspace)
    code, err = run_stage(STAGES[stage], monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0].removeprefix("error: ")), lines[0]
    assert snapshot(workspace) == before, "a rejected params file changed the outputs"


@pytest.mark.parametrize("mutate,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_every_malformed_params_file_stops_train_and_changes_nothing(workspace, monkeypatch, capsys, mutate, message):
    """train has the most to lose (checkpoints, the final model): the whole table against it."""
    check_rejected(workspace, "train", yaml.safe_dump(edit(mutate), sort_keys=False), message, monkeypatch, capsys)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_checks_the_whole_file_before_its_outputs(workspace, monkeypatch, capsys, stage):
    # a typo in a section the stage does not read still stops it: the file is one configuration
    typo = yaml.safe_dump(edit(setitem("methods.jem_k20.sampler.stpes", 3)), sort_keys=False)
    check_rejected(workspace, stage, typo, r"methods.jem_k20.sampler.stpes: unknown key \(did you mean 'steps'\?\)",
                   monkeypatch, capsys)


@pytest.mark.parametrize("text,message", [
    (NOT_YAML, r"^params.yaml line \d+: not valid YAML"),
    ("- scale\n- demo\n", r"^params.yaml: expected a mapping at the top level"),
], ids=["not-yaml", "not-a-mapping"])
def test_unreadable_params_file(workspace, monkeypatch, capsys, text, message):
    check_rejected(workspace, "train", text, message, monkeypatch, capsys)
