"""Data-parallel training through torchrun on CPU (gloo, 2 processes) against a single process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from jem.method.gmm import compute_mixture_stats, save_mixture_stats
from jem.runtime.checkpoint import CheckpointDir

from .conftest import ROOT, run_ok, stage_env, write_prepared_shapes

# JEM without batch norm (per-process batch statistics differ from a single process's by
# design), SAM (its perturbation must come from the all-reduced gradient), every chain
# re-initialised from p0 (whose draws follow the global batch), no sampler noise:
# deterministic, so two processes must reproduce one.
VARIANT = {"family": "jem", "optim": {"sam": "sam", "rho": 0.05, "name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
           "buffer": {"reinit_freq": 1.0}, "sampler": {"noise": 0.0},
           "train": {"batch_size": 16, "px_batch_size": 8, "checkpoint_every": 3, "keep_checkpoints": 50}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    for package in ("stages", "pipeline", "jem"):
        shutil.copytree(ROOT / package, root / package)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["scale"] = "tiny"
    params["scales"]["tiny"]["variant"]["train"].update(epochs=2, log_every=2, checkpoint_every=3)
    params["methods"]["ddp_jem"] = VARIANT
    params["variants"] = ["ddp_jem"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = root / "data" / "tiny" / "cifar10"
    x, y = write_prepared_shapes(data, 96)
    save_mixture_stats(compute_mixture_stats([(x[:64], y[:64])], 10), root / "gmm" / "tiny" / "cifar10" / "stats.pt")
    return root


def _train(root: Path, tag: str, nproc: int, variant: str = "ddp_jem") -> str:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["run"]["nproc"] = nproc
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**stage_env(), "OMP_NUM_THREADS": "1"}
    return run_ok([sys.executable, "-m", "stages.train", "--variant", variant, "--data", "data/tiny",
                   "--gmm", "gmm/tiny", "--out", f"models/{tag}", "--metrics", f"metrics/{tag}.json",
                   "--plots", f"plots/{tag}", "--checkpoints", f"checkpoints/{tag}"], root, env)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_machines(workdir: Path, tag: str, run: dict, env_of: list[dict[str, str]]) -> list[Path]:
    """Two copies of the repository (two machines, no shared filesystem) each start the train
    stage at once with ``run`` settings and their own extra environment; both must succeed."""
    roots = []
    for i in range(2):
        root = workdir.parent / f"{workdir.name}-{tag}-node{i}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(workdir, root, ignore=shutil.ignore_patterns("models", "metrics", "plots", "checkpoints",
                                                                     "mlflow.db", "mlartifacts"))
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["run"].update(run)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        roots.append(root)
    cmd = [sys.executable, "-m", "stages.train", "--variant", "ddp_jem", "--data", "data/tiny", "--gmm", "gmm/tiny",
           "--out", f"models/{tag}", "--metrics", f"metrics/{tag}.json", "--plots", f"plots/{tag}",
           "--checkpoints", f"checkpoints/{tag}"]
    procs = [subprocess.Popen(cmd, cwd=root, env={**stage_env(), "OMP_NUM_THREADS": "1", **extra},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for root, extra in zip(roots, env_of, strict=True)]
    try:
        outs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    return roots


def _weights(root: Path, tag: str) -> dict[str, torch.Tensor]:
    return torch.load(root / "models" / tag / "final.pt", weights_only=True)["model"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.e2e(cost=50)
def test_two_processes_reproduce_one_and_resume_on_another_number(workdir: Path):
    out = _train(workdir, "single", nproc=1)
    assert "data parallel" not in out
    out = _train(workdir, "ddp", nproc=2)
    assert "relaunching under torchrun" in out and "data parallel over 2 processes (cpu)" in out
    single, ddp = _weights(workdir, "single"), _weights(workdir, "ddp")
    assert any(not torch.equal(single[k], ddp[k]) for k in single), "two processes ran, not a copy"
    _assert_close(single, ddp)
    metrics = json.loads((workdir / "metrics" / "ddp.json").read_text())
    assert metrics["steps"] == 8 and metrics["epochs"] == 2

    # rank 0 wrote the checkpoints, with the whole buffer: resume the two-process run's step-3
    # checkpoint on one process
    folder = workdir / "checkpoints" / "resumed"
    shutil.copytree(workdir / "checkpoints" / "ddp", folder)
    for path in CheckpointDir(folder).paths():
        if int(path.stem.split("-")[1]) > 3:
            path.unlink()
    state, _ = CheckpointDir(folder).latest()
    assert state["world"] == 2 and state["buffer"]["samples"].shape[0] == 100
    out = _train(workdir, "resumed", nproc=1)
    assert "written by 2 process(es), this run has 1: buffer shards regrouped" in out
    _assert_close(single, _weights(workdir, "resumed"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jem-tiny").experiment_id])
    stage_runs = [r for r in runs if "processes" in r.data.tags]  # the variant's parent run has none
    assert sorted(r.data.tags["processes"] for r in stage_runs) == ["1", "1", "2"], "one MLflow run per stage run"


@pytest.mark.e2e(cost=20)
def test_sadajem_with_batch_norm_and_informative_init_trains_on_two_processes(workdir: Path):
    """Batch norm (per-process statistics, rank 0's running statistics broadcast), SAM with its
    statistics frozen in the second pass, mixture-initialised buffer shards."""
    _train(workdir, "sada", nproc=2, variant="sadajem_k5")
    final = torch.load(workdir / "models" / "sada" / "final.pt", weights_only=True)
    assert final["buffer"]["samples"].shape[0] == 100  # both shards, gathered by rank 0
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    assert json.loads((workdir / "metrics" / "sada.json").read_text())["steps"] == 8


@pytest.mark.e2e(cost=25)
def test_two_node_torchrun_over_c10d_matches_one_process(workdir: Path):
    """run.nnodes 2: each "machine" relaunches under torchrun --nnodes 2 with the c10d rendezvous
    on 127.0.0.1 (gloo); node ranks are assigned by torchrun, rank 0's machine writes the outputs."""
    if not (workdir / "models" / "single" / "final.pt").exists():
        _train(workdir, "single", nproc=1)
    run = {"nproc": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{_free_port()}", "rdzv_id": "two-node-test"}
    roots = _two_machines(workdir, "nodes", run, [{}, {}])
    written = [root for root in roots if (root / "models" / "nodes" / "final.pt").exists()]
    assert len(written) == 1, "exactly one machine (global rank 0) writes the outputs"
    _assert_close(_weights(workdir, "single"), _weights(written[0], "nodes"))
    assert json.loads((written[0] / "metrics" / "nodes.json").read_text())["steps"] == 8


@pytest.mark.e2e(cost=25)
def test_stage_under_srun_joins_one_process_group(workdir: Path):
    """Under SLURM's srun (SLURM_PROCID / SLURM_NTASKS, MASTER_ADDR / MASTER_PORT from the job
    script) the stage needs no torchrun: two tasks train as one data-parallel run."""
    if not (workdir / "models" / "single" / "final.pt").exists():
        _train(workdir, "single", nproc=1)
    port = str(_free_port())
    envs = [{"SLURM_PROCID": str(i), "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port} for i in range(2)]
    roots = _two_machines(workdir, "srun", {"nproc": 1, "nnodes": 1}, envs)
    assert (roots[0] / "models" / "srun" / "final.pt").exists()
    assert not (roots[1] / "models" / "srun" / "final.pt").exists()
    _assert_close(_weights(workdir, "single"), _weights(roots[0], "srun"))
    missing = {**os.environ, "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    missing.pop("MASTER_ADDR", None)
    missing.pop("WORLD_SIZE", None)
    from jem.config.errors import InputError
    from jem.runtime.distributed import from_slurm

    with pytest.raises(InputError, match="MASTER_ADDR"):
        from_slurm(missing)
