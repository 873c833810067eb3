"""Train a paper table's variants at once, one worker per device, then assemble the table.

    python -m stages.table sadajem_table1 --devices 0,1,2,3      # four GPUs, one variant each at a time
    python -m stages.table sadajem_table1 --devices 0,1 --per-device 2
    python -m stages.table --workers 2                           # this machine's CPU, the current `variants`
    python -m stages.table sadajem_table1 --only 3 --pull --push # one variant of several machines' (SLURM array)
    python -m stages.table sadajem_table1 --pull                 # the assembly: restores, computes what is left

The runner (the shared stages, the pools of trainings and evaluations, the assembly) is
``pipeline.table``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.common import main_guard
from pipeline.table import run_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", nargs="?", help="a name under `tables` in params.yaml (default: the current variants)")
    ap.add_argument("--devices", help="CUDA device indices, e.g. 0,1,2,3 (default: none, the CPU)")
    ap.add_argument("--per-device", type=int, default=1, help="workers per listed device (default 1)")
    ap.add_argument("--workers", type=int, help="CPU workers when no --devices (default 2)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads per worker (default 0: torch's own, as a sequential dvc repro, so the "
                    "results are bit-identical to it; on a CPU, the cores / workers avoids oversubscription, "
                    "but CPU sums then add up in another order)")
    ap.add_argument("--logs", type=Path, default=Path("logs"), help="where each worker's log goes (default logs/)")
    ap.add_argument("--only", action="append", default=[], metavar="VARIANT",
                    help="train and evaluate only these runs: a variant (all its seeds), a run <variant>-<seed>, or "
                    "a 0-based index from --list; comma-separated or repeated (e.g. $SLURM_ARRAY_TASK_ID); not "
                    "the report: one machine's share")
    ap.add_argument("--shared", action="store_true",
                    help="only the shared stages (data, GMM, FID reference statistics): run once before --only tasks")
    ap.add_argument("--pull", action="store_true",
                    help="first fetch what other machines pushed (dvc pull --run-cache from the default DVC remote)")
    ap.add_argument("--push", action="store_true",
                    help="at the end push the outputs and their run cache (dvc push --run-cache) to the default remote")
    ap.add_argument("--list", action="store_true",
                    help="print the table's runs (variants x seeds), one per line with its --only index, and stop")
    ap.add_argument("--run-id", help="the MLflow tag table_run of every run (default: table name and time, or "
                    "the SLURM array job id)")
    run_table(ap.parse_args())


if __name__ == "__main__":
    main_guard(main)
