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
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from jem.config.variant import Variant, deep_merge

# Two cores: one torch thread per process when pytest-xdist runs two workers beside the shared
# pipeline's stage processes (two OpenMP threads each spin-wait for a core held by another process: a
# test of 0.6 s alone took 88 s so); two in the serial run (TEST_WORKERS=0).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)


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


# ---- the tiny pipeline, built once per test run ---------------------------------------------------
# One real `dvc repro` at the tiny scale (a softmax baseline and a generative variant: one of each
# path through the stages), committed; every end-to-end test starts from its own copy of it
# (`tiny_workspace`) instead of building a DAG of its own. It is built in a background thread from the
# session's first test on, while the tests that do not need it run (they are ordered first), and once
# for all pytest-xdist workers (a file lock in their shared temporary folder).
TINY_VARIANTS = ("softmax", "sadajem_k5")


@dataclass(frozen=True)
class TinyPipeline:
    path: Path  # the built workspace: read it, never write it (copy it with copy_workspace)
    log: str  # what its `dvc repro` printed
    env: dict[str, str]


def build_tiny_pipeline(home: Path) -> TinyPipeline:
    """The tiny-scale workspace after `dvc repro` and `git commit` under ``home``/repo: dvc.lock, the DVC
    cache and run cache, mlflow.db and mlartifacts, as a user's checkout has them after a run. Built
    once: a second call (another xdist worker) waits for the first and reads what it built."""
    from filelock import FileLock

    root, built, env = home / "repo", home / "built.log", stage_env()
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / "build.lock")):
        if not built.exists():
            if root.exists():  # a build that failed half-way
                shutil.rmtree(root)
            root.mkdir()
            copy_repo(root)
            params = yaml.safe_load((root / "params.yaml").read_text())
            params.update(scale="tiny", variants=list(TINY_VARIANTS))
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
                run_ok(cmd, root, env)
            log = run_ok([sys.executable, "-m", "dvc", "repro"], root, env)
            for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "results"]):
                run_ok(cmd, root, env)
            built.write_text(log)
    return TinyPipeline(root, built.read_text(), env)


class _Build(threading.Thread):
    def __init__(self, home: Path) -> None:
        super().__init__(name="tiny-pipeline", daemon=True)
        self.home, self.result, self.error = home, None, None

    def run(self) -> None:
        try:
            self.result = build_tiny_pipeline(self.home)
        except BaseException as e:  # handed to the tests that need the pipeline
            self.error = e


_build: _Build | None = None


def _tiny_home(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-pipeline"


def _needs_pipeline(item: pytest.Item) -> bool:
    return "tiny_pipeline" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that need the tiny pipeline run last, so that it is built while the others run; among
    them, and among the others, the costliest first (``@pytest.mark.e2e(cost=N)``, default 0), so that
    no long test starts when the other worker has nothing left to run."""
    def key(item: pytest.Item) -> tuple[bool, int]:
        marker = item.get_closest_marker("e2e")
        return _needs_pipeline(item), -(marker.kwargs.get("cost", 0) if marker else 0)

    items.sort(key=key)


@pytest.fixture(scope="session", autouse=True)
def _start_tiny_pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    global _build
    if _build is None and any(map(_needs_pipeline, request.session.items)):
        _build = _Build(_tiny_home(tmp_path_factory))
        _build.start()


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    """The tiny pipeline built once per test run (see build_tiny_pipeline)."""
    if _build is None:
        return build_tiny_pipeline(_tiny_home(tmp_path_factory))
    _build.join()
    if _build.error is not None:
        raise _build.error
    return _build.result


def copy_workspace(src: Path, dest: Path) -> Path:
    """A private copy of a built workspace. Read-only files (DVC's cache objects, the outputs DVC
    links to them, git's objects) are hard-linked: DVC and the stages replace such a file, never
    write into it. Everything else (sources, params, dvc.lock, mlflow.db, .git's refs) is copied."""

    def link_or_copy(s: str, d: str) -> None:
        if os.stat(s).st_mode & 0o222:
            shutil.copy2(s, d)
        else:
            os.link(s, d)

    shutil.copytree(src, dest, symlinks=True, copy_function=link_or_copy)
    return dest


@pytest.fixture
def tiny_workspace(tiny_pipeline: TinyPipeline, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """This test's own copy of the built tiny pipeline, and the environment its stages run in."""
    return copy_workspace(tiny_pipeline.path, tmp_path / "repo"), dict(tiny_pipeline.env)


def stage_env() -> dict[str, str]:
    """Environment for stage subprocesses: this interpreter's bin first on PATH, no DVC_ROOT."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DVC_ROOT", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # each test says where its stages log
    env["OMP_NUM_THREADS"] = str(THREADS)  # torch's default thread count in the stages (run.threads: 0)
    return env


def run_ok(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def write_prepared_shapes(data: Path, n: int, train: int = 64,
                          image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared CIFAR-10 stand-in as the prepare stage writes it at the tiny scale (16x16): ``train``
    shapes for training, the other ``n - train`` for validation, and meta.json. Returns all the images
    and labels."""
    import json

    from jem.data.datasets import save_split
    from jem.data.synthetic import make_shapes

    x, y = make_shapes(n, image_size, seed=0)
    save_split(data / "train.npz", x[:train].numpy(), y[:train].numpy())
    save_split(data / "val.npz", x[train:].numpy(), y[train:].numpy())
    (data / "meta.json").write_text(json.dumps({"role": "cifar10", "source": "shapes", "num_classes": 10,
                                                "image_shape": list(x.shape[1:])}))
    return x, y


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(root: Path, port: int, env: dict[str, str], extra: tuple[str, ...] = ()
                        ) -> subprocess.Popen:
    """``mlflow server`` on ``root``'s store and artifacts, on loopback ``port``, in its own process group."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "mlartifacts"), *extra]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    """Until the server at ``url`` answers its health check (fails if it exits or ``timeout`` passes)."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}"
            assert time.time() < deadline, f"mlflow server not up after {timeout:.0f} s"
            time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> None:
    """Kill the server's whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def basic_auth(root: Path, env: dict[str, str], account: tuple[str, str]) -> dict[str, str]:
    """MLflow's basic-auth app configured in ``root`` with ``account`` as its admin: the server's environment."""
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = {account[0]}\n"
        f"admin_password = {account[1]}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {**env, "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-fixed-secret-for-this-test"}


@contextlib.contextmanager
def tracking_server(root: Path, env: dict[str, str], timeout: float = 120.0, extra: tuple[str, ...] = ()
                    ) -> Iterator[str]:
    """``mlflow server`` on the repository's store and artifacts, on a free loopback port, as a user
    runs ``mlflow ui`` there (``extra``: more options, e.g. the auth app); yields its URL. Killed (its
    whole process group) on the way out."""
    port = free_port()
    proc = start_mlflow_server(root, port, env, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url, timeout)
        yield url
    finally:
        stop_server(proc)


def rest_api(url: str, endpoint: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)
