"""What ``jem-bench`` measures: whole training iterations (images/s, ms per iteration, peak memory,
achieved FLOP rate) and the FID stage's work.

Data are procedural 32x32 images (``jem.data.synthetic``), and the mixture for informative
initialisation is fitted to them, so the benchmark needs no download. Timing covers whole training
iterations (sampler, both SAM passes, optimizer step) after warm-up iterations (compilation included
there); each timed iteration is timed on its own (CUDA events between iterations on a GPU, the clock
on a CPU) and the median is reported, with the interquartile range as the spread. The FLOP rate
divides the FLOPs of the first warm-up iteration, counted by ``FlopCounterMode`` (``iteration_flops``),
by that median.

Three ways to run one variant's iteration on the same seed, network and batches: the *reference*
loop (the published scripts' iteration, ``jem.method.reference``), our *baseline* (``baseline_perf``:
fp32, eager, contiguous layout, replay buffer and data in CPU memory, plain optimizer: how the
reference code runs) and the *fast* paths (``fast_perf``: ``run.perf: auto``, bf16 autocast on CUDA,
channels_last, buffer and data on the device, fused optimizer; ``compile='on'`` adds torch.compile).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from jem.config.errors import ConfigError
from jem.config.variant import PerfConfig, Variant, _build, resolve_perf
from jem.data.synthetic import make_shapes
from jem.method.gmm import compute_mixture_stats
from jem.method.reference import ReferenceLoop
from jem.method.train import Trainer

CIFAR10_TRAIN = 50_000


def baseline_perf() -> PerfConfig:
    """How the reference code runs: fp32, eager, CPU-resident buffer and data."""
    return PerfConfig(buffer_device="cpu", data_device="cpu")


def fast_perf(device: torch.device, compile: str = "auto", overrides: list[str] | None = None) -> PerfConfig:
    """``run.perf: auto`` for ``device`` (``jem.config.variant.resolve_perf``); ``compile='on'`` adds
    torch.compile, which is not part of ``auto`` until it is measured faster on a GPU;
    ``overrides`` (``--perf KEY=VALUE``) set any other switch, e.g. ``grouped_passes=true``."""
    perf, _ = resolve_perf("auto", device)
    switches = {**dataclasses.asdict(perf), "compile": compile == "on"}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--perf {item!r}: expected KEY=VALUE, e.g. grouped_passes=true")
        switches[key] = yaml.safe_load(value)
    perf = _build(PerfConfig, switches, "--perf")  # run.perf's own checks: known keys, types
    perf.validate("--perf")
    return perf


class _NoModuleTracking(ModuleTracker):
    """``FlopCounterMode``'s per-module breakdown, switched off: its gradient hooks on module inputs
    break ``torch.autograd.grad`` w.r.t. a leaf (pytorch/pytorch#131753), which every sampler step
    takes. The total, all this needs, is kept under ``Global``."""

    def __enter__(self) -> _NoModuleTracking:
        return self

    def __exit__(self, *args: object) -> None:
        pass


def iteration_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (a whole training iteration), as
    ``torch.utils.flop_counter.FlopCounterMode`` counts what it runs: every matrix product and
    convolution, forward and backward (the gradients autograd computes and no others: a sampler
    step's backward is w.r.t. the input only), SAM's second pass and every sampler step. Batch
    norm, activations and the optimizer update are not counted. Runs ``step`` once."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        step()
    return counter.get_total_flops()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model as ``/proc/cpuinfo`` gives it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iteration_times(step: Callable[[], Any], steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step``. On CUDA from events recorded between the
    iterations (no synchronisation inside the timed block, so the host may run ahead as in
    training; in steady state the gap between two events is one iteration's wall time); on a
    CPU from the clock around each call. ``jem-bench`` reports the median, which one
    disturbed iteration on a shared machine does not move."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _reference_steps(trainer: Trainer, loop: ReferenceLoop) -> Callable[[], Any]:
    """``loop``'s iterations on ``trainer``'s batches (CPU-resident under the baseline's data
    placement, moved to the device by the loop, as the scripts' DataLoader batches are)."""
    iteration = itertools.count()

    def step() -> None:
        it = next(iteration)
        x_lab, y_lab = trainer.clf_stream.batch(it)
        x_p_d = trainer.px_stream.batch(it)[0] if trainer.px_stream is not None else None
        loop.step(x_lab, y_lab, x_p_d)

    return step


def benchmark(variant: Variant, device: torch.device, steps: int, warmup: int, perf: PerfConfig | None = None,
              n_images: int = 2048, label: str = "", reference: bool = False) -> dict[str, Any]:
    """Whole training iterations of ``variant``: ``jem.method.train.Trainer`` with ``perf``, or with
    ``reference`` the published scripts' loop (``jem.method.reference``) on the same network, buffer
    and batches (``perf`` then only places the data: the baseline's CPU memory)."""
    classes = variant.model.num_classes
    x, y = make_shapes(n_images, variant.model.image_size, num_classes=min(classes, 10), seed=0)
    if classes > 10:
        y = torch.arange(n_images) % classes
    mixture = compute_mixture_stats([(x[i:i + 512], y[i:i + 512]) for i in range(0, n_images, 512)],
                                    classes) if variant.buffer.init == "gmm" else None
    perf = perf or PerfConfig()
    trainer = Trainer(variant, x, y, mixture=mixture, device=device, perf=perf)
    model, compiled, step = trainer.model, trainer.compiled, trainer.train_step
    loop = None
    if reference:  # the published loop on a copy of the same network, buffer and batches
        loop = ReferenceLoop.from_trainer(trainer)
        trainer.model.to("cpu")  # only its batch streams are used from here on
        model, compiled, step = loop.f, "eager (the reference loop)", _reference_steps(trainer, loop)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    start = time.perf_counter()
    flops = iteration_flops(step)  # the first warm-up iteration, counted (one more iteration without warm-up)
    for _ in range(warmup - 1):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = iteration_times(step, steps, device)
    seconds = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if steps > 1 else (seconds, seconds, seconds)
    batch = variant.train.batch_size
    row = {
        "variant": variant.name,
        "mode": label or "default",
        "family": variant.family,
        "device": device_name(device),
        "model": f"WRN-{variant.model.depth}-{variant.model.width}",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch,
        "px_batch": variant.train.px_batch_size,
        "sampler": (f"{variant.sampler.kind} K={variant.sampler.steps}" if variant.sampler.kind == "sgld"
                    else f"pyld M={variant.sampler.steps} N={variant.sampler.inner_steps}")
        if variant.uses_sampler else "none",
        "sam": variant.optim.sam,
        "perf": dataclasses.asdict(perf),
        "compiled": compiled,
        "ms_per_iter": seconds * 1e3,  # median over the timed iterations
        "ms_per_iter_mean": sum(times) / len(times) * 1e3,
        "ms_quartiles": [q1 * 1e3, q3 * 1e3],
        "spread_pct": 100 * (q3 - q1) / seconds,  # interquartile range / median
        "images_per_s": batch / seconds,
        "epoch_min_cifar10": CIFAR10_TRAIN // batch * seconds / 60,
        "flops_per_iter": flops,  # FlopCounterMode's count of one iteration
        "tflops": flops / seconds / 1e12,
        "peak_memory_mb": _peak_memory_mb(device),
        "memory_kind": "CUDA max allocated" if device.type == "cuda" else "process peak RSS",
        "steps_timed": steps,
        "warmup_s": warmup_s,
    }
    del trainer, model, step, loop
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def benchmark_fid(device: torch.device, n_images: int, batch_size: int = 500, channels_last: bool = False,
                  weights: str | None = None) -> dict[str, Any]:
    """Time what the ``fid`` stage does for ``n_images`` samples: Inception pool features and
    logits (fp32, batched on ``device``), their mean and covariance (float64, on the GPU when
    ``device`` is one), IS, and the Frechet distance to cached reference statistics.

    Without ``weights`` the network has pytorch-fid's architecture with random weights: the
    same arithmetic, so the same time, but the scores themselves mean nothing.
    """
    import numpy as np

    from jem.evaluation.inception import (
        FIDInception,
        feature_stats,
        fid_inception_architecture,
        frechet_distance,
        inception_outputs,
        inception_score,
        load_fid_inception,
        random_inception_state,
    )

    if weights:
        model = load_fid_inception(weights, device=device)
    else:
        net = fid_inception_architecture()
        net.load_state_dict(random_inception_state())
        model = FIDInception(net).to(device)
    images = np.random.default_rng(0).integers(0, 256, (n_images, 3, 32, 32), dtype=np.uint8)
    inception_outputs(model, images[:batch_size], batch_size, device, progress=False, channels_last=channels_last)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    feats, logits = inception_outputs(model, images, batch_size, device, progress=False, channels_last=channels_last)
    _sync(device)
    t_features = time.perf_counter() - start
    # statistics on the benchmarked device, never on a GPU a --device cpu run happens to see (on a
    # CPU the stage's np.cov does the same float64 arithmetic as torch's matrix product)
    reference = feature_stats(feats[: max(2, n_images // 2)], device)  # the stage loads cached ones
    start = time.perf_counter()
    stats = feature_stats(feats, device)
    inception_score(logits, splits=min(10, n_images), device=device)
    t_stats = time.perf_counter() - start
    start = time.perf_counter()
    frechet_distance(stats, reference, device=device)
    t_frechet = time.perf_counter() - start
    per_image = (t_features + t_stats) / n_images  # features, covariance and IS grow with n; sqrtm does not
    return {
        "device": device_name(device),
        "images": n_images,
        "batch": batch_size,
        "channels_last": channels_last,
        "weights": weights or "random (timing only)",
        "features_s": t_features,
        "images_per_s": n_images / t_features,
        "stats_is_s": t_stats,
        "frechet_s": t_frechet,
        "total_s": t_features + t_stats + t_frechet,
        "projected_50k_s": 50_000 * per_image + t_frechet,
        "peak_memory_mb": _peak_memory_mb(device),
        "memory_kind": "CUDA max allocated" if device.type == "cuda" else "process peak RSS",
    }
