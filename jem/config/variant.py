"""The variant description: every knob of JEM, JEM++, SADA-JEM and their baselines as data.

A variant is built from a plain dict (a block of ``params.yaml``). Unknown keys and wrong
types are rejected with one line naming the key, the value and what is allowed, so a typo
in the params file never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jem.config.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a device is resolved: reading params (stage configure) needs none
    import torch


@dataclass
class ModelConfig:
    depth: int = 28  # WRN depth, (depth - 4) % 6 == 0
    width: int = 10  # widening factor k
    dropout: float = 0.0
    norm: str = "batch"  # batch | none
    # PyTorch convention: running = (1 - m) * running + m * batch. The JEM++/SADA-JEM
    # reference code builds BatchNorm2d(momentum=0.9): 90 % weight on the newest batch.
    bn_momentum: float = 0.1
    leak: float = 0.2  # LeakyReLU slope
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32

    def validate(self, where: str) -> None:
        _check((self.depth - 4) % 6 == 0 and self.depth >= 10, where, "depth", self.depth,
               "a WRN depth with (depth - 4) % 6 == 0 and depth >= 10, e.g. 10, 16, 28")
        _check(self.width >= 1, where, "width", self.width, "an integer >= 1")
        _check(0.0 <= self.dropout < 1.0, where, "dropout", self.dropout, "a value in [0, 1)")
        _check(self.norm in ("batch", "none"), where, "norm", self.norm, "'batch' or 'none'")
        _check(0.0 <= self.bn_momentum <= 1.0, where, "bn_momentum", self.bn_momentum,
               "a value in [0, 1] (PyTorch convention)")
        _check(self.num_classes >= 2, where, "num_classes", self.num_classes, "an integer >= 2")
        _check(self.image_size >= 8 and self.image_size % 4 == 0, where, "image_size",
               self.image_size, "a multiple of 4, at least 8")


@dataclass
class SamplerConfig:
    kind: str = "sgld"  # sgld | pyld
    steps: int = 20  # K for SGLD, M (outer steps) for PYLD
    inner_steps: int = 5  # N, PYLD only
    step_size: float = 1.0  # alpha: SGLD step / PYLD outer step (0 = inner steps only)
    inner_step_size: float = 0.2  # PYLD inner step (pyld_lr)
    noise: float = 0.01  # sigma of the Gaussian noise added after each (outer) step
    grad_clamp: float | None = None  # eps of the proximal step; None = no clamp
    image_clamp: bool = False  # clamp x to [-1, 1] after each step
    # Batch norm while sampling: "eval" (running stats, JEM), "train" (batch stats and
    # running-stat updates, the JEM++/SADA-JEM reference), "train_frozen" (batch stats,
    # running stats left alone).
    bn_mode: str = "eval"

    def validate(self, where: str) -> None:
        _check(self.kind in ("sgld", "pyld"), where, "kind", self.kind, "'sgld' or 'pyld'")
        _check(self.steps >= 1, where, "steps", self.steps, "an integer >= 1")
        _check(self.inner_steps >= 1, where, "inner_steps", self.inner_steps, "an integer >= 1")
        _check(self.step_size >= 0, where, "step_size", self.step_size, "a value >= 0")
        _check(self.inner_step_size >= 0, where, "inner_step_size", self.inner_step_size,
               "a value >= 0")
        _check(self.noise >= 0, where, "noise", self.noise, "a value >= 0")
        _check(self.grad_clamp is None or self.grad_clamp > 0, where, "grad_clamp",
               self.grad_clamp, "a value > 0, or null for no clamp")
        _check(self.bn_mode in ("eval", "train", "train_frozen"), where, "bn_mode", self.bn_mode,
               "'eval', 'train' or 'train_frozen'")
        if self.kind == "sgld":
            _check(self.step_size > 0, where, "step_size", self.step_size,
                   "a value > 0 for the sgld sampler")
        else:
            _check(self.step_size > 0 or self.inner_step_size > 0, where, "inner_step_size",
                   self.inner_step_size, "a value > 0 when step_size is 0 (PYLD would not move)")


@dataclass
class BufferConfig:
    size: int = 10000
    reinit_freq: float = 0.05
    init: str = "uniform"  # uniform | gmm (informative initialisation, JEM++)
    gmm_jitter: float = 1e-4  # added to the diagonal of each class covariance

    def validate(self, where: str) -> None:
        _check(self.size >= 1, where, "size", self.size, "an integer >= 1")
        _check(0.0 <= self.reinit_freq <= 1.0, where, "reinit_freq", self.reinit_freq,
               "a fraction in [0, 1]")
        _check(self.init in ("uniform", "gmm"), where, "init", self.init, "'uniform' or 'gmm'")
        _check(self.gmm_jitter >= 0, where, "gmm_jitter", self.gmm_jitter, "a value >= 0")


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.1
    # Multiplies lr. For a scale that changes the batch size of every method at once (the
    # demo's batch sizes against the papers'), by the linear scaling rule.
    lr_scale: float = 1.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    sam: str = "none"  # none | sam | asam
    rho: float = 0.05
    schedule: str = "step"  # step | cosine | constant
    # epochs of the step decays; fractions allowed (the demo decays at 6.4 and 7.2 of 8)
    milestones: list[float] = field(default_factory=lambda: [60, 120, 180])
    gamma: float = 0.2  # step decay factor
    warmup_iters: int = 1000  # linear warm-up over the first iterations (0 = none)

    def validate(self, where: str) -> None:
        _check(self.name in ("sgd", "adam"), where, "name", self.name, "'sgd' or 'adam'")
        _check(self.lr > 0, where, "lr", self.lr, "a value > 0")
        _check(self.lr_scale > 0, where, "lr_scale", self.lr_scale, "a value > 0")
        _check(0 <= self.momentum < 1, where, "momentum", self.momentum, "a value in [0, 1)")
        _check(self.weight_decay >= 0, where, "weight_decay", self.weight_decay, "a value >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), where, "betas",
               self.betas, "two values in [0, 1)")
        _check(self.sam in ("none", "sam", "asam"), where, "sam", self.sam,
               "'none', 'sam' or 'asam'")
        _check(self.rho >= 0, where, "rho", self.rho, "a value >= 0")
        _check(self.schedule in ("step", "cosine", "constant"), where, "schedule", self.schedule,
               "'step', 'cosine' or 'constant'")
        _check(list(self.milestones) == sorted(self.milestones) and all(m > 0 for m in self.milestones),
               where, "milestones", self.milestones, "increasing positive epochs (fractions allowed)")
        _check(0 < self.gamma <= 1, where, "gamma", self.gamma, "a factor in (0, 1]")
        _check(self.warmup_iters >= 0, where, "warmup_iters", self.warmup_iters, "an integer >= 0")


@dataclass
class AugmentConfig:
    crop_padding: int = 4  # pad-and-random-crop; 0 = no crop
    pad_mode: str = "reflect"  # reflect | constant (zeros)
    hflip: bool = True

    def validate(self, where: str) -> None:
        _check(self.crop_padding >= 0, where, "crop_padding", self.crop_padding, "an integer >= 0")
        _check(self.pad_mode in ("reflect", "constant"), where, "pad_mode", self.pad_mode,
               "'reflect' or 'constant'")


POS_FORWARD = ("before_sampler", "after_sampler")
L2_PASSES = ("update", "perturbation")


@dataclass
class ObjectiveConfig:
    generative: bool = True  # False: softmax classifier only (no sampler, no buffer)
    clf_weight: float = 1.0
    px_weight: float = 1.0
    energy_l2: float = 0.0  # IGEBM energy L2: l2 * (E(x+)^2 + E(x-)^2)
    # which loss carries it under SAM/ASAM: "update", the loss the update steps on (both SAM passes;
    # our reading of SADA-JEM Table 5's "+ L2"), or "perturbation", the first pass only, as
    # train_sadajem.py does (its update's gradient then omits it; without SAM it has no effect)
    energy_l2_pass: str = "update"
    px_augment: bool = True  # JEM/JEM++: True; SADA-JEM: False (p(x) batch un-augmented)
    input_noise: float = 0.03  # Gaussian noise added to training inputs (both batches)
    # When the x+ forward runs, relative to the sampler (the labelled forward always runs last,
    # so eval mode normalises with statistics of labelled data, as in every reference script):
    # before_sampler: x+, sampler, x-, labelled (JEM++ --plc alltrain1, SADA-JEM);
    # after_sampler: sampler, x+, x-, labelled (JEM; JEM++ --plc alltrain2).
    pos_forward: str = "before_sampler"

    def validate(self, where: str) -> None:
        _check(self.clf_weight >= 0, where, "clf_weight", self.clf_weight, "a value >= 0")
        _check(self.px_weight >= 0, where, "px_weight", self.px_weight, "a value >= 0")
        _check(self.energy_l2 >= 0, where, "energy_l2", self.energy_l2, "a value >= 0")
        _check(self.energy_l2_pass in L2_PASSES, where, "energy_l2_pass", self.energy_l2_pass,
               " or ".join(repr(p) for p in L2_PASSES))
        _check(self.input_noise >= 0, where, "input_noise", self.input_noise, "a value >= 0")
        _check(self.pos_forward in POS_FORWARD, where, "pos_forward", self.pos_forward,
               " or ".join(repr(p) for p in POS_FORWARD))


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 64  # labelled (classification) batch
    px_batch_size: int = 64  # p(x) batch (x+) and sampler batch (x-)
    seed: int = 1
    log_every: int = 50  # iterations between metric read-outs (host syncs)
    checkpoint_every: int = 1000  # iterations between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept (an older one is used if the newest is damaged)

    def validate(self, where: str) -> None:
        for key in ("epochs", "batch_size", "px_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, key)
            _check(value >= 1, where, key, value, "an integer >= 1")


PRECISIONS = ("fp32", "bf16")


@dataclass
class PerfConfig:
    """How a run executes, not what it computes: every switch agrees with the safe default
    (fp32, eager, buffer and data on the training device) within numerical tolerance, so
    none of it is part of a variant or of its checkpoints."""

    precision: str = "fp32"  # fp32 | bf16: autocast of the loss passes (and of SAM's second pass)
    sampler_precision: str = "fp32"  # fp32 | bf16: autocast of the sampler's forward/backward
    channels_last: bool = False  # NHWC memory layout for the model and its inputs
    compile: bool = False  # torch.compile the network trunk; eager (with a log line) when unavailable
    buffer_device: str = "auto"  # auto (the training device) | cpu: where the replay buffer and p0 live
    data_device: str = "auto"  # auto (the training device) | cpu: where the prepared dataset lives
    fused_optimizer: bool = False  # fused (else foreach) optimizer kernels
    # the loss passes (x+, x-, labelled) as one forward of the concatenated batches with per-batch
    # batch-norm statistics and running-statistics updates in the reference order
    grouped_passes: bool = False

    def validate(self, where: str) -> None:
        for key in ("precision", "sampler_precision"):
            _check(getattr(self, key) in PRECISIONS, where, key, getattr(self, key), "'fp32' or 'bf16'")
        for key in ("buffer_device", "data_device"):
            _check(getattr(self, key) in ("auto", "cpu"), where, key, getattr(self, key), "'auto' or 'cpu'")


PERF_PRESETS = ("auto", "safe")


def resolve_perf(setting: PerfConfig | str, device: torch.device | str) -> tuple[PerfConfig, str]:
    """The execution settings for ``device`` and a line saying which ran.

    ``auto`` (the default): on CUDA the fastest configuration verified correct there (bf16
    autocast of the loss passes and the sampler, channels_last, fused optimizer, buffer and
    data on the GPU) where the GPU runs bf16 natively (Ampere and later); on older GPUs fp32
    with the fused optimizer and the buffer and data on the GPU; on a CPU fp32 with
    channels_last and the fused optimizer (1.1-1.3x faster there, ``reports/performance.md``;
    bf16 autocast is slower on CPUs).
    torch.compile is not part of ``auto``: it has not been measured faster on a GPU yet; turn
    it on with an explicit ``run.perf`` mapping. ``safe``: fp32, eager, everything off.
    A mapping is taken as it is."""
    import torch

    device = torch.device(device)
    if isinstance(setting, PerfConfig):
        return setting, f"explicit run.perf ({_describe(setting)})"
    if setting == "safe":
        return PerfConfig(), "safe (fp32, eager)"
    if setting != "auto":
        raise ConfigError(f"run.perf = {setting!r}: expected 'auto', 'safe' or a mapping of PerfConfig switches")
    if device.type == "cuda":
        name, native_bf16 = _cuda_device(device)
        if native_bf16:
            perf = PerfConfig(precision="bf16", sampler_precision="bf16", channels_last=True, compile=False,
                              fused_optimizer=True)
            return perf, f"auto on CUDA, {name} ({_describe(perf)})"
        # before Ampere bf16 is emulated (slower than fp32), and NHWC pays off with the tensor-core
        # kernels of reduced precision, not with fp32's
        perf = PerfConfig(fused_optimizer=True)
        return perf, f"auto on CUDA, {name}: no native bf16, fp32 ({_describe(perf)})"
    perf = PerfConfig(channels_last=True, fused_optimizer=True)
    return perf, f"auto on {device.type} ({_describe(perf)})"


def _cuda_device(device: torch.device) -> tuple[str, bool]:
    """The GPU's name with its compute capability, and whether it runs bf16 natively (sm_80,
    Ampere, and later; ROCm devices do)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    native = bool(torch.version.hip) or props.major >= 8
    return f"{props.name} (sm_{props.major}{props.minor})", native


def _describe(perf: PerfConfig) -> str:
    parts = [f"loss {perf.precision}", f"sampler {perf.sampler_precision}"]
    parts += [name for name, on in (("channels_last", perf.channels_last), ("compile", perf.compile),
                                    ("fused optimizer", perf.fused_optimizer),
                                    ("grouped loss passes", perf.grouped_passes)) if on]
    parts += [f"{k} on cpu" for k in ("buffer_device", "data_device") if getattr(perf, k) == "cpu"]
    return ", ".join(parts)


REMEDIES = ("reseed", "lower_lr", "more_steps")


@dataclass
class RecoveryConfig:
    """What to do when training diverges (non-finite loss, exploding energies, saturated samples).

    The run rolls back to its last good checkpoint and applies ``remedies`` one per retry, in
    order and cumulatively (the last one repeats once the list is used up): ``reseed`` draws
    new random numbers, ``lower_lr`` multiplies the learning rate by ``lr_factor``,
    ``more_steps`` multiplies the sampler's steps by ``steps_factor`` (what the JEM authors
    did by hand). After ``max_retries`` retries the run stops. None of this changes a run
    that does not diverge, so a checkpoint resumes whatever these settings are.

    ``enabled: false`` measures stability as the papers did: the run stops at its first
    divergence and is recorded as diverged at that epoch (its train stage succeeds; the stages
    after it and the report say "diverged at epoch e"), instead of being rolled back.
    """

    enabled: bool = True
    max_retries: int = 3
    remedies: list[str] = field(default_factory=lambda: list(REMEDIES))
    lr_factor: float = 0.5
    steps_factor: float = 2.0
    energy_limit: float = 1e4  # |mean E(x)| of data or samples beyond this: exploding energies
    saturation_limit: float = 0.98  # fraction of sample pixels at (or beyond) the [-1, 1] box edge

    def validate(self, where: str) -> None:
        _check(isinstance(self.enabled, bool), where, "enabled", self.enabled, "true or false")
        _check(self.max_retries >= 0, where, "max_retries", self.max_retries, "an integer >= 0")
        _check(bool(self.remedies) and all(r in REMEDIES for r in self.remedies), where, "remedies",
               self.remedies, f"a non-empty list of {', '.join(REMEDIES)}")
        _check(0 < self.lr_factor < 1, where, "lr_factor", self.lr_factor, "a factor in (0, 1)")
        _check(self.steps_factor > 1, where, "steps_factor", self.steps_factor, "a factor > 1")
        _check(self.energy_limit > 0, where, "energy_limit", self.energy_limit, "a value > 0")
        _check(0 < self.saturation_limit <= 1, where, "saturation_limit", self.saturation_limit,
               "a fraction in (0, 1]")


@dataclass
class Variant:
    """Everything that defines one training run."""

    name: str = "variant"
    family: str = "jem"  # descriptive: jem | jempp | sadajem | softmax | ...
    dataset: str = "cifar10"  # resolved by the pipeline; the library does not read it
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "variant") -> Variant:
        variant = _build(cls, d, where)
        variant.validate(where)
        return variant

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, where: str = "variant") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f"{where}.{f.name}")
        if self.optim.sam != "none":
            _check(self.optim.rho > 0, f"{where}.optim", "rho", self.optim.rho,
                   "a value > 0 when sam is enabled")
        if self.objective.generative and self.buffer.init == "gmm" and self.buffer.size < self.model.num_classes:
            raise ConfigError(f"{where}.buffer.size = {self.buffer.size}: must hold at least one "
                              f"sample per class ({self.model.num_classes}) for gmm init")

    @property
    def uses_sampler(self) -> bool:
        return self.objective.generative


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``base`` with ``override`` merged in (dicts recursively, rest replaced)."""
    out = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _check(ok: bool, where: str, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{where}.{key} = {value!r}: expected {allowed}")


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} = {d!r}: expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(names)}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    return value
