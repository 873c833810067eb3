"""The train stage survives SIGKILL at any point: rerunning it continues from the last checkpoint."""

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

from jem.method.gmm import compute_mixture_stats, save_mixture_stats
from jem.runtime.checkpoint import CheckpointDir

from .conftest import copy_repo, run_ok, stage_env, write_prepared_shapes

TRAIN = [sys.executable, "-m", "stages.train", "--variant", "sadajem_k5", "--data", "data/tiny", "--gmm", "gmm/tiny"]
EPOCHS = 2  # of 16 steps
KILL_AFTER = (5, 21)  # kill once the newest checkpoint is at least this step: mid-epoch, then past an epoch end
# (the second kill hits a run that had resumed; tests/test_session.py checks an in-process resume bit for bit)


def _outputs(tag: str) -> list[str]:
    return ["--out", f"models/{tag}", "--metrics", f"metrics/{tag}.json", "--plots", f"plots/{tag}",
            "--checkpoints", f"checkpoints/{tag}"]


def _newest_step(folder: Path) -> int:
    paths = CheckpointDir(folder).paths()
    return int(paths[-1].stem.split("-")[1]) if paths else -1


@pytest.mark.e2e(cost=60)
def test_killed_training_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path: Path):
    copy_repo(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["scale"] = "tiny"
    params["scales"]["tiny"]["variant"]["train"].update(epochs=EPOCHS, checkpoint_every=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env()
    tiny = params["datasets"]["cifar10"]["tiny"]  # the prepared set and its mixture, written here
    train_images = tiny["train"]
    x, y = write_prepared_shapes(tmp_path / "data" / "tiny" / "cifar10", train_images + tiny["val"], train=train_images)
    save_mixture_stats(compute_mixture_stats([(x[:train_images], y[:train_images])], 10),
                       tmp_path / "gmm" / "tiny" / "cifar10" / "stats.pt")
    total = EPOCHS * (train_images // 16)
    folder = tmp_path / "checkpoints" / "killed"

    killed_at = []
    for point in KILL_AFTER:
        proc = subprocess.Popen([*TRAIN, *_outputs("killed")], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while _newest_step(folder) < point and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(_newest_step(folder))
        assert not (tmp_path / "models" / "killed").exists(), "no partial outputs"
    assert killed_at == sorted(killed_at) and 0 < killed_at[0] and killed_at[-1] < total, killed_at

    newest = CheckpointDir(folder).paths()[-1]  # a write cut short by the crash, or a damaged disk
    newest.write_bytes(newest.read_bytes()[:-1000])
    resumed = run_ok([*TRAIN, *_outputs("killed")], tmp_path, env)
    assert f"{newest.relative_to(tmp_path)}: checksum mismatch" in resumed and "falling back" in resumed
    assert "resumed from checkpoints/killed/step-" in resumed
    run_ok([*TRAIN, *_outputs("straight")], tmp_path, env)

    metrics = json.loads((tmp_path / "metrics" / "killed.json").read_text())
    assert metrics["steps"] == total and metrics["epochs"] == EPOCHS
    a = torch.load(tmp_path / "models" / "killed" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "models" / "straight" / "final.pt", weights_only=True)
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    assert torch.equal(a["buffer"]["samples"], b["buffer"]["samples"])
    # best_val.pt: the weights and the replay buffer of the best validation epoch, the same after the kills
    best_a, best_b = (torch.load(tmp_path / "models" / tag / "best_val.pt", weights_only=True)
                      for tag in ("killed", "straight"))
    assert best_a["epoch"] == best_b["epoch"] and best_b["buffer"]["samples"].shape == b["buffer"]["samples"].shape
    assert all(torch.equal(best_a["model"][k], v) for k, v in best_b["model"].items())
    assert torch.equal(best_a["buffer"]["samples"], best_b["buffer"]["samples"])
    if best_b["epoch"] < EPOCHS:  # an earlier epoch's buffer, not the final one
        assert not torch.equal(best_b["buffer"]["samples"], b["buffer"]["samples"])
    curve = (tmp_path / "plots" / "killed" / "steps.csv").read_text()
    assert curve == (tmp_path / "plots" / "straight" / "steps.csv").read_text()  # the learning curve too
