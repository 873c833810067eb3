"""Data-parallel training across processes (``torchrun``): who is who, and the few collectives used.

Each process (rank) trains on its slice of every global batch with a DistributedDataParallel
model, keeps its own shard of the replay buffer, and runs the sampler on its slice of the
p(x) batch. Random numbers that must agree with a single-process run (the p0 draws of
re-initialised chains, the re-initialisation mask, the sampler's noise) are drawn for the
whole global batch from the global generator, which every rank keeps in the same state,
and sliced; what is rank-specific (which buffer slots to draw) comes from a per-rank
generator. Checkpoints gather the buffer shards, so a run resumes on another number of
processes.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op;
``relaunch_under_torchrun`` turns a plain command into such a run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n_local: int) -> slice:
        """This rank's rows of a global batch of ``n_local * world`` rows."""
        return slice(self.rank * n_local, (self.rank + 1) * n_local)


SINGLE = DistInfo()


def from_slurm(environ: dict[str, str] | None = None) -> None:
    """Under SLURM's ``srun`` (one task per GPU) without torchrun: the usual torch variables
    (RANK, WORLD_SIZE, LOCAL_RANK) from SLURM's, so ``init`` joins the same process group.
    MASTER_ADDR and MASTER_PORT must be set (the job script exports them)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        from jem.config.errors import InputError

        raise InputError(f"running under srun with {env['SLURM_NTASKS']} tasks but {' and '.join(missing)} "
                         "unset; export MASTER_ADDR=<first node> MASTER_PORT=<free port> in the job script")
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")


def relaunch_under_torchrun(run: Any, module: str, rdzv_id: str, log: Callable[[str], None] = print) -> NoReturn:
    """Replace this process by ``torchrun`` running ``python -m <module>`` with the same arguments:
    ``run.nproc`` processes on this machine, and with ``run.nnodes`` > 1 this machine's share of
    a run over several, which meet at the c10d rendezvous ``run.rdzv_endpoint`` (every machine
    runs the same command; torchrun assigns the node ranks; ``run.rdzv_id`` or else ``rdzv_id``
    names the rendezvous: one per run)."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={run.nproc}"]
    if run.nnodes > 1:
        argv += [f"--nnodes={run.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={run.rdzv_endpoint}",
                 f"--rdzv_id={run.rdzv_id or rdzv_id}"]
    else:
        argv.insert(3, "--standalone")
    argv += ["-m", module, *sys.argv[1:]]
    where = f" on each of {run.nnodes} machines (rendezvous {run.rdzv_endpoint})" if run.nnodes > 1 else ""
    log(f"run.nproc = {run.nproc}{where}: relaunching under torchrun")
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. a checkpoint only rank 0's machine holds)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_env() -> DistInfo:
    """The rank and world size ``torchrun`` put in the environment (single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world=world) if world > 1 else SINGLE


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group ``torchrun`` set up (NCCL on CUDA, gloo on CPU).

    Returns the rank information and this rank's device (``cuda:<local rank>`` on GPUs).
    """
    info = from_env()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def shutdown() -> None:
    """Leave the process group this process joined, if any (at the end of a ``torchrun`` run)."""
    if from_env().enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_over_ranks(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """The average of each value over the ranks (every rank gets the same numbers)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / info.world).tolist(), strict=True))


def gather_rows(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's ``t`` (same shape on each) stacked along dim 0 in rank order, on every rank."""
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)
