#!/usr/bin/env bash
# One job of examples/slurm/submit_table.sh: table_job.sh REPO TABLE shared|variant|assemble
#   shared    the shared stages, pushed with their run cache (pulled first: what an earlier table pushed is
#             restored, not computed again)
#   variant   the table's run number $SLURM_ARRAY_TASK_ID (stages.table --list) on the job's GPU (SLURM sets
#             CUDA_VISIBLE_DEVICES), pulled and pushed through the run cache
#   assemble  in REPO itself: pull every task's run cache, restore their stages, run the report
# shared and variant work in a clone of REPO's commit kept under $JEM_WORK (default REPO/.slurm),
# one per task, so that a resubmitted task resumes from its own checkpoints.
set -euo pipefail

repo=$1 table=$2 mode=$3
python=${JEM_PYTHON:-$repo/.venv/bin/python}
export PATH="$(dirname "$python"):$PATH"  # the stages' `python` is the environment's
run_id=(--run-id "${JEM_RUN_ID:-$table-slurm${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-0}}}")

case $mode in
    assemble)
        cd "$repo"
        exec "$python" -m stages.table "$table" --workers 1 --pull "${run_id[@]}" ;;
    shared)
        name=shared args=(--shared --pull --push) ;;
    variant)
        name=${SLURM_ARRAY_TASK_ID:?"variant jobs run as an array: sbatch --array=..."}
        args=(--only "$name" --pull --push) ;;
    *)
        echo "error: mode $mode: expected shared, variant or assemble" >&2
        exit 2 ;;
esac

work=${JEM_WORK:-$repo/.slurm}/$table/$name
if [ -d "$work/.git" ]; then  # a resubmitted task: the same clone, at REPO's commit, its checkpoints kept
    git -C "$work" fetch -q "$repo" HEAD
    git -C "$work" checkout -q -f FETCH_HEAD
else
    git clone -q "$repo" "$work"
fi
cd "$work"
exec "$python" -m stages.table "$table" --workers 1 "${args[@]}" "${run_id[@]}"
