"""DVC stages `inputs_data` and `inputs_fid`: fingerprint the data files each stage instance reads.

    python -m stages.inputs data --settings config/<scale>/settings --out config/<scale>/inputs/data
    python -m stages.inputs fid --settings config/<scale>/settings --out config/<scale>/inputs/fid

A variant's dataset role (CIFAR-10 or CIFAR-100) and its OOD sets are known only once its
params are resolved, which ``dvc.yaml`` cannot do. So each per-variant instance depends on one
small file listing the SHA-256 of exactly the files it reads (``pipeline.declared``), written
here from its resolved settings (stage ``configure``) and the prepared files:

* ``data`` (once the data and GMM statistics exist): train (its role's meta, train and val
  splits, and its GMM statistics when the buffer starts from them), sample (the GMM statistics,
  for a generative GMM-initialised variant), evaluate (its role's meta, test and train splits
  and its OOD sets), robustness (its role's test split), fid_ref@<role> (the reference splits);
* ``fid`` (once the reference statistics exist): fid (its role's reference statistics).

A file changes only when what it lists does: editing the CIFAR-100 stand-in reruns the
CIFAR-100 variants and the OOD evaluation of the CIFAR-10 ones, and trains no CIFAR-10 variant.
Each stage checks at start that it reads only listed files, unchanged (``--inputs``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from pipeline.common import StageError, main_guard
from pipeline.declared import write_inputs
from pipeline.outputs import building

KINDS = {"data": ("train", "sample", "evaluate", "robustness", "fid_ref"), "fid": ("fid",)}


def reads(kind: str, name: str, own: dict[str, Any], train: dict[str, Any] | None, scale: str) -> list[Path]:
    """The data files stage instance ``<kind>@<name>`` reads, given its resolved settings (``own``)
    and, for the per-variant kinds, its variant's (``train``: train@<name>'s settings)."""
    data, gmm, ref = Path("data") / scale, Path("gmm") / scale, Path("fid_ref") / scale
    if kind == "fid_ref":
        folder = data / name
        return [folder / "meta.json", *(p for s in own["reference_splits"] if (p := folder / f"{s}.npz").exists())]
    assert train is not None
    variant = train["variant"]
    role = variant["dataset"]
    folder = data / role
    generative = bool(variant["objective"]["generative"])
    from_gmm = variant["buffer"]["init"] == "gmm"
    if kind == "train":
        files = [folder / "meta.json", folder / "train.npz"]
        files += [p for p in (folder / "val.npz",) if p.exists()]
        return files + ([gmm / role / "stats.pt"] if from_gmm else [])
    if kind == "sample":
        return [gmm / role / "stats.pt"] if generative and from_gmm else []
    if kind == "evaluate":
        ood = [folder / "interp.npz" if r == "interp" else data / r / "test.npz" for r in own["ood_sets"]]
        return [folder / "meta.json", folder / "test.npz", folder / "train.npz", *(p for p in ood if p.exists())]
    if kind == "robustness":
        return [folder / "test.npz"]
    if kind == "fid":
        return [p for p in (ref / role / "info.json", ref / role / "stats.npz") if p.exists()] if generative else []
    raise StageError(f"no inputs for stage kind {kind!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("group", choices=sorted(KINDS))
    ap.add_argument("--settings", type=Path, required=True, help="config/<scale>/settings (stage configure)")
    ap.add_argument("--out", type=Path, required=True, help="config/<scale>/inputs/<group>")
    args = ap.parse_args()
    scale = args.settings.parent.name
    if not args.settings.is_dir():
        raise StageError(f"{args.settings} not found; run dvc repro (stage configure writes it)")

    def load(kind: str, name: str) -> dict[str, Any]:
        return yaml.safe_load((args.settings / kind / f"{name}.yaml").read_text())

    def load_train(variant: str) -> dict[str, Any]:
        """train@<variant>-<seed>'s settings, one seed's: the files a run reads do not depend on its seed."""
        return yaml.safe_load(sorted((args.settings / "train" / variant).glob("seed*.yaml"))[0].read_text())

    written = 0
    with building(args.out) as tmp:
        for kind in KINDS[args.group]:
            # train's settings are one file per seed (train/<variant>/seed<s>.yaml); its inputs one per variant
            names = ([p.name for p in sorted((args.settings / kind).iterdir()) if p.is_dir()] if kind == "train"
                     else [p.stem for p in sorted((args.settings / kind).glob("*.yaml"))])
            for name in names:
                train = None if kind == "fid_ref" else load_train(name)
                own = train if kind == "train" else load(kind, name)
                write_inputs(tmp / kind / f"{name}.json", reads(kind, name, own, train, scale))
                written += 1
    print(f"[inputs] {written} stage instances' data fingerprinted -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
