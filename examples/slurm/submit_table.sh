#!/usr/bin/env bash
# A paper table on a SLURM cluster: one job computes the shared stages (data, GMM, FID reference
# statistics), then one array task per run (variant x seed) trains and evaluates it on its own GPU, then one job
# assembles the report. The jobs share results through the repository's default DVC remote and its
# run cache: nothing one job computed is computed again by another.
#
#   examples/slurm/submit_table.sh sadajem_table1 --partition=gpu --time=2-00:00:00
#
# Run it from the repository root on a login node, in a clone every node can read, after
# `make install`, with a default DVC remote every node can reach (`dvc remote add -d ...`) and
# params.yaml, dvc.yaml and .dvc/config committed (each task clones the commit). Options after the
# table name go to every sbatch call. Export MLFLOW_TRACKING_URI (the lab's server) so that every
# job's MLflow runs land in one place; they share the tag table_run=<table>-slurm<time>.
set -euo pipefail

table=${1:-}
if [ -z "$table" ] || [[ $table == -* ]]; then
    echo "usage: examples/slurm/submit_table.sh TABLE [sbatch options]; the tables: grep -A12 '^tables:' params.yaml" >&2
    exit 2
fi
shift
repo=$(pwd)
python=${JEM_PYTHON:-$repo/.venv/bin/python}
if [ ! -x "$python" ]; then
    echo "error: $python not found; run make install first (or set JEM_PYTHON to the environment's python)" >&2
    exit 1
fi
if ! git diff --quiet HEAD -- params.yaml dvc.yaml .dvc/config; then
    echo "error: params.yaml, dvc.yaml or .dvc/config differs from the last commit, and each task clones the" \
         "commit; git commit them first" >&2
    exit 1
fi
if ! "$python" -m dvc remote default >/dev/null 2>&1; then
    echo "error: no default DVC remote; the jobs share their results through one: dvc remote add -d shared" \
         "/path/every/node/mounts (or s3://...), then git commit .dvc/config" >&2
    exit 1
fi
n=$("$python" -m stages.table "$table" --list | wc -l)  # also checks the table's name, in one line
[ "$n" -gt 0 ] || exit 1
[ -n "${MLFLOW_TRACKING_URI:-}" ] || echo "note: MLFLOW_TRACKING_URI is not set: each task's MLflow runs stay in" \
    "its own clone's mlflow.db (under ${JEM_WORK:-$repo/.slurm})" >&2

run_id="$table-slurm$(date -u +%Y%m%dT%H%M%SZ)"
job="$repo/examples/slurm/table_job.sh"
mkdir -p "$repo/logs/slurm"
common=(--parsable --export="ALL,JEM_RUN_ID=$run_id" --output="$repo/logs/slurm/%x-%A_%a.out")
shared=$(sbatch "${common[@]}" --job-name="jem-$table-shared" --gres=gpu:1 "$@" "$job" "$repo" "$table" shared)
array=$(sbatch "${common[@]}" --job-name="jem-$table" --array="0-$((n - 1))" --gres=gpu:1 \
    --dependency="afterok:$shared" "$@" "$job" "$repo" "$table" variant)
report=$(sbatch "${common[@]}" --job-name="jem-$table-report" --dependency="afterok:$array" \
    "$@" "$job" "$repo" "$table" assemble)
echo "submitted $run_id: shared stages job $shared, $n runs array $array (tasks 0-$((n - 1))), report job $report"
echo "a failed task: resubmit it alone (sbatch --array=<i> ... $job $repo $table variant), then the report job;" \
     "it resumes from its checkpoints"
