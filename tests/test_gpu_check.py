"""The GPU check (scripts/gpu_check.sh, issue 35) rehearsed on the CPU, so that a broken script is found before
a GPU is lent: the whole script at --size tiny from a copy of the shared tiny workspace, and its pieces that
only the paper size uses (the smoke run's params, the targets, the report merge, jem-bench's GPU name)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.e2e(cost=45)  # 40-43 s alone on 2 cores (one or two torch threads)
def test_the_cpu_rehearsal_runs_every_part_and_writes_the_summary(tiny_pipeline, tmp_path: Path):
    out, bundle = tmp_path / "gpu-check", tmp_path / "bundle"
    cmd = ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--size", "tiny", "--out", str(out), "--bundle",
           str(bundle), "--from-workspace", str(tiny_pipeline.path)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**tiny_pipeline.env, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["size"] == "tiny"
    assert {p: v["result"] for p, v in summary["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok")
    measured = {t["target"]: t["result"] for t in summary["targets"] if t["result"] != "not measured"}
    assert len(measured) == 4, summary["targets"]  # at the tiny size jempp_m10 and jem_k20 are not benched
    text = (out / "summary.md").read_text()
    assert text.startswith("# GPU check: cpu") and "none failed" in text
    assert all(f"| {part} | ok |" in text for part in gpu_check.PARTS)

    smoke = json.loads((out / "smoke.json").read_text())  # killed at a checkpoint, resumed by dvc repro
    assert smoke["killed_pids"] and smoke["checkpoints_after_kill"][-1] >= gpu_check.KILL_AT["tiny"]
    assert smoke["resumed_at_step"] == smoke["checkpoints_after_kill"][-1]
    assert "train@sadajem_k5-1" in smoke["stages_run"] and smoke["metrics"]["train"]["steps"] == 16
    assert set(smoke["metrics"]) == {"train", "eval", "fid", "robustness"}
    scored = json.loads((out / "smoke-fid.json").read_text())["sets"]  # the tiny scale's 64 buffer, 32 fresh images
    assert {k: v["n"] for k, v in scored.items()} == {"buffer": 64, "fresh": 32}
    bench = json.loads((out / "bench.json").read_text())
    assert [r["mode"] for r in bench] == ["reference", "baseline", "fast"]
    assert (out / "performance.md").read_text().startswith("# Speed")
    profiled = json.loads((out / "profile.json").read_text())["sadajem_k5"]  # forced at the tiny size
    assert profiled["steps"] == 1 and 0 < sum(t["share_pct"] for t in profiled["top"]) <= 100.1
    assert "Self CPU" in (out / "profile-sadajem_k5.txt").read_text()
    # what the device tool brings back: at most 8 files
    assert sorted(p.name for p in bundle.iterdir()) == ["gpu-check.tar.gz", "performance.md", "summary.md"]
    with tarfile.open(bundle / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu-check/summary.md" in names and "gpu-check/smoke/eval.json" in names
    assert not any(n.startswith("gpu-check/smoke-ws") for n in names)


def test_the_paper_smoke_params_are_valid_and_paper_sized():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    before = json.dumps(params)
    smoke = gpu_check.smoke_params(params, "paper", "cuda")
    assert json.dumps(params) == before  # a copy
    assert gpu_check.validate_params(smoke) > 0  # the configure stage's checks
    from jem.config.params import resolve_variant

    v = resolve_variant(smoke, "sadajem_k5", "paper")
    assert (v.model.depth, v.model.width, v.model.image_size) == (28, 10, 32)
    assert (v.train.batch_size, v.train.px_batch_size, v.sampler.steps, v.optim.sam) == (128, 64, 5, "sam")
    cifar10 = smoke["datasets"]["cifar10"]["paper"]
    assert cifar10["source"] == "shapes" and cifar10["train"] // v.train.batch_size * v.train.epochs == 300
    assert gpu_check.KILL_AT["paper"] % v.train.checkpoint_every == 0 and gpu_check.KILL_AT["paper"] < 300
    assert all(s["paper"]["source"] in ("shapes", "glyphs", "clouds", "gratings") for s in smoke["datasets"].values())
    assert smoke["run"]["device"] == "cuda" and smoke["variants"] == ["sadajem_k5"]


def test_targets_pass_and_miss(tmp_path: Path):
    rows = [{"variant": v, "mode": m, "ms_per_iter": ms} for v, m, ms in (
        ("sadajem_k5", "reference", 300.0), ("sadajem_k5", "fast", 75.0), ("jempp_m10", "reference", 200.0),
        ("jempp_m10", "fast", 80.0), ("jem_k20", "reference", 250.0), ("jem_k20", "fast", 100.0))]
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    (tmp_path / "fid.json").write_text(json.dumps({"training": [], "fid": {
        "images": 50000, "total_s": 13.0, "features_s": 11.0, "images_per_s": 4545, "stats_is_s": 0.5,
        "frechet_s": 1.5, "projected_50k_s": 13.0}}))
    (tmp_path / "bn.json").write_text(json.dumps({"accuracy": 90.0, "accuracy_bn_reestimated": 89.5,
                                                  "points_apart": 0.5, "agree": True, "required": True}))
    got = {t["target"]: t["result"] for t in gpu_check.targets(tmp_path, "NVIDIA H100 80GB HBM3")}
    assert list(got.values()) == ["pass", "miss", "pass", "pass", "miss", "pass"], got
    assert gpu_check.targets(tmp_path, "NVIDIA H200")[3]["result"] == "n/a (not an H100)"
    assert {t["result"] for t in gpu_check.targets(tmp_path, "cpu") if t["kind"] == "speed"} == {"n/a (not a GPU)",
                                                                                                "n/a (not an H100)"}


def test_merge_report_puts_the_gpu_figures_under_on_a_gpu(tmp_path: Path):
    target = tmp_path / "performance.md"
    target.write_text("# Speed\n\n## Training\n\ncpu table\n\n## On a GPU\n\nthe command\n")
    gpu = tmp_path / "gpu.md"
    gpu.write_text("# Speed: the reference loop, our baseline and the fast paths\n\n## Training\n\n"
                   "Measured by `x` on **NVIDIA H100 80GB HBM3** (torch 2.11)\n\n| a |\n\n## FID and IS\n\nfid\n")
    assert gpu_check.main(["merge-report", str(gpu), str(target)]) == 0
    text = target.read_text()
    assert text.startswith("# Speed\n\n## Training\n\ncpu table\n\n## On a GPU: NVIDIA H100 80GB HBM3\n")
    assert "### Training" in text and "### FID and IS" in text and "the command" not in text
    assert gpu_check.main(["merge-report", str(gpu), str(target)]) == 0  # again: replaced, not appended
    assert text == target.read_text()


def test_profile_runs_only_when_a_speed_target_is_missed(tmp_path: Path):
    """On the GPU the profile part profiles the variants that missed a speed target (the rehearsal forces one with
    --variant): with none missed it says so, without importing torch."""
    (tmp_path / "bench.json").write_text(json.dumps([{"variant": "jem_k20", "mode": m, "ms_per_iter": ms}
                                                     for m, ms in (("reference", 300.0), ("fast", 100.0))]))
    assert gpu_check.main(["profile", "--device", "cuda", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "profile.json").read_text()) == {"skipped": "no speed target missed"}


def test_bench_names_the_gpu(monkeypatch: pytest.MonkeyPatch):
    from jem.bench.speed import device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_name(torch.device("cuda")) == "NVIDIA H100 80GB HBM3"
