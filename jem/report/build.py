"""The report written whole into one folder: its inputs read and checked first (``read_inputs``,
before the stage starts its run), then every table, figure and ``README.md`` with all of them
(``write_report``), in the order README.md shows them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from jem.config.errors import InputError
from jem.report.claims import Claim, claim_values, evaluate_all, load_claims
from jem.report.figure_set import figures
from jem.report.plot_data import write_variant_tables
from jem.report.published import build_table
from jem.report.render import render
from jem.report.runs import OOD_KEYS, ReadMetrics, Runs
from jem.report.tables import robustness_table, stability_table, summary_table

# under the summary table in README.md, and the stability table's header after where its numbers come from
BN_NOTE = ("*test acc %, BN re-estimated*: the same weights with the batch-norm running statistics averaged over "
           "the training split, each batch augmented and noised as training's labelled batches; it matches *test "
           "acc %* when the running statistics describe labelled data (the labelled forward runs last in each "
           "iteration, as in the reference scripts).")
STABILITY = ("a divergence is a non-finite loss, exploding energies or saturated samples (`recovery` in params.yaml). "
             "With recovery on, the run rolls back and is remedied, and each event counts; with "
             "`recovery.enabled: false` it stops at the first and is marked diverged, as the papers measured "
             "stability.")


@dataclass
class Inputs:
    """What the report is built from, read and checked before anything is written."""

    scale: str
    runs: Runs
    fid_set: str
    ood_sets: list[str]
    published: dict[str, Any]  # the papers' tables, by name
    published_path: Path
    claims: list[Claim]
    claims_path: Path | None

    @property
    def where(self) -> str:
        """Where our numbers come from, as the tables' headers name it."""
        return f"`metrics/{self.scale}/<stage>/<variant>/seed<seed>.json`"


def read_inputs(settings: dict[str, Any], metrics: Path, published: Path, claims: Path | None,
                read: ReadMetrics) -> Inputs:
    """The report's settings (scale, variants, seeds, methods, fid_set, ood_sets), the papers' tables and
    claims, and every run's metrics (``read`` joins a metrics file and its notes). Raises InputError when a
    run's train or evaluate metrics are missing or a published row names a variant ``methods`` lacks."""
    methods = set(settings["methods"])
    tables = yaml.safe_load(published.read_text())
    checked = load_claims(claims, methods) if claims else []
    runs = Runs(metrics, list(settings["variants"]), [int(s) for s in settings["seeds"]], read=read)
    runs.check_complete()
    unknown = sorted({r["variant"] for t in tables.values() for r in t["rows"]} - methods)
    if unknown:
        raise InputError(f"{published}: rows name variants not in params.yaml methods: {', '.join(unknown)}")
    return Inputs(str(settings["scale"]), runs, str(settings["fid_set"]), list(settings["ood_sets"]), tables,
                  published, checked, claims)


def write_report(out: Path, inputs: Inputs, plots: Path, samples: Path, commit: str) -> str:
    """Every table (CSV, LaTeX, Markdown), the figures (``figures/``), the data series for ``dvc plots``
    (``plots/``) and ``README.md`` with all of them, into ``out``; returns what was written, in one line."""
    runs = inputs.runs
    header = _header(inputs, commit)
    parts = [_summary(inputs, header, out), "## Stability\n",
             render("stability", "Stability: divergence per variant over its seeds", stability_table(runs), out,
                    f"From the train stage ({inputs.where}): {STABILITY}", 2)]
    if inputs.claims:
        parts += _claims(inputs, out)
    parts += _papers_tables(inputs, header, out)
    rob_header = (f"Accuracy % under attack, from `metrics/{inputs.scale}/robustness/<variant>/seed<seed>.json` "
                  "(stage robustness), mean over seeds. L-inf radii in 1/255, L2 radii on [0, 1] images. "
                  "*paper*: SADA-JEM reports robustness as a figure (Fig. 5), with no numbers to compare against.")
    parts.append("## Robustness\n")
    parts.append(render("robustness", "Robustness: accuracy (%) under PGD and BPDA+EOT", robustness_table(runs),
                        out, rob_header, 1))
    parts += _figures(inputs, plots, samples, out)
    (out / "README.md").write_text("\n".join(parts))
    n_figs = len(list((out / "figures").glob("*.png")))
    return (f"{len(inputs.published) + 3 + bool(inputs.claims)} tables, {n_figs} figures for {len(runs.variants)} "
            f"variants x {len(runs.seeds)} seeds")


def _header(inputs: Inputs, commit: str) -> str:
    """What every table's file says first: the scale, commit and seeds, where ours and the paper's come from."""
    scale, seeds = inputs.scale, inputs.runs.seeds
    return (f"Scale **{scale}** (commit {commit}), seeds {', '.join(map(str, seeds))}. *ours*: accuracy, ECE and "
            f"OOD from the evaluate stage, IS/FID ({inputs.fid_set} samples, under the protocol each row names) from "
            f"the fid stage, run time from the train stage, each in {inputs.where}, all written by `dvc repro`"
            + (f"; mean ± std (n) over the {len(seeds)} seeds (sample std), each seed's value in the CSV"
               if len(seeds) > 1 else "") + f"; *paper*: `{inputs.published_path}`."
            + (f" The {scale} scale uses procedural stand-in data and a WRN-10-1 trained for minutes: "
               "it shows the pipeline works, not the papers' numbers." if scale != "paper" else ""))


def _summary(inputs: Inputs, header: str, out: Path) -> str:
    """``summary.csv`` and ``.tex``; returns README.md's opening: its header and the summary table."""
    summary, shown = summary_table(inputs.runs, inputs.runs.variants)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.tex").write_text(shown.to_latex(index=False, caption="All variants"))
    return (f"# Results ({inputs.scale} scale)\n\n{header}\n\n## All variants that ran\n\n"
            f"{shown.to_markdown(index=False, disable_numparse=True)}\n\n{BN_NOTE}\n")


def _claims(inputs: Inputs, out: Path) -> list[str]:
    """``claims.csv`` (every claim) and ``claims_shown`` (those whose variants ran); returns their section."""
    rows = evaluate_all(inputs.claims, claim_values(inputs.runs, inputs.fid_set), set(inputs.runs.variants))
    table = pd.DataFrame.from_records(rows)
    table.to_csv(out / "claims.csv", index=False)
    ran = table[table["status"] != "not run"]
    shown = ran[["claim", "source", "status", "ours a", "ours b", "seeds holding"]]
    counts = Counter(table["status"])
    header = (f"The papers' comparative claims (`{inputs.claims_path}`) checked on these runs: the first named (*a*) "
              "is claimed better than the second (*b*); *holds* when the mean over seeds of *a* is better, *seeds "
              "holding* counts the seeds where it is; claims.csv adds each side's variant and metric and why. "
              + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".")
    after = (f"{counts.get('not run', 0)} more claims name variants that did not run; all are in claims.csv."
             if counts.get("not run") else "")
    if inputs.scale != "paper":
        after += (f" At the {inputs.scale} scale a claim is checked on stand-in data and minutes of training: "
                  "what holds here need not hold on CIFAR, and the reverse.")
    md = render("claims_shown", "The papers' claims on these runs", shown, out, header, 3, shown=shown,
                after=after.strip())
    (out / "claims_shown.csv").unlink()
    return ["## The papers' claims\n", md]


def _papers_tables(inputs: Inputs, header: str, out: Path) -> list[str]:
    """Each table of ``published.yaml`` beside ours; below the demo and tiny scales' tables, why there is no
    difference column (said once above the tables in README.md, and in each table's own file)."""
    scale = inputs.scale
    no_diff = (f"No difference column: at the {scale} scale ours are measured on procedural stand-in data with a "
               "WRN-10-1 trained for minutes and the paper's on CIFAR with a WRN-28-10 trained for hours, so a "
               "difference would mean nothing; the published numbers stand beside ours as a reference.")
    parts = ["## The papers' tables\n"]
    if scale != "paper":
        parts.append(no_diff + "\n")
    for name, spec in inputs.published.items():
        digits = 3 if set(spec["columns"]) <= set(OOD_KEYS) else 2
        built = build_table(spec, inputs.runs, inputs.fid_set, scale, digits)
        parts.append(render(name, spec["title"], built.data, out, header, digits, shown=built.shown,
                            footnotes=built.notes))
        if scale != "paper":
            md = out / f"{name}.md"
            md.write_text(md.read_text() + f"\n{no_diff}\n")
    return parts


def _figures(inputs: Inputs, plots: Path, samples: Path, out: Path) -> list[str]:
    """``figures/`` and the data series for ``dvc plots`` (``plots/``); returns README.md's list of them and
    the inputs that were missing."""
    runs = inputs.runs
    missing = figures(runs, plots, samples, out / "figures")
    missing += write_variant_tables(plots, runs.variants, out / "plots", inputs.ood_sets, f"seed{runs.seeds[0]}")
    listed = "\n".join(f"- [{p.name}](figures/{p.name})" for p in sorted((out / "figures").glob("*.png")))
    parts = [f"## Figures\n\nEach variant's seed {runs.seeds[0]}.\n\n{listed}\n"]
    if missing:
        parts.append("Missing inputs (not drawn): " + ", ".join(f"`{m}`" for m in missing) + "\n")
    return parts
