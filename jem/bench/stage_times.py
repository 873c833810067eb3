"""Wall time of every pipeline stage for a variant at a scale's counts, from measured units.

A stage at the paper's counts runs for minutes to hours; this times each stage's *unit of
work* with the library calls the stage itself makes (same network, batch sizes, sampler,
attacks, Inception), on the device, and multiplies it out to the stage's counts (the
``params.yaml`` sections at the scale, the datasets' split sizes):

* ``train``: whole training iterations (``jem.bench.speed.benchmark`` with ``run.perf: auto``)
  x iterations per epoch x epochs;
* ``sample``: one batch of fresh chains (the training p(x) batch, the variant's steps,
  running statistics untouched) x batches, plus the eval-mode forwards that classify the sets;
* ``evaluate``: eval-mode forwards (test set, BN re-estimate over the training split, the
  energy landscape's points) and forward+input-gradient passes (the three OOD scores of the
  test set and every OOD set);
* ``fid``: Inception passes of the sample sets and one Frechet distance per set and
  protocol; ``fid_ref`` (once per dataset, shared by its variants): the real images;
* ``robustness``: foolbox PGD, timed at 0 steps (the attack's fixed cost) and at 3 steps
  (the difference over 3 is the step) on one batch at one radius, x batches x radii x steps;
  BPDA+EOT the same way with the purifier of ``robustness.bpda``.

Numbers are projections from the measured units, not timings of whole stages; the table
says so, names the units and their measured times.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from jem.config.settings import PROTOCOLS
from jem.config.variant import Variant
from jem.evaluation.metrics import predict_logits
from jem.evaluation.ood import ood_scores
from jem.evaluation.robustness import bpda_eot_accuracy, pgd_accuracy, purification_sampler
from jem.method.models import build_model
from jem.method.samplers import sample, without_bn_updates

# Split sizes of the real datasets (torchvision's CIFAR-10/100, SVHN and CelebA test splits);
# the procedural scales give theirs in params.yaml (datasets.<role>.<scale>).
REAL_SIZES = {
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
    "svhn": {"test": 26_032},
    "celeba": {"test": 19_962},
}


@dataclasses.dataclass
class StageTime:
    stage: str
    work: str  # the counts, e.g. "10,100 chains in 158 batches x 5 steps"
    seconds: float


def split_sizes(spec: dict[str, Any]) -> dict[str, int]:
    """Images per split of a dataset role at a scale (``datasets.<role>.<scale>``): the
    training split without its validation carve-out, test, interp."""
    real = REAL_SIZES.get(str(spec.get("source")), {})
    val = int(spec.get("val", 0))
    sizes = {"val": val, "interp": int(spec.get("interp", 0))}
    if "train" in spec:  # procedural: train and val are separate counts
        sizes["train"] = int(spec["train"])
    elif "train" in real:
        sizes["train"] = real["train"] - val
    sizes["test"] = int(spec.get("test", real.get("test", 0)))
    return sizes


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Seconds of one call of ``fn``: the fastest of ``repeats`` timed calls, after one untimed
    call (allocations, cuDNN autotuning)."""
    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _per_step(run: Callable[[int], Any], device: torch.device) -> tuple[float, float]:
    """(fixed seconds, seconds per step) of an attack: the fixed cost (random start, the final
    classification) timed directly as the attack with no steps, the step from the difference
    to 3 steps. Each timing is the fastest of three: load from other processes on a shared
    machine inflates single timings by more than the fixed cost."""
    fixed, three = _timed(lambda: run(0), device, repeats=3), _timed(lambda: run(3), device, repeats=3)
    return fixed, max(three - fixed, 0.0) / 3


def measure_units(variant: Variant, sections: dict[str, dict[str, Any]], device: torch.device,
                  train_s: float, inception: dict[str, Any], shared: dict[str, float] | None = None,
                  channels_last: bool = False) -> dict[str, float]:
    """Seconds of each unit of work of ``variant``'s stages on ``device``.

    ``train_s``: seconds per training iteration (``jem.bench.speed.benchmark``); ``inception``: a
    ``jem.bench.speed.benchmark_fid`` row. ``shared``: units that do not depend on the sampler
    (forwards, OOD passes, PGD, Inception) measured for another variant of the same
    network, reused instead of measured again. ``channels_last``: the model's layout in the
    stages (``run.perf.channels_last``).
    """
    m = variant.model
    model = build_model(m).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)

    def images(n: int) -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, 256, (n, m.in_channels, m.image_size, m.image_size), dtype=np.uint8))

    def labels(n: int) -> torch.Tensor:
        return torch.arange(n) % m.num_classes

    units = {"train_iter": train_s}
    s_cfg, ev, rb = sections["sample"], sections["evaluate"], sections["robustness"]
    if variant.uses_sampler:
        px, steps = variant.train.px_batch_size, int(s_cfg.get("fresh_steps") or variant.sampler.steps)
        x0 = (torch.rand(px, m.in_channels, m.image_size, m.image_size) * 2 - 1).to(device)
        units["chain_batch"] = _timed(lambda: sample(model, x0, without_bn_updates(variant.sampler), steps=steps),
                                      device)
    if shared is None:
        batch = int(ev.get("batch_size", 500))
        x = images(2 * batch)
        units["forward_image"] = _timed(lambda: predict_logits(model, x, batch, device), device) / len(x)
        units["ood_image"] = _timed(lambda: ood_scores(model, x, batch, device), device) / len(x)
        pb = int(rb.get("batch_size", 250))
        xp, yp = images(pb), labels(pb)
        units["pgd_fixed"], units["pgd_step"] = _per_step(
            lambda k: pgd_accuracy(model, xp, yp, "linf", [8 / 255], k, rb.get("rel_stepsize"), pb, device,
                                   success=str(rb.get("success", "any_iterate"))), device)
        units["inception_image"] = (inception["features_s"] + inception["stats_is_s"]) / inception["images"]
        units["frechet"] = inception["frechet_s"]
    else:
        units.update({k: v for k, v in shared.items() if k not in ("train_iter", "chain_batch", "bpda_fixed",
                                                                    "bpda_step")})
    bpda = rb.get("bpda") or {}
    if variant.uses_sampler and bpda.get("epsilons"):
        bb = min(int(bpda.get("batch_size") or rb.get("batch_size", 250)), int(bpda.get("images", 1000)))
        xb, yb = images(bb), labels(bb)
        purifier = purification_sampler(variant.sampler, bpda)
        units["bpda_fixed"], units["bpda_step"] = _per_step(
            lambda k: bpda_eot_accuracy(model, purifier, xb, yb, str(bpda.get("norm", "linf")), [8 / 255], k,
                                        eot=int(bpda.get("eot", 1)), chains=int(bpda.get("chains", 1)),
                                        input_noise=float(bpda.get("input_noise", 0.0)),
                                        rel_stepsize=bpda.get("rel_stepsize") or rb.get("rel_stepsize"),
                                        batch_size=bb, device=device), device)
    return units


def stage_times(variant: Variant, sections: dict[str, dict[str, Any]], sizes: dict[str, dict[str, int]],
                units: dict[str, float]) -> list[StageTime]:
    """The projected wall time of each stage of ``variant`` (``train`` per epoch and in all,
    then the others in DAG order) from ``units`` (``measure_units``). ``sizes``: split sizes
    per dataset role (``split_sizes``)."""
    own = sizes[variant.dataset]
    t, classes = variant.train, variant.model.num_classes
    per_epoch = own["train"] // t.batch_size
    out = [StageTime("train (one epoch)", f"{per_epoch:,} iterations of {t.batch_size}/{t.px_batch_size}",
                     per_epoch * units["train_iter"]),
           StageTime("train", f"{t.epochs} epochs", t.epochs * per_epoch * units["train_iter"])]

    s = sections["sample"]
    fresh, cond = int(s["fresh"]), int(s["per_class"]) * classes
    kept = min(int(s["buffer"]), variant.buffer.size)
    if variant.uses_sampler:
        chains = math.ceil(fresh / t.px_batch_size) + math.ceil(cond / t.px_batch_size)
        steps = int(s.get("fresh_steps") or variant.sampler.steps)
        out.append(StageTime("sample", f"{fresh + cond:,} chains ({chains} batches) x {steps} steps; "
                                       f"{kept + fresh + cond:,} images classified",
                             chains * units["chain_batch"] + (kept + fresh + cond) * units["forward_image"]))
    else:
        out.append(StageTime("sample", "softmax baseline: not sampled", 0.0))

    ev = sections["evaluate"]
    cap = ev.get("ood_max")
    ood_roles = [r for r in ev.get("ood_sets", []) if r != variant.dataset]
    ood_n = [min(own["interp"] if r == "interp" else sizes[r]["test"], cap or 10**12) for r in ood_roles]
    land = ev.get("landscape") or {}
    land_n = int(land.get("points", 21)) * max(1, round(float(land.get("fraction", 0.1)) * own["train"]))
    forwards = 2 * own["test"] + own["train"] + land_n
    ood_total = min(own["test"], cap or 10**12) + sum(ood_n)
    out.append(StageTime("evaluate", f"{forwards:,} forwards (test x2, BN re-estimate over the training split, "
                                     f"landscape); {ood_total:,} OOD passes with input gradient",
                         forwards * units["forward_image"] + ood_total * units["ood_image"]))

    f = sections["fid"]
    if variant.uses_sampler:
        sets = {"buffer": kept, "fresh": fresh}
        scored = sum(sets.get(name, 0) for name in f.get("sets", []))
        frechets = len(f.get("sets", [])) * len(PROTOCOLS)
        out.append(StageTime("fid", f"{scored:,} Inception passes, {frechets} Frechet distances",
                             scored * units["inception_image"] + frechets * units["frechet"]))
    else:
        out.append(StageTime("fid", "softmax baseline: no samples to score", 0.0))

    r = sections["robustness"]
    n = min(int(r["images"]), own["test"])
    radii = len(r.get("linf", [])) + len(r.get("l2", []))
    batches = math.ceil(n / int(r.get("batch_size", 250)))
    pgd = batches * radii * (units["pgd_fixed"] + int(r["steps"]) * units["pgd_step"])
    work = f"PGD: {n:,} images x {radii} radii x {r['steps']} steps"
    bpda = r.get("bpda") or {}
    if "bpda_step" in units:
        nb = min(int(bpda.get("images", n)), n)
        bb = int(bpda.get("batch_size") or r.get("batch_size", 250))
        eps = len(bpda["epsilons"])
        pgd += math.ceil(nb / bb) * eps * (units["bpda_fixed"] + int(bpda["steps"]) * units["bpda_step"])
        work += (f"; BPDA+EOT: {nb:,} images x {eps} radii x {bpda['steps']} steps x {bpda.get('eot', 1)} EOT "
                 f"(purification {bpda.get('chains', 1)} chains x {bpda['purify_steps']} steps)")
    out.append(StageTime("robustness", work, pgd))
    return out


def reference_time(role_sizes: dict[str, int], fid_section: dict[str, Any], role: str,
                   units: dict[str, float]) -> StageTime:
    """``fid_ref@<role>``: Inception statistics of the real images, once per dataset."""
    splits = (fid_section.get("reference_splits_by_role") or {}).get(role) or fid_section.get("reference_splits", [])
    n = sum(role_sizes.get(s, 0) for s in splits)
    if fid_section.get("reference_max"):
        n = min(n, int(fid_section["reference_max"]))
    return StageTime(f"fid_ref@{role}", f"{n:,} real images ({' + '.join(splits)})", n * units["inception_image"])


def list_schedule(durations: list[float], workers: int) -> float:
    """Wall time of ``durations`` run in this order, each by the first worker free: the schedule of
    ``python -m stages.table``'s pool (tasks handed out in table order)."""
    free = [0.0] * max(1, workers)
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def table_wall_time(trainings: list[float], evaluations: list[float], references: list[float],
                    workers: int) -> float:
    """``python -m stages.table`` on ``workers`` devices: the trainings, then the FID reference
    statistics (one process), then each variant's sample + evaluate + fid + robustness, each phase
    ``workers`` at a time in table order. The data stages and the report are not counted (seconds
    next to these)."""
    return list_schedule(trainings, workers) + sum(references) + list_schedule(evaluations, workers)


def total_seconds(times: list[StageTime]) -> float:
    """Every stage of one variant (``train`` counted once: the per-epoch row is part of it)."""
    return sum(t.seconds for t in times if t.stage != "train (one epoch)")


def hms(seconds: float) -> str:
    """``1 h 05 min`` / ``4 min 10 s`` / ``12.3 s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"
