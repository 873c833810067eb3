"""What ``jem-bench`` prints and writes: the console table of the timed rows, the FID line, the
speed-up ratios and ``reports/performance.md`` (training, FID and stage-time sections)."""

from __future__ import annotations

from typing import Any

import torch
from tabulate import tabulate

GPU_COMMAND = "jem-bench --device cuda --compare --fid 50000 --stages --report reports/performance.md"


def format_fid(r: dict[str, Any]) -> str:
    """``--fid``'s console line."""
    return (f"FID of {r['images']} samples on {r['device']} (batch {r['batch']}, channels_last "
            f"{r['channels_last']}, weights {r['weights']}): Inception {r['features_s']:.1f} s "
            f"({r['images_per_s']:.0f} img/s), mean/cov + IS {r['stats_is_s']:.2f} s, Frechet distance "
            f"{r['frechet_s']:.2f} s; total {r['total_s']:.1f} s; projected for 50,000 samples "
            f"{r['projected_50k_s']:.0f} s; peak {r['peak_memory_mb']:.0f} MB ({r['memory_kind']})")


TRAINING_COLUMNS = ("variant", "mode", "model", "batch / p(x)", "sampler", "SAM", "ms/iter", "IQR %", "img/s",
                    "min/epoch*", "TFLOP/s", "peak MB")


def _training_cells(r: dict[str, Any]) -> list[str]:
    return [r["variant"], r["mode"], r["model"], f"{r['batch']}/{r['px_batch']}", r["sampler"], r["sam"],
            f"{r['ms_per_iter']:.1f}", f"{r['spread_pct']:.1f}", f"{r['images_per_s']:.1f}",
            f"{r['epoch_min_cifar10']:.2f}", f"{r['tflops']:.3f}", f"{r['peak_memory_mb']:.0f}"]


def _table(head: tuple[str, ...], rows: list[list[Any]], align: str) -> list[str]:
    """A Markdown table in tabulate's pipe format (as the report's tables), ``align`` one letter per
    column (``l``, ``r``), and the blank line after it."""
    colalign = [{"l": "left", "r": "right"}[a] for a in align]
    return [tabulate(rows, head, tablefmt="pipe", colalign=colalign, disable_numparse=True), ""]


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The timed rows as the console's table."""
    return (tabulate([_training_cells(r) for r in rows], TRAINING_COLUMNS, stralign="right", disable_numparse=True)
            + "\nms/iter: median of the timed iterations; IQR %: interquartile range / median; "
            "* projected minutes per CIFAR-10 epoch (50,000 images / labelled batch x ms/iter)")


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    ]
    lines += _table(("stage", "work", "projected wall time"),
                    [[t["stage"], t["work"], hms(t["seconds"])] for t in r["stages"]]
                    + [[f"**all stages of {r['variant']}**", "", f"**{hms(r['total_s'])}**"]], "llr")
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
                  "next to these, are not counted.", ""]
        cells = []
        for tab in r["tables"]:
            wall, n = tab["wall_s"], int(tab.get("runs", len(tab["rows"])))  # n: variants x seeds
            longest = max(tab["rows"], key=lambda v: v["total_s"])
            cells.append([f"{tab['title']} (`{tab['name']}`)", n, *(hms(wall[k]) for k in ("1", "2", "4", "8")),
                          f"{hms(wall[str(n)])} ({n} devices)", f"{longest['variant']}: {hms(longest['total_s'])}"])
        lines += _table(("table", "runs (variants x seeds)", "1 device", "2", "4", "8", "one per run",
                         "longest variant"), cells, "lrrrrrrl")
        lines += ["Training iterations and the sampler's units (fresh chains, BPDA+EOT) are measured for every "
                  "variant; forwards, OOD passes, PGD and Inception once, on the first variant (the same "
                  "network). Each table's variants:", ""]
        for tab in r["tables"]:
            lines += [f"<details><summary>{tab['title']}: {len(tab['rows'])} variants, "
                      f"{hms(tab['total_s'])} one after another</summary>", ""]
            lines += _table(
                ("variant", "train", "sample + evaluate + fid + robustness", "total"),
                [[v["variant"], hms(v["train_s"]), hms(v["other_s"]), hms(v["total_s"])] for v in tab["rows"]]
                + [[f"{t['stage']} (once)", "", hms(t["seconds"]), hms(t["seconds"])] for t in tab["fid_ref"]]
                + [[f"**{len(tab['rows'])} variants, one {r['device']}**", "", "", f"**{hms(tab['total_s'])}**"]],
                "lrrr")
            lines += ["</details>", ""]
    return lines


def _fid_section(r: dict[str, Any], command: str) -> list[str]:
    return [
        "## FID and IS",
        "",
        f"Measured by `{command}` on **{r['device']}**: what the `fid` stage does for {r['images']:,} samples "
        f"(Inception fp32 at batch {r['batch']}, channels_last {r['channels_last']}; weights: {r['weights']}).",
        "",
        *_table(("samples", "Inception s", "img/s", "mean/cov + IS s", "Frechet s", "total s", "projected 50k s",
                 "peak MB"),
                [[r["images"], f"{r['features_s']:.1f}", f"{r['images_per_s']:.0f}", f"{r['stats_is_s']:.2f}",
                  f"{r['frechet_s']:.2f}", f"{r['total_s']:.1f}", f"{r['projected_50k_s']:.0f}",
                  f"{r['peak_memory_mb']:.0f}"]], "rrrrrrrr"),
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
    ]
    lines += _table(TRAINING_COLUMNS, [_training_cells(r) for r in rows], "llllllrrrrrr")
    lines += ["ms/iter: the median of the timed iterations; IQR %: their interquartile range over the median "
              "(how steady the machine was). \\* projected minutes per CIFAR-10 epoch: 50,000 images / labelled "
              "batch x ms/iter. TFLOP/s: the FLOPs of one iteration (matrix products and convolutions, forward "
              "and backward, every sampler step and SAM pass, counted by torch's `FlopCounterMode`) over ms/iter.",
              "", "Speed-ups (ratios of ms/iter): the fast paths over the reference loop and over our baseline, and "
              "our baseline's time relative to the reference loop's (1.00: the same speed):", ""]
    lines += _table(("variant", "fast vs reference", "fast vs baseline", "baseline / reference"),
                    [[r["variant"], f"**{r['fast_vs_reference']:.2f}x**", f"{r['fast_vs_baseline']:.2f}x",
                      f"{r['baseline_vs_reference']:.3f}"] for r in ratios(rows)], "lrrr")
    return lines
