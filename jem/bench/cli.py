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
model and the labelled batch (the p(x) batch keeps its ratio to it). What is timed and how (procedural
data, whole iterations after warm-up, the median and the interquartile range) is ``jem.bench.speed``;
the console table and ``--report``'s Markdown are ``jem.bench.markdown``.

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
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from jem.bench.markdown import format_fid, format_rows, markdown_report, ratios
from jem.bench.speed import baseline_perf, benchmark, benchmark_fid, device_name, fast_perf
from jem.config.errors import ConfigError
from jem.config.params import lookup, resolve_variant
from jem.config.variant import PerfConfig, Variant, _describe
from jem.evaluation.inception import InceptionUnavailable

DEFAULT_VARIANTS = ("jem_k20", "jempp_m10", "sadajem_k5")


class _Stop(Exception):
    """A one-line error of a timing run: ``main`` prints it and returns 2."""


def build_parser() -> argparse.ArgumentParser:
    """``jem-bench``'s command line (``--help``: this module's docstring's first line)."""
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
    ap.add_argument("--image-size", type=int, help="side of the procedural square images (overrides the scale's; "
                    "scripts/gpu_check.sh's CPU rehearsal: 16)")
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
    return ap


def main(argv: list[str] | None = None) -> int:
    """``jem-bench``: the exit status, 2 after a one-line error."""
    args = build_parser().parse_args(argv)
    if args.startup or args.timing_log:
        return _startup(args)
    try:
        device, scale, params, fast = _setup(args)
        rows = _training(args, params, scale, device, fast)
        fid = _fid(args, device)
        stages = _stages(args, params, scale, device, fast, fid, rows)
    except _Stop as exc:
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


def _startup(args: argparse.Namespace) -> int:
    """``--startup``: each stage's start-up, from a scratch ``dvc repro`` or ``--timing-log``."""
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


def _setup(args: argparse.Namespace) -> tuple[torch.device, str, dict[str, Any], PerfConfig]:
    """A timing run's device, scale, params and the fast mode's ``run.perf``, the command line checked."""
    if args.scale == "tiny":
        raise _Stop("--scale tiny is for --startup; the training benchmark runs at demo or paper")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Stop("--device cuda but no CUDA device is visible; use --device cpu")
    if args.report and not (args.compare or args.skip_train):
        raise _Stop("--report writes the side-by-side table; add --compare")
    if args.skip_train and not (args.fid or args.stages):
        raise _Stop("--skip-train leaves nothing to time; add --fid N or --stages")
    if args.fid is not None and args.fid < 2:
        raise _Stop(f"--fid {args.fid}: need at least 2 samples for a covariance")
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale or ("paper" if device.type == "cuda" else "demo")
    try:
        params = yaml.safe_load(Path(args.params).read_text())
    except OSError as exc:
        raise _Stop(f"cannot read --params {args.params}: {exc.strerror}") from None
    try:
        fast = fast_perf(device, args.compile, args.perf)
    except ConfigError as exc:
        raise _Stop(str(exc)) from None
    return device, scale, params, fast


def _training(args: argparse.Namespace, params: dict[str, Any], scale: str, device: torch.device,
              fast: PerfConfig) -> list[dict[str, Any]]:
    """Each ``--variant``'s training iterations (with ``--compare``: in the three modes); the rows,
    printed as a table with the speed-ups."""
    rows = []
    for name in [] if args.skip_train else args.variant or DEFAULT_VARIANTS:
        try:
            variant = _variant(params, name, scale, args)
        except ConfigError as exc:
            raise _Stop(str(exc)) from None
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
        print(format_rows(rows))
        for r in ratios(rows):
            print(f"{r['variant']}: fast {r['fast_vs_reference']:.2f}x the reference loop's speed, "
                  f"{r['fast_vs_baseline']:.2f}x the baseline's; baseline / reference time "
                  f"{r['baseline_vs_reference']:.3f}")
    return rows


def _fid(args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """``--fid N``: the FID stage's work for N samples, printed in one line."""
    if not args.fid:
        return None
    print(f"[bench] FID of {args.fid} samples on {device} ...", flush=True)
    try:
        fid = benchmark_fid(device, args.fid, args.fid_batch, channels_last=device.type == "cuda",
                            weights=args.inception_weights)
    except InceptionUnavailable as exc:
        raise _Stop(str(exc)) from None
    print(format_fid(fid))
    return fid


def _stages(args: argparse.Namespace, params: dict[str, Any], scale: str, device: torch.device, fast: PerfConfig,
            fid: dict[str, Any] | None, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``--stages``: every stage's projected wall time (``_stage_times``)."""
    if not args.stages:
        return None
    try:
        return _stage_times(params, scale, device, args, fast, fid, rows)
    except (ConfigError, InceptionUnavailable, OSError) as exc:
        raise _Stop(str(exc)) from None


def _variant(params: dict[str, Any], name: str, scale: str, args: argparse.Namespace) -> Variant:
    """``name`` at ``scale`` with the command line's --depth, --width, --image-size and --batch."""
    d = resolve_variant(params, name, scale).to_dict()
    if args.depth:
        d["model"]["depth"] = args.depth
    if args.width:
        d["model"]["width"] = args.width
    if args.image_size:
        d["model"]["image_size"] = args.image_size
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
        "variant": detail, "scale": scale, "device": device_name(device), "perf": _describe(perf),
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
