"""DVC stage `check_params`: stop a wrong ``scale`` or ``variants`` before DVC looks them up.

    python -m stages.check_params --out data/params.checked

``dvc.yaml`` interpolates ``scale`` and the names in ``variants`` into the params every stage
declares (``datasets.<role>.<scale>``, ``scales.<scale>.*``, ``methods.<variant>``). DVC checks
a stage's params just before running it, and every other stage runs after this one, so a value
that names nothing stops here, with one line naming the key, the value and what is allowed
(exit status 2), instead of DVC's "Parameters ... are missing from 'params.yaml'". The output
is always the same bytes: passing the check reruns nothing downstream.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.common import load_params, main_guard
from stages.outputs import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    load_params()  # validates the whole file: an unknown scale or variant is one line, exit 2
    write_json(args.out, {"checked": ["scale", "variants"]})


if __name__ == "__main__":
    main_guard(main)
