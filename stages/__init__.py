"""Thin DVC stage entry points: read params, call `jem`, write outputs, log to MLflow.

``python -m stages.<kind>`` hands its stage to a process that has torch, MLflow and the other heavy
packages imported already, and ends as the stage ends (``pipeline.forkserver``; JEM_FORKSERVER=0 runs
every stage as a plain process). Importing a stage module does nothing of the kind.
"""

import sys

if sys.argv[:1] == ["-m"]:  # Python is finding the module of `python -m stages.<kind>`
    from pipeline.forkserver import handoff

    handoff()  # returns where the stage runs in this process
