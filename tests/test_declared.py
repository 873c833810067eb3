"""What dvc.yaml declares each stage instance reads: its resolved settings (stage configure) and the
fingerprints of its data files (stages inputs_data, inputs_fid), and the checks a stage makes on both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jem.config.instances import KINDS, instance_settings, instances
from pipeline.common import StageError
from pipeline.declared import Inputs, check_settings, inputs_path, settings_path, write_inputs, write_settings
from stages.inputs import reads

from .conftest import ROOT
from .test_settings import PARAMS, edit, setitem
from .test_stage_inputs import run_stage, snapshot

V = "sadajem_k5"


@pytest.mark.parametrize("scale", ["demo", "paper", "tiny"])
def test_every_instance_of_every_method_reads_back_equal_from_its_file(tmp_path: Path, scale: str):
    """The file DVC tracks is what the stage uses: written and read back, every instance's settings compare
    equal (YAML keeps every float, list and null), so the stage's check never fires on a fresh file."""
    params = edit(setitem("variants", list(PARAMS["methods"])))
    resolved = instances(params, scale)
    assert {kind for kind, _ in resolved} == set(KINDS)
    for (kind, name), settings in resolved.items():
        path = tmp_path / settings_path(scale, kind, name)
        write_settings(path, kind, name, settings)
        assert check_settings(path, settings) == settings, (kind, name)
        assert path.read_text().startswith(f"# What stage {kind}")


def test_a_variants_settings_are_its_own_and_resolved():
    train = instance_settings(PARAMS, "train", "jempp_m10", "demo")["variant"]
    assert train["sampler"]["inner_step_size"] == 0.2 and train["model"]["depth"] == 10  # family, then scale
    noisy = edit(setitem("evaluate.input_noise", {"default": 0.0, "jem": 0.03}))
    assert instance_settings(noisy, "evaluate", "jem_k20")["input_noise"] == 0.03
    assert instance_settings(noisy, "evaluate", "softmax")["input_noise"] == 0.0
    assert "cifar100" not in instance_settings(PARAMS, "evaluate", "c100_jem_k20")["ood_sets"]  # not OOD for itself
    assert "cifar100" in instance_settings(PARAMS, "evaluate", "jem_k20")["ood_sets"]
    assert instance_settings(PARAMS, "fid", "sadajem_k5")["protocol"] == "sadajem"
    assert instance_settings(PARAMS, "fid", "jem_k20")["protocol"] == "whole"
    assert instance_settings(PARAMS, "fid_ref", "cifar100")["reference_splits"] == ["train", "val"]
    # a softmax classifier builds no sampler or buffer: editing them leaves its settings as they were
    edited = edit(setitem("defaults.buffer.reinit_freq", 0.1))
    assert instance_settings(edited, "train", "softmax") == instance_settings(PARAMS, "train", "softmax")
    assert instance_settings(edited, "train", "sadajem_k5") != instance_settings(PARAMS, "train", "sadajem_k5")


def test_a_stale_settings_file_stops_the_stage_before_it_writes(tmp_path, monkeypatch, capsys):
    """`dvc repro --single-item`, or a file left from another params.yaml: one line naming the key."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edit(setitem(f"methods.{V}.optim", {"rho": 0.3}))))
    config = settings_path("demo", "train", V)
    write_settings(config, "train", V, instance_settings(PARAMS, "train", V, "demo"))
    before = snapshot(tmp_path)
    code, err = run_stage(["stages.train", "--variant", V, "--data", "data/demo", "--gmm", "gmm/demo",
                           "--out", f"models/demo/{V}", "--metrics", f"metrics/demo/train/{V}.json",
                           "--plots", f"plots/demo/train/{V}", "--checkpoints", f"checkpoints/demo/{V}",
                           "--config", str(config)], monkeypatch, capsys)
    assert code == 2
    assert err.strip() == (f"error: {config} is stale (variant.optim.rho: file 0.2, params.yaml 0.3); run dvc repro, "
                           "whose configure stage rewrites it before this stage")
    assert snapshot(tmp_path) == before


def test_inputs_are_checked_for_content_and_for_being_declared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = Path("data/tiny/cifar10")
    data.mkdir(parents=True)
    for name in ("train.npz", "test.npz"):
        (data / name).write_bytes(name.encode())
    listed = Path("config/tiny/inputs/data/robustness/x.json")
    write_inputs(listed, [data / "test.npz"])
    assert json.loads(listed.read_text())["files"].keys() == {"data/tiny/cifar10/test.npz"}
    inputs = Inputs(listed)
    assert inputs.need(data / "test.npz") == data / "test.npz"
    with pytest.raises(StageError, match=r"reads data/tiny/cifar10/train.npz, which .*x.json does not list"):
        inputs.need(data / "train.npz")
    assert Inputs(None).need(data / "train.npz")  # run by hand: unchecked
    (data / "test.npz").write_bytes(b"changed")
    with pytest.raises(StageError, match=r"^data/tiny/cifar10/test.npz changed since .*x.json was written"):
        Inputs(listed)
    (data / "test.npz").unlink()
    with pytest.raises(StageError, match=r"^data/tiny/cifar10/test.npz \(listed in .*\) is missing"):
        Inputs(listed)


def test_each_instance_lists_its_own_role_and_ood_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for role in ("cifar10", "cifar100", "svhn", "celeba"):
        folder = Path("data/demo") / role
        folder.mkdir(parents=True)
        for name in ("meta.json", "train.npz", "val.npz", "test.npz", "interp.npz"):
            (folder / name).write_text(name)
    params = edit(setitem("variants", ["jem_k20", "c100_jempp_m10", "softmax"]))
    resolved = instances(params, "demo")

    def files(kind: str, name: str) -> set[str]:
        train = resolved["train", f"{name}/seed1"] if kind != "fid_ref" else None  # train: one instance per seed
        own = train if kind == "train" else resolved[kind, name]
        return {p.as_posix() for p in reads(kind, name, own, train, "demo")}

    assert files("train", "c100_jempp_m10") == {"data/demo/cifar100/meta.json", "data/demo/cifar100/train.npz",
                                                "data/demo/cifar100/val.npz", "gmm/demo/cifar100/stats.pt"}
    assert files("train", "jem_k20") == {"data/demo/cifar10/meta.json", "data/demo/cifar10/train.npz",
                                         "data/demo/cifar10/val.npz"}  # uniform buffer: no GMM
    tests = {r: f"data/demo/{r}/test.npz" for r in ("cifar10", "cifar100", "svhn", "celeba")}
    assert files("evaluate", "jem_k20") == set(tests.values()) | {
        "data/demo/cifar10/meta.json", "data/demo/cifar10/train.npz", "data/demo/cifar10/interp.npz"}
    assert files("evaluate", "c100_jempp_m10") == set(tests.values()) - {tests["cifar10"]} | {
        "data/demo/cifar100/meta.json", "data/demo/cifar100/train.npz", "data/demo/cifar100/interp.npz"}
    assert files("sample", "softmax") == set() and files("sample", "c100_jempp_m10") == {"gmm/demo/cifar100/stats.pt"}
    assert files("robustness", "softmax") == {"data/demo/cifar10/test.npz"}
    assert files("fid_ref", "cifar100") == {"data/demo/cifar100/meta.json", "data/demo/cifar100/train.npz",
                                            "data/demo/cifar100/val.npz"}
    assert inputs_path("demo", "fid", "x").as_posix() == "config/demo/inputs/fid/fid/x.json"


def test_every_run_is_a_variant_and_a_seed_with_its_own_stage_names_paths_and_settings(tmp_path):
    """dvc.yaml's matrix: `variants` x `seeds`, stages <kind>@<variant>-<seed>, outputs under
    <variant>/seed<seed>/; train's settings (the seed) per run, the others' per variant."""
    import shutil
    import subprocess
    import sys

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    params = edit(lambda p: p.update(scale="tiny", variants=["softmax", "sadajem_k5"], seeds=[1, 2]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list"], cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout
    stages = dict(line.split(None, 1) for line in listed.splitlines() if line.strip())
    for kind in ("train", "sample", "evaluate", "fid", "robustness"):
        assert {n for n in stages if n.startswith(f"{kind}@")} == {
            f"{kind}@{v}-{s}" for v in ("softmax", "sadajem_k5") for s in (1, 2)}, kind
    assert "models/tiny/sadajem_k5/seed2" in stages["train@sadajem_k5-2"]
    assert "samples/tiny/softmax/seed1" in stages["sample@softmax-1"]
    assert "metrics/tiny/eval/sadajem_k5/seed2.notes.json" in stages["evaluate@sadajem_k5-2"]

    resolved = instances(params, "tiny")
    assert {n for k, n in resolved if k == "train"} == {f"{v}/seed{s}" for v in ("softmax", "sadajem_k5")
                                                         for s in (1, 2)}
    assert resolved["train", "sadajem_k5/seed2"]["variant"]["train"]["seed"] == 2
    assert {n for k, n in resolved if k == "evaluate"} == {"softmax", "sadajem_k5"}  # seed-independent
