"""The train stage survives being killed: rerunning it continues from the last checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import copy_repo, run_ok, stage_env

TRAIN = [sys.executable, "-m", "stages.train", "--variant", "sadajem_k5", "--data", "data/tiny", "--gmm", "gmm/tiny"]


def _outputs(tag: str) -> list[str]:
    return ["--out", f"models/{tag}", "--metrics", f"metrics/{tag}.json", "--plots", f"plots/{tag}",
            "--checkpoints", f"checkpoints/{tag}"]


@pytest.mark.slow
def test_killed_training_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path: Path):
    copy_repo(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["scale"] = "tiny"
    params["scales"]["tiny"]["variant"]["train"].update(epochs=5, checkpoint_every=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env()
    run_ok([sys.executable, "-m", "stages.prepare", "--role", "cifar10", "--out", "data/tiny/cifar10"], tmp_path, env)
    run_ok([sys.executable, "-m", "stages.gmm", "--data", "data/tiny/cifar10", "--out", "gmm/tiny/cifar10"],
           tmp_path, env)

    ckpt = tmp_path / "checkpoints" / "killed" / "last.pt"
    proc = subprocess.Popen([*TRAIN, *_outputs("killed")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the stage wrote no checkpoint before it was killed"
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
    total = 5 * (params["datasets"]["cifar10"]["tiny"]["train"] // 16)
    assert 0 < killed_at < total
    assert not (tmp_path / "models" / "killed").exists(), "no partial outputs"

    resumed = run_ok([*TRAIN, *_outputs("killed")], tmp_path, env)
    assert f"resumed from checkpoints/killed/last.pt at step {killed_at}" in resumed
    run_ok([*TRAIN, *_outputs("straight")], tmp_path, env)

    metrics = json.loads((tmp_path / "metrics" / "killed.json").read_text())
    assert metrics["steps"] == total and metrics["epochs"] == 5
    a = torch.load(tmp_path / "models" / "killed" / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "models" / "straight" / "final.pt", weights_only=False)
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    assert torch.equal(a["buffer"]["samples"], b["buffer"]["samples"])
