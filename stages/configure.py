"""DVC stage `configure`: check params.yaml, then write what each stage instance reads from it.

    python -m stages.configure --out config/<scale>/settings

Runs first. It validates the whole params file (a wrong ``scale`` or variant name stops here with
one line naming the key, the value and what is allowed, exit status 2, before DVC looks up the
keys ``dvc.yaml`` interpolates), then writes one YAML file per stage instance of this scale,
``<out>/<kind>/<name>.yaml``: the instance's settings resolved from defaults, its family, its
method block, the scale and the stage sections (``jem.config.instances``). Each instance declares
its file as its params in ``dvc.yaml``: editing ``families.jempp`` changes only the JEM++
variants' files, so only their stages rerun, and a comment or a reordered key changes none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jem.config.instances import instances
from jem.config.params import scale_name
from pipeline.common import load_params, main_guard
from pipeline.declared import write_settings
from pipeline.outputs import building


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="config/<scale>/settings")
    args = ap.parse_args()
    params = load_params(tracking=False)  # validates the whole file: an unknown scale or variant is one line, exit 2
    resolved = instances(params)
    with building(args.out) as tmp:
        for (kind, name), settings in resolved.items():
            write_settings(tmp / kind / f"{name or kind}.yaml", kind, name, settings)
    print(f"[configure] {len(resolved)} stage instances at scale {scale_name(params)} -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
