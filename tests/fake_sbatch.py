"""A stand-in for SLURM's ``sbatch`` (tests only): runs each job at once, an array's tasks side by side.

It sets the variables SLURM gives a job (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID), applies
``--export=ALL,K=V``, writes the job's output where ``--output`` says (%x, %A, %a), prints the job id as
``--parsable`` does, and appends one JSON line per submission to $FAKE_SBATCH_LOG: its options, command
and the exit code of every task. Dependencies hold trivially: a job has finished when sbatch returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    opts: dict[str, str] = {}
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        opts[key] = value
    log = Path(os.environ["FAKE_SBATCH_LOG"])
    job_id = 100 + (len(log.read_text().splitlines()) if log.exists() else 0)
    env = dict(os.environ, SLURM_JOB_ID=str(job_id))
    for item in opts.get("export", "ALL").split(",")[1:]:
        key, _, value = item.partition("=")
        env[key] = value
    if "array" in opts:
        first, last = (int(x) for x in opts["array"].split("-")) if "-" in opts["array"] else [int(opts["array"])] * 2
        tasks = list(range(first, last + 1))
    else:
        tasks = [None]
    procs = []
    for task in tasks:
        task_env = dict(env)
        if task is not None:
            task_env.update(SLURM_ARRAY_JOB_ID=str(job_id), SLURM_ARRAY_TASK_ID=str(task))
        name = opts.get("output", "slurm-%A_%a.out").replace("%x", opts.get("job-name", "job"))
        out = Path(name.replace("%A", str(job_id)).replace("%a", "" if task is None else str(task)))
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as fh:
            procs.append((out, subprocess.Popen(args, env=task_env, stdout=fh, stderr=subprocess.STDOUT)))
    codes = [p.wait() for _, p in procs]
    with open(log, "a") as fh:
        fh.write(json.dumps({"id": job_id, "opts": opts, "cmd": args, "codes": codes,
                             "outputs": [str(o) for o, _ in procs]}) + "\n")
    print(job_id)


if __name__ == "__main__":
    main()
