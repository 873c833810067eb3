"""Training-speed benchmark: images/s, ms per iteration, peak memory and achieved FLOP rate.

    jem-bench                                   # jem_k20, jempp_m10, sadajem_k5
    jem-bench --variant sadajem_k5 --device cuda --depth 28 --width 10 --batch 64
    jem-bench --compare --report reports/performance.md   # baseline vs fast paths, side by side
    jem-bench --json bench.json                 # also write the figures as JSON
    jem-bench --compare --fid 50000 --report reports/performance.md   # and the FID stage's work
    jem-bench --compare --stages --report reports/performance.md   # and every stage's wall time
    jem-bench --startup                         # every stage's start-up, from a tiny-scale dvc repro

Variants come from ``params.yaml`` (``--params``) at the chosen scale (``--scale``: ``paper``
on CUDA, ``demo`` on CPU unless given); ``--depth``, ``--width`` and ``--batch`` override the
model and the labelled batch (the p(x) batch keeps its ratio to it). Data are procedural
32x32 images (``jem.data.synthetic``), and the mixture for informative initialisation is fitted
to them, so the benchmark needs no download. Timing covers whole training iterations
(sampler, both SAM passes, optimizer step) after warm-up iterations (compilation included
there); each timed iteration is timed on its own (CUDA events between iterations on a GPU,
the clock on a CPU) and the median is reported, with the interquartile range as the spread.

``--compare`` times each variant three times in one process, same seed, network and batches:
the *reference* loop (the published scripts' iteration, ``jem.method.reference``), our *baseline*
(fp32, eager, contiguous layout, replay buffer and data in CPU memory, plain optimizer: how the
reference code runs) and the *fast* paths (``run.perf: auto``: bf16 autocast on CUDA,
channels_last, buffer and data on the device, fused optimizer; ``--compile on`` adds
torch.compile), and prints the ratios.

``--startup`` tabulates each stage's start-up (imports, process start to its first line of work) from
a real ``dvc repro`` (``jem.bench.startup``): ``--scale`` tiny (default) or demo, in a scratch copy of
this checkout, or a run of your own (``--timing-log``).

``--stages`` projects the wall time of every stage (train per epoch and in all, sample,
evaluate, fid, robustness) of the first ``--variant`` (default sadajem_k5) at the scale's
counts from measured units of work (``jem.bench.stage_times``), and the wall time of a table's
variants on 1, 2, 4, 8 and one-per-variant devices as ``python -m stages.table`` schedules them
(``--table``: a name under ``tables`` in params.yaml, ``all`` of them; default SADA-JEM Table 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from jem.config.errors import ConfigError
from jem.config.params import lookup, resolve_variant
from jem.config.variant import PerfConfig, Variant, _build, _describe, resolve_perf
from jem.data.synthetic import make_shapes
from jem.evaluation.inception import InceptionUnavailable
from jem.method.gmm import compute_mixture_stats
from jem.method.models import count_flops
from jem.method.reference import ReferenceLoop
from jem.method.train import Trainer

DEFAULT_VARIANTS = ("jem_k20", "jempp_m10", "sadajem_k5")
GPU_COMMAND = "jem-bench --device cuda --compare --fid 50000 --stages --report reports/performance.md"
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


def iteration_flops(variant: Variant, flops_per_image: int) -> float:
    """Model FLOPs of one training iteration (backward counted as twice the forward).

    Loss passes: labelled batch, plus x+ and x- for the generative families; SAM repeats
    them. Sampler: one forward and input-gradient backward of the x- batch per (outer)
    step; PYLD's inner steps only touch the first layer and are not counted.
    """
    t = variant.train
    loss_images = t.batch_size + (2 * t.px_batch_size if variant.uses_sampler else 0)
    passes = 2 if variant.optim.sam != "none" else 1
    sampler_images = t.px_batch_size * variant.sampler.steps if variant.uses_sampler else 0
    return 3.0 * flops_per_image * (loss_images * passes + sampler_images)


def _device_name(device: torch.device) -> str:
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
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = iteration_times(step, steps, device)
    seconds = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if steps > 1 else (seconds, seconds, seconds)
    flops = iteration_flops(variant, count_flops(model))
    batch = variant.train.batch_size
    row = {
        "variant": variant.name,
        "mode": label or "default",
        "family": variant.family,
        "device": _device_name(device),
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
        "device": _device_name(device),
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


def _format_fid(r: dict[str, Any]) -> str:
    return (f"FID of {r['images']} samples on {r['device']} (batch {r['batch']}, channels_last "
            f"{r['channels_last']}, weights {r['weights']}): Inception {r['features_s']:.1f} s "
            f"({r['images_per_s']:.0f} img/s), mean/cov + IS {r['stats_is_s']:.2f} s, Frechet distance "
            f"{r['frechet_s']:.2f} s; total {r['total_s']:.1f} s; projected for 50,000 samples "
            f"{r['projected_50k_s']:.0f} s; peak {r['peak_memory_mb']:.0f} MB ({r['memory_kind']})")


def _format(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "mode", "model", "batch", "sampler", "sam", "ms/iter", "IQR %", "img/s", "min/epoch*",
            "TFLOP/s", "peak MB")
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for r in rows:
        cells = (r["variant"], r["mode"], r["model"], f"{r['batch']}/{r['px_batch']}", r["sampler"], r["sam"],
                 f"{r['ms_per_iter']:.1f}", f"{r['spread_pct']:.1f}", f"{r['images_per_s']:.1f}",
                 f"{r['epoch_min_cifar10']:.2f}",
                 f"{r['tflops']:.3f}", f"{r['peak_memory_mb']:.0f}")
        lines.append("  ".join(f"{c:>12}" for c in cells))
    lines.append("ms/iter: median of the timed iterations; IQR %: interquartile range / median; "
                 "* projected minutes per CIFAR-10 epoch (50,000 images / labelled batch x ms/iter)")
    return "\n".join(lines)


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant timed in all three modes: the fast paths' speed-up over the reference loop
    and over our baseline, and the baseline's time relative to the reference loop's."""
    ms = {(r["variant"], r["mode"]): r["ms_per_iter"] for r in rows}
    return [{"variant": v, "fast_vs_reference": ms[(v, "reference")] / ms[(v, "fast")],
             "fast_vs_baseline": ms[(v, "baseline")] / ms[(v, "fast")],
             "baseline_vs_reference": ms[(v, "baseline")] / ms[(v, "reference")]}
            for v, m in ms if m == "fast" and (v, "baseline") in ms and (v, "reference") in ms]


def markdown_report(rows: list[dict[str, Any]], command: str, fid: dict[str, Any] | None = None,
                    stages: dict[str, Any] | None = None) -> str:
    """``reports/performance.md``: the side-by-side table, the device, the settings, the ratios,
    the FID timing and the stage times when there are some."""
    lines = ["# Speed: the reference loop, our baseline and the fast paths", ""]
    if rows:
        lines += _training_section(rows, command)
    if fid:
        lines += _fid_section(fid, command)
    if stages:
        lines += _stages_section(stages, command)
    devices = [r["device"] for r in rows] + [d["device"] for d in (fid, stages) if d]
    if devices and all(d.startswith("CPU") for d in devices):
        lines += ["## On a GPU", "",
                  "Every figure above was measured on this CPU. On a GPU, the one command that takes them all "
                  "(WRN-28-10 at the paper's batches and counts, FID of 50,000 samples) and rewrites this file is",
                  "", f"    {GPU_COMMAND}", ""]
    return "\n".join(lines) + "\n"


def _stages_section(r: dict[str, Any], command: str) -> list[str]:
    from jem.bench.stage_times import hms

    u = r["units"]
    lines = [
        f"## Stage times at the {r['scale']} scale: {r['variant']}",
        "",
        f"Measured by `{command}` on **{r['device']}**: each stage's unit of work timed with the stage's own "
        f"library calls, multiplied out to the counts of `params.yaml` at the {r['scale']} scale "
        "(`jem/bench/stage_times.py`). Projections from measured units, not timings of whole stages; fid and "
        "fid_ref count the Inception passes they make with the weights in place (without them both record "
        "IS/FID as unavailable in seconds).",
        "",
        "| stage | work | projected wall time |",
        "|---|---|---:|",
    ]
    lines += [f"| {t['stage']} | {t['work']} | {hms(t['seconds'])} |" for t in r["stages"]]
    lines += [f"| **all stages of {r['variant']}** | | **{hms(r['total_s'])}** |", ""]
    units = [f"training iteration {1e3 * u['train_iter']:.1f} ms (run.perf: {r['perf']})",
             f"fresh-chain batch {1e3 * u['chain_batch']:.1f} ms",
             f"eval forward {1e3 * u['forward_image']:.3f} ms/image",
             f"OOD scores (forward + input gradient) {1e3 * u['ood_image']:.3f} ms/image",
             f"PGD {1e3 * u['pgd_step']:.1f} ms/step + {1e3 * u['pgd_fixed']:.1f} ms per batch and radius",
             f"Inception {1e3 * u['inception_image']:.3f} ms/image, Frechet {u['frechet']:.2f} s"]
    if "bpda_step" in u:
        units.append(f"BPDA+EOT {1e3 * u['bpda_step']:.1f} ms/step + {1e3 * u['bpda_fixed']:.1f} ms "
                     "per batch and radius")
    slower = [t["stage"] for t in r["stages"] if t["stage"] in ("sample", "evaluate", "fid", "robustness")
              and t["seconds"] > r["train_s"]]
    lines += ["Units measured: " + "; ".join(units) + ".", "",
              "Stages that take longer than training: " + (", ".join(slower) if slower else "none") + ".", ""]
    if r.get("tables"):
        lines += [f"### Each table with `python -m stages.table`: one device or N ({r['scale']} scale)", "",
                  f"Projected wall time of every stage of a table's variants on N devices like this one "
                  f"({r['device']}), one variant per device at a time in the table's order as `python -m "
                  "stages.table --devices ...` hands them out: the trainings, then the FID reference statistics "
                  "once per dataset, then each variant's sample, evaluate, fid and robustness "
                  "(`jem/bench/stage_times.py` `table_wall_time`). The data stages and the report, seconds "
                  "next to these, are not counted.", "",
                  "| table | runs (variants x seeds) | 1 device | 2 | 4 | 8 | one per run | longest variant |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for tab in r["tables"]:
            wall = tab["wall_s"]
            n = int(tab.get("runs", len(tab["rows"])))  # variants x seeds
            longest = max(tab["rows"], key=lambda v: v["total_s"])
            lines.append(f"| {tab['title']} (`{tab['name']}`) | {n} | {hms(wall['1'])} | {hms(wall['2'])} | "
                         f"{hms(wall['4'])} | {hms(wall['8'])} | {hms(wall[str(n)])} ({n} devices) | "
                         f"{longest['variant']}: {hms(longest['total_s'])} |")
        lines += ["", "Training iterations and the sampler's units (fresh chains, BPDA+EOT) are measured for every "
                  "variant; forwards, OOD passes, PGD and Inception once, on the first variant (the same "
                  "network). Each table's variants:", ""]
        for tab in r["tables"]:
            lines += [f"<details><summary>{tab['title']}: {len(tab['rows'])} variants, "
                      f"{hms(tab['total_s'])} one after another</summary>", "",
                      "| variant | train | sample + evaluate + fid + robustness | total |", "|---|---:|---:|---:|"]
            lines += [f"| {v['variant']} | {hms(v['train_s'])} | {hms(v['other_s'])} | {hms(v['total_s'])} |"
                      for v in tab["rows"]]
            lines += [f"| {t['stage']} (once) | | {hms(t['seconds'])} | {hms(t['seconds'])} |"
                      for t in tab["fid_ref"]]
            lines += [f"| **{len(tab['rows'])} variants, one {r['device']}** | | | **{hms(tab['total_s'])}** |",
                      "", "</details>", ""]
    return lines


def _fid_section(r: dict[str, Any], command: str) -> list[str]:
    return [
        "## FID and IS",
        "",
        f"Measured by `{command}` on **{r['device']}**: what the `fid` stage does for {r['images']:,} samples "
        f"(Inception fp32 at batch {r['batch']}, channels_last {r['channels_last']}; weights: {r['weights']}).",
        "",
        "| samples | Inception s | img/s | mean/cov + IS s | Frechet s | total s | projected 50k s | peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['images']} | {r['features_s']:.1f} | {r['images_per_s']:.0f} | {r['stats_is_s']:.2f} | "
        f"{r['frechet_s']:.2f} | {r['total_s']:.1f} | {r['projected_50k_s']:.0f} | {r['peak_memory_mb']:.0f} |",
        "",
        "Projected: the per-sample cost (Inception, covariance, IS) x 50,000 plus the matrix square "
        "root, which does not grow with the sample count.",
        "",
    ]


def _training_section(rows: list[dict[str, Any]], command: str) -> list[str]:
    first = rows[0]
    lines = [
        "## Training",
        "",
        f"Measured by `{command}` on **{first['device']}** (torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads), {first['steps_timed']} timed iterations after warm-up; "
        f"memory is {first['memory_kind']}.",
        "",
        "*reference*: the published scripts' iteration written plainly (`jem/method/reference.py`, the loop "
        "`tests/test_parity.py` matches ours against): fp32, eager, replay buffer in CPU memory mixed with "
        "a full batch of p0 draws, a first-layer forward and backward per PYLD inner step, SAM's perturb and "
        "restore parameter by parameter, `torch.optim` defaults. *baseline*: our trainer as the reference code "
        "runs: fp32, eager, contiguous layout, replay buffer and data in CPU memory, plain optimizer. "
        "*fast*: " + ", ".join(
            f"{k} {v}" for k, v in next(r for r in rows if r["mode"] == "fast")["perf"].items())
        + f" ({next(r for r in rows if r['mode'] == 'fast')['compiled']}).",
        "",
        "| variant | mode | model | batch / p(x) | sampler | SAM | ms/iter | IQR % | img/s | min/epoch* | TFLOP/s "
        "| peak MB |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mode']} | {r['model']} | {r['batch']}/{r['px_batch']} | {r['sampler']} | "
                     f"{r['sam']} | {r['ms_per_iter']:.1f} | {r['spread_pct']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['epoch_min_cifar10']:.2f} | "
                     f"{r['tflops']:.3f} | {r['peak_memory_mb']:.0f} |")
    lines += ["", "ms/iter: the median of the timed iterations; IQR %: their interquartile range over the median "
              "(how steady the machine was). \\* projected minutes per CIFAR-10 epoch: 50,000 images / labelled "
              "batch x ms/iter.", "",
              "Speed-ups (ratios of ms/iter): the fast paths over the reference loop and over our baseline, and "
              "our baseline's time relative to the reference loop's (1.00: the same speed):", "",
              "| variant | fast vs reference | fast vs baseline | baseline / reference |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | **{r['fast_vs_reference']:.2f}x** | {r['fast_vs_baseline']:.2f}x | "
              f"{r['baseline_vs_reference']:.3f} |" for r in _ratios(rows)]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file with the method blocks")
    ap.add_argument("--variant", action="append", help=f"method name (repeatable); default {DEFAULT_VARIANTS}")
    ap.add_argument("--scale", choices=("tiny", "demo", "paper"),
                    help="default: paper on CUDA, demo on CPU; with --startup: tiny")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--depth", type=int, help="WRN depth (overrides the scale's)")
    ap.add_argument("--width", type=int, help="WRN width (overrides the scale's)")
    ap.add_argument("--batch", type=int, help="labelled batch size (the p(x) batch keeps its ratio)")
    ap.add_argument("--steps", type=int, default=10, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--compare", action="store_true",
                    help="the reference scripts' loop, our baseline and the fast paths side by side")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile in the fast mode: on, or auto/off = as run.perf: auto (off)")
    ap.add_argument("--perf", action="append", metavar="KEY=VALUE",
                    help="set a run.perf switch of the fast mode (repeatable), e.g. grouped_passes=true")
    ap.add_argument("--report", type=Path, help="write the side-by-side table as Markdown (with --compare)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--fid", type=int, metavar="N", help="also time IS/FID of N samples (the fid stage's work)")
    ap.add_argument("--fid-batch", type=int, default=500, help="Inception batch size for --fid")
    ap.add_argument("--inception-weights", help="pytorch-fid weights for --fid (default: random, timing only)")
    ap.add_argument("--skip-train", action="store_true", help="only the --fid timing")
    ap.add_argument("--stages", action="store_true",
                    help="project every stage's wall time for the first --variant (default sadajem_k5)")
    ap.add_argument("--table", default="sadajem_table1",
                    help="with --stages: also project this table on 1 and N devices (a name under `tables` in "
                    "params.yaml or in --published; 'all': every table in params.yaml; 'none': skip)")
    ap.add_argument("--published", type=Path, default=Path("reports/published.yaml"), help="for --table")
    ap.add_argument("--startup", action="store_true",
                    help="each stage's start-up (imports, process start to its first line of work) from a dvc repro "
                    "at --scale (tiny or demo) in a scratch copy of this checkout")
    ap.add_argument("--timing-log", type=Path,
                    help="with --startup: tabulate this JEM_TIMING_LOG of a run you made instead")
    ap.add_argument("--keep", type=Path, help="with --startup: build the scratch copy here and keep it")
    args = ap.parse_args(argv)

    if args.startup or args.timing_log:
        from jem.bench.startup import run

        scale = args.scale or "tiny"
        if scale == "paper":
            print("error: --startup runs a whole dvc repro; use --scale tiny or demo (the paper scale trains for "
                  "days)", file=sys.stderr)
            return 2
        if args.timing_log is not None and not args.timing_log.is_file():
            print(f"error: --timing-log {args.timing_log}: no such file (JEM_TIMING_LOG=<file> dvc repro writes it)",
                  file=sys.stderr)
            return 2
        try:
            return run(scale, args.timing_log, Path.cwd(), args.keep)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.scale == "tiny":
        print("error: --scale tiny is for --startup; the training benchmark runs at demo or paper", file=sys.stderr)
        return 2

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    if args.report and not (args.compare or args.skip_train):
        print("error: --report writes the side-by-side table; add --compare", file=sys.stderr)
        return 2
    if args.skip_train and not (args.fid or args.stages):
        print("error: --skip-train leaves nothing to time; add --fid N or --stages", file=sys.stderr)
        return 2
    if args.fid is not None and args.fid < 2:
        print(f"error: --fid {args.fid}: need at least 2 samples for a covariance", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale or ("paper" if device.type == "cuda" else "demo")
    try:
        params = yaml.safe_load(Path(args.params).read_text())
    except OSError as exc:
        print(f"error: cannot read --params {args.params}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        fast = fast_perf(device, args.compile, args.perf)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    for name in [] if args.skip_train else args.variant or DEFAULT_VARIANTS:
        try:
            variant = _variant(params, name, scale, args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        modes = ([("reference", baseline_perf()), ("baseline", baseline_perf()), ("fast", fast)] if args.compare
                 else [("auto" if fast == fast_perf(device) else "fast", fast)])
        for label, perf in modes:
            how = "the reference scripts' loop (jem.method.reference)" if label == "reference" else \
                f"run.perf: {_describe(perf)}"
            print(f"[bench] {name} ({label}): WRN-{variant.model.depth}-{variant.model.width}, batch "
                  f"{variant.train.batch_size}/{variant.train.px_batch_size} on {device}; {how} ...", flush=True)
            rows.append(benchmark(variant, device, args.steps, args.warmup, perf=perf, label=label,
                                  reference=label == "reference"))
    if rows:
        print(f"\ndevice: {rows[0]['device']}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
              f"scale {scale}  memory: {rows[0]['memory_kind']}")
        print(_format(rows))
        for r in _ratios(rows):
            print(f"{r['variant']}: fast {r['fast_vs_reference']:.2f}x the reference loop's speed, "
                  f"{r['fast_vs_baseline']:.2f}x the baseline's; baseline / reference time "
                  f"{r['baseline_vs_reference']:.3f}")
    fid = None
    if args.fid:
        print(f"[bench] FID of {args.fid} samples on {device} ...", flush=True)
        try:
            fid = benchmark_fid(device, args.fid, args.fid_batch, channels_last=device.type == "cuda",
                                weights=args.inception_weights)
        except InceptionUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(_format_fid(fid))
    stages = None
    if args.stages:
        try:
            stages = _stage_times(params, scale, device, args, fast, fid, rows)
        except (ConfigError, InceptionUnavailable, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        args.json.write_text(json.dumps({"training": rows, "fid": fid, "stages": stages} if fid or stages else rows,
                                        indent=2))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        command = "jem-bench " + " ".join(argv if argv is not None else sys.argv[1:])
        args.report.write_text(markdown_report(rows, command, fid, stages))
        print(f"wrote {args.report}")
    return 0


def _variant(params: dict[str, Any], name: str, scale: str, args: argparse.Namespace) -> Variant:
    """``name`` at ``scale`` with the command line's --depth, --width and --batch."""
    d = resolve_variant(params, name, scale).to_dict()
    if args.depth:
        d["model"]["depth"] = args.depth
    if args.width:
        d["model"]["width"] = args.width
    if args.batch:
        ratio = d["train"]["px_batch_size"] / d["train"]["batch_size"]
        d["train"]["batch_size"] = args.batch
        d["train"]["px_batch_size"] = max(1, round(args.batch * ratio))
    return Variant.from_dict(d, where=f"methods.{name}")


def _tables(params: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """``--table``: (key, title, variants) of one table, of every table (``all``), or none. The
    variants come from ``tables`` in params.yaml (what ``python -m stages.table`` trains), else from
    the rows of ``--published``; the titles from ``--published``."""
    if args.table == "none":
        return []
    published = yaml.safe_load(args.published.read_text()) or {}
    defined = params.get("tables") or {}
    keys = list(defined) if args.table == "all" else [args.table]
    out = []
    for key in keys:
        if key in defined:
            members = [str(v) for v in defined[key]]
        else:
            members = [str(r["variant"]) for r in lookup(published, key, str(args.published)).get("rows", [])]
        title = (published.get(key) or {}).get("title") or f"{key} (params.yaml tables)"
        out.append((key, str(title), members))
    return out


def _stage_times(params: dict[str, Any], scale: str, device: torch.device, args: argparse.Namespace,
                 perf: PerfConfig, fid: dict[str, Any] | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``--stages``: units measured on the device with ``perf`` (the fast mode), projected to the
    scale's stage counts. A variant already timed in ``rows`` with the same ``run.perf``
    (--compare's fast row) is not timed again."""
    from jem.bench.stage_times import (
        measure_units,
        reference_time,
        split_sizes,
        stage_times,
        table_wall_time,
        total_seconds,
    )
    from jem.config.params import selected_seeds
    from jem.config.settings import stage_section

    sections = {s: stage_section(params, s, scale) for s in ("sample", "evaluate", "fid", "robustness")}
    sizes = {role: split_sizes(lookup(spec, scale, f"datasets.{role}")) for role, spec in params["datasets"].items()}
    detail = (args.variant or ["sadajem_k5"])[0]
    tables = _tables(params, args)
    names = [detail] + [v for _, _, vs in tables for v in vs]
    names = list(dict.fromkeys(names))
    timed = {r["variant"]: r for r in rows if r["mode"] != "reference" and r["perf"] == dataclasses.asdict(perf)}
    inception = fid or benchmark_fid(device, 2000 if device.type == "cuda" else 64, args.fid_batch,
                                     channels_last=device.type == "cuda", weights=args.inception_weights)
    shared: dict[str, float] | None = None
    per_variant = {}
    for name in names:
        variant = _variant(params, name, scale, args)
        print(f"[bench] stage units of {name} on {device} ...", flush=True)
        train = timed.get(name) or benchmark(variant, device, args.steps, args.warmup, perf=perf, label="auto")
        units = measure_units(variant, sections, device, train["ms_per_iter"] / 1e3, inception, shared,
                              channels_last=perf.channels_last)
        shared = shared or units
        per_variant[name] = (variant, units, stage_times(variant, sections, sizes, units))
    variant, units, times = per_variant[detail]
    train_s = next(t.seconds for t in times if t.stage == "train")
    out: dict[str, Any] = {
        "variant": detail, "scale": scale, "device": _device_name(device), "perf": _describe(perf),
        "units": units, "stages": [dataclasses.asdict(t) for t in times], "train_s": train_s,
        "total_s": total_seconds(times), "tables": [],
    }

    def row(name: str) -> dict[str, Any]:
        ts = per_variant[name][2]
        t_train = next(t.seconds for t in ts if t.stage == "train")
        return {"variant": name, "train_s": t_train, "other_s": total_seconds(ts) - t_train,
                "total_s": total_seconds(ts)}

    for key, title, members in tables:
        rows_ = [row(v) for v in members]
        roles = sorted({per_variant[v][0].dataset for v in members})
        refs = [reference_time(sizes[role], sections["fid"], role, units) for role in roles]
        n_seeds = len(selected_seeds(params))  # every variant runs once per seed: a run is one schedule item
        counts = sorted({1, 2, 4, 8, len(members) * n_seeds})
        wall = {n: table_wall_time([r["train_s"] for r in rows_ for _ in range(n_seeds)],
                                   [r["other_s"] for r in rows_ for _ in range(n_seeds)],
                                   [t.seconds for t in refs], n) for n in counts}
        out["tables"].append({"name": key, "title": title, "rows": rows_, "runs": len(members) * n_seeds,
                              "fid_ref": [dataclasses.asdict(t) for t in refs],
                              "total_s": sum(r["total_s"] for r in rows_) + sum(t.seconds for t in refs),
                              "wall_s": {str(n): w for n, w in wall.items()}})
    print(f"[bench] stages of {detail} at the {scale} scale: " + ", ".join(
        f"{t.stage} {t.seconds:.0f} s" for t in times), flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
