"""One training step and the loop around it, driven by a ``Variant``.

Per iteration (Algorithm 1 of SADA-JEM / Algorithm 2 of JEM++, mini-batched), with every
batch-norm running-statistics update in the order of the family's reference script:

1. a labelled batch (augmented) and, for the generative families, a p(x) batch
   (augmented for JEM/JEM++, not for SADA-JEM: ``objective.px_augment``);
2. the x+ forward, when ``objective.pos_forward`` is ``before_sampler`` (JEM++, SADA-JEM);
3. chain starts from the replay buffer, ``reinit_freq`` of them re-drawn from p0;
   the sampler runs once (its forwards update the running statistics when
   ``sampler.bn_mode`` is ``train``) and its detached output x- goes back to the buffer;
4. the x+ forward (``after_sampler``: JEM), the x- forward and the labelled forward last
   (``jem.method.objectives``), then the loss and its gradient;
5. with SAM/ASAM, a second loss and gradient at the perturbed weights (same x+, x- and
   labelled batches, batch-norm running statistics frozen), then the base optimizer steps;
6. the per-iteration learning-rate schedule: linear warm-up from 0 (``lr * it / warmup``,
   as the reference scripts), then step or cosine.

Statistics stay on the device and are read out every ``train.log_every`` iterations.
``state_dict`` holds the whole training state (model, optimizer, scheduler, buffer, step,
every RNG state, the variant), so a run restored from it continues bit-identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from jem.config.errors import InputError
from jem.config.variant import OptimConfig, PerfConfig, SamplerConfig, Variant
from jem.data.batches import BatchStream
from jem.method.buffer import ReplayBuffer
from jem.method.gmm import GaussianMixture, MixtureStats, UniformInit
from jem.method.models import WideResNet, build_model, trunk_with_stats
from jem.method.objectives import bn_snapshot, forward_passes, grouped_passes, loss_from_passes
from jem.method.sam import SAM
from jem.method.samplers import frozen_bn_stats, sample
from jem.runtime.checkpoint import capture_rng, load_verified, restore_rng, save_verified, seed_everything
from jem.runtime.distributed import SINGLE, DistInfo, gather_objects, gather_rows, mean_over_ranks

CHECKPOINT_FORMAT = 1
# Keys that may change between a checkpoint and its resume without changing the run.
_RESUME_FREE_KEYS = {("train", "log_every"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
                     ("recovery",)}


class DivergenceError(RuntimeError):
    """Training diverged: non-finite loss, exploding energies or saturated samples."""

    def __init__(self, message: str, step: int, reason: str) -> None:
        super().__init__(message)
        self.step = step
        self.reason = reason


class LRFactor:
    """Multiplier of the base learning rate at iteration ``it`` (picklable for checkpoints).

    A step milestone m (epochs, possibly fractional) takes effect from iteration
    round(m * iters_per_epoch): the first iteration of epoch m for a whole number."""

    def __init__(self, cfg: OptimConfig, iters_per_epoch: int, total_iters: int) -> None:
        self.schedule = cfg.schedule
        self.milestones = list(cfg.milestones)
        self.gamma = cfg.gamma
        self.warmup = cfg.warmup_iters
        self.per_epoch = iters_per_epoch
        self.total = max(total_iters, 1)
        self.milestone_iters = [round(m * iters_per_epoch) for m in self.milestones]

    def __call__(self, it: int) -> float:
        # the reference scripts set lr * cur_iter / warmup_iters while cur_iter <= warmup_iters,
        # so iteration 0 runs at lr 0
        factor = min(1.0, it / self.warmup) if self.warmup > 0 else 1.0
        if self.schedule == "step":
            factor *= self.gamma ** sum(it >= m for m in self.milestone_iters)
        elif self.schedule == "cosine":
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(it, self.total) / self.total))
        return factor


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    fused: bool = False) -> tuple[torch.optim.Optimizer, SAM | None]:
    """The base optimizer (fused kernels when asked and supported, else foreach) and its SAM wrapper."""
    params = list(model.parameters())
    lr = cfg.lr * cfg.lr_scale
    base: torch.optim.Optimizer
    if cfg.name == "sgd":
        kwargs: dict[str, Any] = {"lr": lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov,
                                  "weight_decay": cfg.weight_decay}
        cls: type[torch.optim.Optimizer] = torch.optim.SGD
    else:
        kwargs = {"lr": lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
        cls = torch.optim.Adam
    if fused:
        try:
            base = cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
            base = cls(params, foreach=True, **kwargs)
    else:
        base = cls(params, **kwargs)
    sam = SAM(base, rho=cfg.rho, adaptive=cfg.sam == "asam") if cfg.sam != "none" else None
    return base, sam


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` for ``precision == 'bf16'``, else nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


COMPILE_BACKEND = "inductor"  # torch.compile's backend for the trunk (tests use "aot_eager": no codegen)
RECOMPILE_LIMIT = 64  # graphs per process: one per (batch size, batch-norm mode, grad mode) in use


def compile_trunk(model: WideResNet, device: torch.device) -> str:
    """torch.compile the residual trunk (every forward path goes through it) in place.

    The compiled unit takes and returns the batch-norm running statistics explicitly
    (``jem.method.models.Trunk``), so several train-mode forwards before one backward, SAM's
    frozen-statistics pass and any eager fallback of dynamo mix safely. Returns what happened,
    for the log: compiled, or why not (then the model stays eager). Compilation errors at run
    time fall back to eager too (dynamo's ``suppress_errors``).
    """
    import shutil

    if not hasattr(torch, "compile"):
        return "eager: this torch has no torch.compile"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "eager: torch.compile needs triton on CUDA, which is not installed"
    elif device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "eager: torch.compile's CPU backend needs a C++ compiler (g++), none found"
    import torch._dynamo as dynamo

    dynamo.config.suppress_errors = True
    # one static graph per batch size and mode: labelled, x+, sampler (weights frozen), SAM's
    # frozen-statistics pass, eval-mode sampling; several variants in one process (jem-bench)
    key = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo.config, key, max(getattr(dynamo.config, key), RECOMPILE_LIMIT))
    model.blocks.compiled = torch.compile(trunk_with_stats, dynamic=False, backend=COMPILE_BACKEND)
    return f"compiled (torch.compile, {COMPILE_BACKEND}, batch-norm statistics as values)"


def build_p0(variant: Variant, shape: tuple[int, ...], mixture: MixtureStats | None,
             device: torch.device | str) -> UniformInit | GaussianMixture:
    if variant.buffer.init == "uniform":
        return UniformInit(shape, variant.model.num_classes)
    if mixture is None:
        raise InputError(f"variant {variant.name!r} uses buffer.init = gmm but no mixture statistics "
                         "were given; run the gmm stage (or pass mixture=...)")
    if mixture.num_classes != variant.model.num_classes or tuple(mixture.shape) != tuple(shape):
        raise InputError(f"mixture statistics are for {mixture.num_classes} classes of shape "
                         f"{tuple(mixture.shape)}, the variant trains {variant.model.num_classes} classes "
                         f"of shape {tuple(shape)}; recompute them for this dataset")
    return GaussianMixture(mixture, jitter=variant.buffer.gmm_jitter, device=device)


class Trainer:
    """One variant's training run: model, optimizer, schedule, replay buffer and batch streams.

    ``perf`` says how it executes (precision, memory layout, compilation, where the buffer and
    data live, fused optimizer kernels); it never changes what a run computes beyond
    numerical tolerance, and it is not part of the checkpoints.

    ``dist`` (from ``jem.runtime.distributed.init`` under ``torchrun``) makes it one rank of a
    data-parallel run: a DistributedDataParallel model for the loss passes (so SAM's
    perturbation comes from the all-reduced gradient), this rank's slice of every global
    batch, its own replay-buffer shard. ``state_dict`` is then collective: every rank calls it.
    """

    def __init__(self, variant: Variant, images: torch.Tensor, labels: torch.Tensor,
                 mixture: MixtureStats | None = None, device: torch.device | str = "cpu",
                 perf: PerfConfig | None = None, dist: DistInfo = SINGLE) -> None:
        variant.validate(variant.name)
        self.perf = perf or PerfConfig()
        self.perf.validate("perf")
        self.variant = variant
        self.device = torch.device(device)
        self.dist = dist
        for key in ("batch_size", "px_batch_size"):
            if getattr(variant.train, key) % dist.world:
                raise InputError(f"train.{key} = {getattr(variant.train, key)} does not split evenly over "
                                 f"{dist.world} processes; make it a multiple of {dist.world}")
        shape = tuple(images.shape[1:])
        m = variant.model
        if shape != (m.in_channels, m.image_size, m.image_size):
            raise InputError(f"images have shape {shape}, the model expects "
                             f"{(m.in_channels, m.image_size, m.image_size)}")
        seed_everything(variant.train.seed)
        self.model: WideResNet = build_model(variant.model).to(self.device)
        self.memory_format = torch.channels_last if self.perf.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.optimizer, self.sam = build_optimizer(self.model, variant.optim, fused=self.perf.fused_optimizer)
        self.compiled = compile_trunk(self.model, self.device) if self.perf.compile else "eager"
        self.net: torch.nn.Module = self.model  # what the loss passes run through
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                               else None)
        t, obj = variant.train, variant.objective
        data_device = self.device if self.perf.data_device == "auto" else torch.device(self.perf.data_device)
        buffer_device = self.device if self.perf.buffer_device == "auto" else torch.device(self.perf.buffer_device)
        self.clf_stream = BatchStream(images, labels, t.batch_size, t.seed, 0, variant.augment,
                                      obj.input_noise, data_device, shard=dist)
        self.iters_per_epoch = self.clf_stream.per_epoch
        self.total_steps = t.epochs * self.iters_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LRFactor(variant.optim, self.iters_per_epoch, self.total_steps))
        self.px_stream: BatchStream | None = None
        self.buffer: ReplayBuffer | None = None
        if variant.uses_sampler:
            self.px_stream = BatchStream(images, labels, t.px_batch_size, t.seed, 1,
                                         variant.augment if obj.px_augment else None,
                                         obj.input_noise, data_device, shard=dist)
            p0 = build_p0(variant, shape, mixture, buffer_device)
            self.buffer = ReplayBuffer(variant.buffer.size, p0, variant.buffer.reinit_freq, buffer_device,
                                       dist=dist, seed=t.seed)
        self.step = 0
        self.sampler_cfg = variant.sampler  # the variant's sampler, with any recovery remedy applied
        self.remedies: list[str] = []
        self.resharded = False  # resumed from a checkpoint of another number of processes

    @property
    def epoch(self) -> int:
        return self.step // self.iters_per_epoch

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def train_step(self) -> dict[str, torch.Tensor]:
        """One iteration; returns detached statistics on the device."""
        v, it = self.variant, self.step
        obj = v.objective
        x_lab, y = (self._to_device(t) for t in self.clf_stream.batch(it))
        x_pos = x_neg = pos = deferred = None
        grouped = self.perf.grouped_passes
        self.model.train()
        if self.buffer is not None and self.px_stream is not None:
            x_pos = self._to_device(self.px_stream.batch(it)[0])
            if obj.pos_forward == "before_sampler":  # x+ updates the running statistics first
                if grouped and self.sampler_cfg.bn_mode != "eval":  # its update is applied later,
                    deferred = bn_snapshot(self.model)  # as if here (the sampler never reads it)
                else:
                    with autocast(self.device, self.perf.precision):
                        pos = self.net(x_pos)
            x0, idx, starts = self.buffer.draw(v.train.px_batch_size // self.dist.world)
            with autocast(self.device, self.perf.sampler_precision):
                x_neg = sample(self.model, self._to_device(x0), self.sampler_cfg, shard=self.dist)
            self.buffer.update(idx, x_neg, starts)
            self.model.train()
        with autocast(self.device, self.perf.precision):
            if grouped and pos is None:
                passes = grouped_passes(self.net, x_lab, x_pos, x_neg, deferred=deferred)
            else:
                passes = forward_passes(self.net, x_lab, x_pos, x_neg, pos=pos)  # labelled last
            # energy_l2_pass "perturbation": the L2 term only in the loss SAM perturbs with (none without SAM)
            l2_here = obj.energy_l2_pass == "update" or self.sam is not None
            loss, stats = loss_from_passes(passes, y, obj, l2=l2_here)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sam is not None:
            self.sam.first_step()
            self.sam.zero_grad()
            # the reference's SAM pass: momentum 0 (no running-statistics update), same batches
            with frozen_bn_stats(self.model, count_batches=True), autocast(self.device, self.perf.precision):
                passes = (grouped_passes if grouped else forward_passes)(self.net, x_lab, x_pos, x_neg)
                loss_adv, _ = loss_from_passes(passes, y, obj, l2=obj.energy_l2_pass == "update")
            loss_adv.backward()
            self.sam.second_step()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if x_neg is not None:  # share of sample pixels at (or past) the edge of the image box
            stats["saturation"] = (x_neg.detach().abs() >= 0.999).float().mean()
        stats["lr"] = torch.tensor(self.lr)
        self.scheduler.step()
        self.step += 1
        return stats

    def fit(self, until: int | None = None,
            on_log: Callable[[int, dict[str, float]], None] | None = None,
            on_checkpoint: Callable[[Trainer], None] | None = None,
            progress: bool = True) -> dict[str, float]:
        """Train until step ``until`` (default: the variant's epochs); returns the last averages.

        Statistics are read out (one host sync) every ``train.log_every`` steps and before each
        checkpoint, and checked for divergence then, so a checkpoint never holds a run whose
        last steps diverged. Divergence raises ``DivergenceError``.
        """
        until = self.total_steps if until is None else until
        t = self.variant.train
        sums: dict[str, torch.Tensor] = {}
        count = 0
        last: dict[str, float] = {}
        bar = tqdm(total=until, initial=self.step, disable=not progress, desc=self.variant.name,
                   unit="it", dynamic_ncols=True)
        try:
            while self.step < until:
                stats = self.train_step()
                for k, val in stats.items():
                    sums[k] = sums[k] + val if k in sums else val.clone()
                count += 1
                bar.update(1)
                checkpoint_due = on_checkpoint is not None and (self.step % t.checkpoint_every == 0
                                                                or self.step == until)
                if self.step % t.log_every == 0 or self.step == until or checkpoint_due:
                    keys = list(sums)
                    values = torch.stack([sums[k].float().cpu() for k in keys]).div(count).tolist()
                    last = mean_over_ranks(dict(zip(keys, values, strict=True)), self.dist, self.device)
                    sums, count = {}, 0
                    problem = self.divergence(last)
                    if problem:
                        raise DivergenceError(f"{self.variant.name}: {problem} at step {self.step} (epoch "
                                              f"{self.epoch})", self.step, problem)
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "acc_train") if k in last})
                    if on_log is not None:
                        on_log(self.step, last)
                if checkpoint_due:
                    on_checkpoint(self)  # type: ignore[misc]
        finally:
            bar.close()
        return last

    def divergence(self, stats: dict[str, float]) -> str | None:
        """What is wrong with these averaged statistics, or None when training is healthy."""
        r = self.variant.recovery
        if not all(math.isfinite(v) for v in stats.values()):
            bad = [k for k, v in stats.items() if not math.isfinite(v)]
            return f"non-finite {', '.join(bad)}"
        for key in ("energy_pos", "energy_neg"):
            if abs(stats.get(key, 0.0)) > r.energy_limit:
                return f"exploding energy ({key} = {stats[key]:.3g}, limit {r.energy_limit:g})"
        if stats.get("saturation", 0.0) > r.saturation_limit:
            return (f"saturated samples ({100 * stats['saturation']:.1f}% of pixels at the box edge, "
                    f"limit {100 * r.saturation_limit:g}%)")
        return None

    def planned_remedy(self, attempt: int) -> str:
        """The remedy of the ``attempt``-th retry (1-based): the list in order, the last repeating."""
        remedies = self.variant.recovery.remedies
        return remedies[min(attempt, len(remedies)) - 1]

    def apply_remedy(self, name: str) -> None:
        """Change the run as a recovery remedy does (recorded in the checkpoints from now on)."""
        r = self.variant.recovery
        if name == "reseed":
            seed_everything(self.variant.train.seed + 7919 * (len(self.remedies) + 1))
        elif name == "lower_lr":
            self.scheduler.base_lrs = [lr * r.lr_factor for lr in self.scheduler.base_lrs]
            for group in self.optimizer.param_groups:
                group["initial_lr"] = group.get("initial_lr", group["lr"]) * r.lr_factor
                group["lr"] *= r.lr_factor
        elif name == "more_steps":
            pass  # derived from the remedy list below
        else:
            raise ValueError(f"unknown remedy {name!r}")
        self.remedies.append(name)
        self.sampler_cfg = self._sampler_with(self.remedies)

    def _sampler_with(self, remedies: list[str]) -> SamplerConfig:
        factor = self.variant.recovery.steps_factor ** remedies.count("more_steps")
        return dataclasses.replace(self.variant.sampler, steps=math.ceil(self.variant.sampler.steps * factor))

    # ---- whole training state -------------------------------------------------------------
    def state_dict(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole training state; ``extra`` carries the caller's own resumable state.

        Under data parallelism every rank must call it (the buffer shards and the ranks'
        generators are gathered); the result is the same on every rank.
        """
        buffer = None
        if self.buffer is not None:
            local = self.buffer.state_dict()
            buffer = {"samples": gather_rows(local["samples"], self.dist),
                      "labels": gather_rows(local["labels"], self.dist),
                      "generators": gather_objects(local["generator"], self.dist)}
        return {
            "format": CHECKPOINT_FORMAT,
            "variant": self.variant.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "world": self.dist.world,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "buffer": buffer,
            "rng": capture_rng(),
            "remedies": list(self.remedies),
            "extra": extra or {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """Restore the training state; returns the ``extra`` dict saved with it."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        diff = _variant_diff(state["variant"], self.variant.to_dict())
        if diff:
            raise ValueError(f"checkpoint was written for a different variant ({'; '.join(diff[:3])}); "
                             "restore the params or delete the checkpoint to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.resharded = int(state.get("world", 1)) != self.dist.world
        if self.buffer is not None:
            b = state["buffer"]
            rows = self.dist.rows(self.buffer.size)  # this rank's shard of the whole buffer
            generators = b.get("generators") or []
            same = not self.resharded and len(generators) == self.dist.world
            self.buffer.load_state_dict({"samples": b["samples"][rows], "labels": b["labels"][rows],
                                         "generator": generators[self.dist.rank] if same else None})
            if not same:  # saved by another number of processes: fresh per-rank slot draws
                self.buffer.reseed(self.variant.train.seed, self.step)
        self.remedies = list(state.get("remedies", []))
        self.sampler_cfg = self._sampler_with(self.remedies)
        restore_rng(state["rng"])
        return state.get("extra") or {}

    def save_checkpoint(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """The whole training state, checksummed, written atomically."""
        save_verified(self.state_dict(extra), path)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return self.load_state_dict(load_verified(path))


def _variant_diff(a: dict[str, Any], b: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        path = (*prefix, key)
        if path in _RESUME_FREE_KEYS or path[:1] in _RESUME_FREE_KEYS:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _variant_diff(va, vb, path)
        elif va != vb:
            out.append(f"{'.'.join(path)}: {va!r} -> {vb!r}")
    return out
