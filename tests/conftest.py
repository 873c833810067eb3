from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from jem.config.variant import Variant, deep_merge

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _tracking_uri_untouched() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI; a test that points it at its own
    server must not send the next test's stages there."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


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
PIPELINE_OUTPUTS = ("data/", "gmm/", "fid_ref/", "config/", "models/", "samples/", "metrics/", "plots/", "checkpoints/",
                    "dvc.lock")


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
    env.pop("MLFLOW_TRACKING_URI", None)  # each test says where its stages log
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

    from jem.data.datasets import save_split
    from jem.data.synthetic import make_shapes

    x, y = make_shapes(n, seed=0)
    save_split(data / "train.npz", x[:train].numpy(), y[:train].numpy())
    save_split(data / "val.npz", x[train:].numpy(), y[train:].numpy())
    (data / "meta.json").write_text(json.dumps({"role": "cifar10", "source": "shapes", "num_classes": 10}))
    return x, y


@contextlib.contextmanager
def tracking_server(root: Path, env: dict[str, str], timeout: float = 120.0, extra: tuple[str, ...] = ()
                    ) -> Iterator[str]:
    """``mlflow server`` on the repository's store and artifacts, on a free loopback port, as a user
    runs ``mlflow ui`` there (``extra``: more options, e.g. the auth app); yields its URL. Killed (its
    whole process group) on the way out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "mlartifacts"), *extra]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, f"mlflow server exited with {proc.returncode}"
                assert time.time() < deadline, f"mlflow server not up after {timeout:.0f} s"
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def rest_api(url: str, endpoint: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)
