"""DVC stage `prepare@<role>`: make one dataset role's splits as compact array files.

    python -m stages.prepare --role cifar10 --out data/demo/cifar10

Writes ``train.npz``/``val.npz`` (training roles), ``test.npz``, ``interp.npz`` (when the
spec asks for the Interp OOD set), ``meta.json`` and ``preview.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jem.config.instances import instance_settings
from jem.config.params import scale_name
from jem.data.datasets import (
    TORCHVISION_DATASETS,
    interpolate_pairs,
    load_split,
    load_torchvision,
    save_split,
    subset_indices,
    train_val_split,
)
from jem.data.synthetic import make_clouds, make_gratings, make_shapes
from jem.report.figures import save_grid
from pipeline.common import StageError, load_params, main_guard
from pipeline.declared import check_settings
from pipeline.outputs import write_json
from pipeline.tracking import mlflow_run

PROCEDURAL = ("shapes", "glyphs", "clouds", "gratings")
TEST_SEED_OFFSET = 10_000


def _subsample(images: np.ndarray, labels: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = subset_indices(len(images), n, seed)
    return (images, labels) if idx is None else (images[idx], labels[idx])


def make_splits(spec: dict, root: Path, download: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 images, int64 labels)} for one dataset spec."""
    source, seed = spec["source"], int(spec.get("seed", 0))
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    classes = spec.get("num_classes")
    size = int(spec.get("image_size", 32))  # procedural sets only; the real ones are read at 32
    if source in ("shapes", "glyphs"):
        n_pool = int(spec.get("train", 0)) + int(spec.get("val", 0))
        if n_pool:
            x, y = make_shapes(n_pool, size, num_classes=classes or 10, seed=seed, family=source)
            splits["train"] = (x.numpy(), y.numpy())
        x, y = make_shapes(int(spec["test"]), size, num_classes=classes or 10, seed=seed + TEST_SEED_OFFSET,
                           family=source)
        splits["test"] = (x.numpy(), y.numpy())
    elif source in ("clouds", "gratings"):
        make = make_clouds if source == "clouds" else make_gratings
        x = make(int(spec["test"]), size, seed=seed + TEST_SEED_OFFSET).numpy()
        splits["test"] = (x, np.zeros(len(x), dtype=np.int64))
    elif source in TORCHVISION_DATASETS:
        if classes:
            splits["train"] = load_torchvision(source, root, "train", download=download)
        test = load_torchvision(source, root, "test", download=download, crop=str(spec.get("crop", "center")))
        splits["test"] = _subsample(*test, spec.get("test"), seed)
    else:
        raise StageError(f"source = {source!r}: expected one of {', '.join(PROCEDURAL + TORCHVISION_DATASETS)}")
    if "train" in splits:
        x, y = splits.pop("train")
        val = int(spec.get("val", 0))
        train_idx, val_idx = train_val_split(y, val, seed=seed)
        splits["train"] = (x[train_idx], y[train_idx])
        if val:
            splits["val"] = (x[val_idx], y[val_idx])
    if spec.get("interp"):
        test_x = splits["test"][0]
        x = interpolate_pairs(test_x, n=int(spec["interp"]), seed=seed)
        splits["interp"] = (x, np.zeros(len(x), dtype=np.int64))
    return splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    args = ap.parse_args()

    params = load_params()
    settings = check_settings(args.config, instance_settings(params, "prepare", args.role))
    spec, data = settings["dataset"], settings["data"]
    root = Path(data.get("root", "data/raw"))
    with mlflow_run(f"prepare@{args.role}", params,
                    {"dataset": args.role, "source": spec["source"]}) as run:
        run.log_params({"dataset": {args.role: spec}, "data": data})
        splits = make_splits(spec, root, bool(data.get("download", False)))
        # build everything in a temporary folder beside the output, then swap it in
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
        try:
            for split, (x, y) in splits.items():
                save_split(tmp / f"{split}.npz", x, y)
            meta = {
                "role": args.role, "scale": scale_name(params), "source": spec["source"],
                "num_classes": spec.get("num_classes"), "image_shape": list(splits["test"][0].shape[1:]),
                "counts": {k: len(v[0]) for k, v in splits.items()},
                "class_counts": {k: np.bincount(v[1]).tolist() for k, v in splits.items() if spec.get("num_classes")
                                 and k in ("train", "val", "test")},
            }
            write_json(tmp / "meta.json", meta)
            save_grid(splits.get("train", splits["test"])[0][:100], tmp / "preview.png", nrow=10)
            load_split(tmp / "test.npz")  # read back what was written
            if args.out.exists():
                shutil.rmtree(args.out)
            tmp.rename(args.out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        run.log_metrics({f"n_{k}": v for k, v in meta["counts"].items()})
        run.log_artifact(args.out / "preview.png")
        run.log_artifact(args.out / "meta.json")
        print(f"prepare@{args.role}: {spec['source']} -> {args.out} {meta['counts']}")


if __name__ == "__main__":
    main_guard(main)
