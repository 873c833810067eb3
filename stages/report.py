"""DVC stage `report`: the papers' tables and figures regenerated from this scale's runs.

    python -m stages.report --metrics metrics/demo --plots plots/demo --samples samples/demo \
        --published reports/published.yaml --claims reports/claims.yaml --out reports/demo

Reads every run's metrics (``variants`` x ``seeds``; a run's train and evaluate metrics must exist), the
papers' tables (``--published``) and claims (``--claims``), and writes the report into ``--out`` whole
(the folder is swapped in only when complete): each table as Markdown, CSV and LaTeX, ``README.md`` with
all of them, ``figures/`` and the data series for ``dvc plots`` (``plots/``), all logged to MLflow.
What is in it and where each number comes from: ``jem.report``.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from jem.config.instances import instance_settings
from jem.report.build import read_inputs, write_report
from pipeline.common import load_params, main_guard
from pipeline.declared import check_settings
from pipeline.outputs import building, read_metrics
from pipeline.tracking import mlflow_run


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", type=Path, required=True, help="metrics folder of this scale")
    ap.add_argument("--plots", type=Path, required=True, help="plots folder of this scale")
    ap.add_argument("--samples", type=Path, required=True, help="samples folder of this scale")
    ap.add_argument("--published", type=Path, required=True)
    ap.add_argument("--claims", type=Path, help="the papers' claims to check (reports/claims.yaml)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    args = ap.parse_args()

    params = load_params()
    cfg = check_settings(args.config, instance_settings(params, "report"))
    inputs = read_inputs(cfg, args.metrics, args.published, args.claims, read_metrics)
    commit = _commit()
    with mlflow_run("report", params, {}) as run:
        with building(args.out) as tmp:
            written = write_report(tmp, inputs, args.plots, args.samples, commit)
        run.log_artifact(args.out, "reports")
        print(f"[report] {written} -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
