from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jem.config import Variant, deep_merge

torch.set_num_threads(2)


def tiny_variant(**overrides: object) -> Variant:
    """A WRN-10-1 on 8x8 images: small enough for many CPU steps per test."""
    base = {
        "name": "tiny",
        "model": {"depth": 10, "width": 1, "image_size": 8, "num_classes": 4, "bn_momentum": 0.1},
        "sampler": {"kind": "sgld", "steps": 2, "step_size": 1.0, "noise": 0.01},
        "buffer": {"size": 64, "init": "uniform"},
        "optim": {"name": "sgd", "lr": 0.05, "warmup_iters": 3, "milestones": [2]},
        "augment": {"crop_padding": 2},
        "train": {"epochs": 3, "batch_size": 8, "px_batch_size": 6, "log_every": 2, "seed": 3},
    }
    return Variant.from_dict(deep_merge(base, overrides))


@pytest.fixture
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(48) % 4
    return images, labels


ROOT = Path(__file__).resolve().parents[1]


# What `dvc repro` writes in a checkout; a copy for a test starts without any of it.
PIPELINE_OUTPUTS = ("data/", "gmm/", "models/", "samples/", "metrics/", "plots/", "checkpoints/", "dvc.lock")


def copy_repo(dest: Path) -> None:
    """The files a fresh clone would have (tracked, plus new files git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        if rel.startswith(PIPELINE_OUTPUTS) or (rel.startswith("reports/") and rel.count("/") > 1):
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def stage_env() -> dict[str, str]:
    """Environment for stage subprocesses: this interpreter's bin first on PATH, no DVC_ROOT."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DVC_ROOT", None)
    return env


def run_ok(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def write_prepared_shapes(data: Path, n: int, train: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared CIFAR-10 stand-in as the prepare stage writes it: ``train`` shapes for training,
    the other ``n - train`` for validation, and meta.json. Returns all the images and labels."""
    import json

    from jem.datasets import save_split
    from jem.synthetic import make_shapes

    x, y = make_shapes(n, seed=0)
    save_split(data / "train.npz", x[:train].numpy(), y[:train].numpy())
    save_split(data / "val.npz", x[train:].numpy(), y[train:].numpy())
    (data / "meta.json").write_text(json.dumps({"role": "cifar10", "source": "shapes", "num_classes": 10}))
    return x, y
