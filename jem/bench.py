"""Training-speed benchmark: images/s, ms per iteration, peak memory and achieved FLOP rate.

    jem-bench                                   # jem_k20, jempp_m10, sadajem_k5
    jem-bench --variant sadajem_k5 --device cuda --depth 28 --width 10 --batch 64
    jem-bench --json bench.json                 # also write the figures as JSON

Variants come from ``params.yaml`` (``--params``) at the chosen scale (``--scale``: ``paper``
on CUDA, ``demo`` on CPU unless given); ``--depth``, ``--width`` and ``--batch`` override the
model and both batch sizes. Data are procedural 32x32 images (``jem.synthetic``), and
the mixture for informative initialisation is fitted to them, so the benchmark needs no
download. Timing covers whole training iterations (sampler, both SAM passes, optimizer
step) after warm-up iterations, with the device synchronised around the timed block.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from jem.config import ConfigError, Variant
from jem.gmm import compute_mixture_stats
from jem.models import count_flops
from jem.params import resolve_variant
from jem.synthetic import make_shapes
from jem.train import Trainer

DEFAULT_VARIANTS = ("jem_k20", "jempp_m10", "sadajem_k5")
CIFAR10_TRAIN = 50_000


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


def benchmark(variant: Variant, device: torch.device, steps: int, warmup: int,
              n_images: int = 2048) -> dict[str, Any]:
    classes = variant.model.num_classes
    x, y = make_shapes(n_images, variant.model.image_size, num_classes=min(classes, 10), seed=0)
    if classes > 10:
        y = torch.arange(n_images) % classes
    mixture = compute_mixture_stats([(x[i:i + 512], y[i:i + 512]) for i in range(0, n_images, 512)],
                                    classes) if variant.buffer.init == "gmm" else None
    trainer = Trainer(variant, x, y, mixture=mixture, device=device)
    for _ in range(warmup):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    flops = iteration_flops(variant, count_flops(trainer.model))
    batch = variant.train.batch_size
    return {
        "variant": variant.name,
        "family": variant.family,
        "device": _device_name(device),
        "model": f"WRN-{variant.model.depth}-{variant.model.width}",
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "batch": batch,
        "px_batch": variant.train.px_batch_size,
        "sampler": (f"{variant.sampler.kind} K={variant.sampler.steps}" if variant.sampler.kind == "sgld"
                    else f"pyld M={variant.sampler.steps} N={variant.sampler.inner_steps}")
        if variant.uses_sampler else "none",
        "sam": variant.optim.sam,
        "ms_per_iter": seconds * 1e3,
        "images_per_s": batch / seconds,
        "epoch_min_cifar10": CIFAR10_TRAIN // batch * seconds / 60,
        "tflops": flops / seconds / 1e12,
        "peak_memory_mb": _peak_memory_mb(device),
        "memory_kind": "CUDA max allocated" if device.type == "cuda" else "process peak RSS",
        "steps_timed": steps,
    }


def _format(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "model", "batch", "sampler", "sam", "ms/iter", "img/s", "min/epoch*", "TFLOP/s", "peak MB")
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for r in rows:
        cells = (r["variant"], r["model"], f"{r['batch']}/{r['px_batch']}", r["sampler"], r["sam"],
                 f"{r['ms_per_iter']:.1f}", f"{r['images_per_s']:.1f}", f"{r['epoch_min_cifar10']:.2f}",
                 f"{r['tflops']:.3f}", f"{r['peak_memory_mb']:.0f}")
        lines.append("  ".join(f"{c:>12}" for c in cells))
    lines.append("* projected minutes per CIFAR-10 epoch (50,000 images / labelled batch x ms/iter)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file with the method blocks")
    ap.add_argument("--variant", action="append", help=f"method name (repeatable); default {DEFAULT_VARIANTS}")
    ap.add_argument("--scale", choices=("demo", "paper"), help="default: paper on CUDA, demo on CPU")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--depth", type=int, help="WRN depth (overrides the scale's)")
    ap.add_argument("--width", type=int, help="WRN width (overrides the scale's)")
    ap.add_argument("--batch", type=int, help="labelled and p(x) batch size (overrides the variant's)")
    ap.add_argument("--steps", type=int, default=10, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale or ("paper" if device.type == "cuda" else "demo")
    try:
        params = yaml.safe_load(Path(args.params).read_text())
    except OSError as exc:
        print(f"error: cannot read --params {args.params}: {exc.strerror}", file=sys.stderr)
        return 2
    rows = []
    for name in args.variant or DEFAULT_VARIANTS:
        try:
            d = resolve_variant(params, name, scale).to_dict()
            if args.depth:
                d["model"]["depth"] = args.depth
            if args.width:
                d["model"]["width"] = args.width
            if args.batch:
                d["train"]["batch_size"] = d["train"]["px_batch_size"] = args.batch
            variant = Variant.from_dict(d, where=f"methods.{name}")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"[bench] {name}: {variant.model.depth}-{variant.model.width}, batch "
              f"{variant.train.batch_size}/{variant.train.px_batch_size} on {device} ...", flush=True)
        rows.append(benchmark(variant, device, args.steps, args.warmup))
    print(f"\ndevice: {rows[0]['device']}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"scale {scale}  memory: {rows[0]['memory_kind']}")
    print(_format(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
