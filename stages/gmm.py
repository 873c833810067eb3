"""DVC stage `gmm@<role>`: class-wise Gaussian-mixture statistics for informative initialisation.

    python -m stages.gmm --data data/demo/cifar10 --out gmm/demo/cifar10 --config config/demo/settings/gmm/cifar10.yaml

One streaming pass over the un-augmented training split (``gmm.splits``: [train], or [train, val] as
train_sadajem.py fits all 50,000 images; ``jem.method.gmm``). Writes
``stats.pt`` and ``p0.png`` (per class: the mean, then draws from its Gaussian) into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from jem.config.instances import instance_settings
from jem.data.datasets import load_split
from jem.method.gmm import GaussianMixture, compute_mixture_stats, save_mixture_stats
from jem.report.figures import save_grid
from jem.runtime.files import read_json
from pipeline.common import StageError, load_params, main_guard
from pipeline.declared import check_settings
from pipeline.tracking import mlflow_run

CHUNK = 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--out", type=Path, required=True, help="output folder (stats.pt, p0.png)")
    ap.add_argument("--config", type=Path, help="the settings configure wrote for this instance (checked)")
    args = ap.parse_args()

    params = load_params()
    meta = read_json(args.data / "meta.json")
    if not meta.get("num_classes"):
        raise StageError(f"{args.data} has no class labels ({meta['source']}); gmm needs a training dataset")
    cfg = check_settings(args.config, instance_settings(params, "gmm", meta["role"]))
    parts = []
    for split in cfg["splits"]:
        if not (args.data / f"{split}.npz").exists():
            raise StageError(f"gmm.splits lists {split}, but {args.data / f'{split}.npz'} does not exist "
                             f"(datasets.{meta['role']}.<scale>.val is 0?); set gmm.splits: [train]")
        parts.append(load_split(args.data / f"{split}.npz"))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    with mlflow_run(f"gmm@{meta['role']}", params, {"dataset": meta["role"]}) as run:
        run.log_params({"gmm": cfg})
        batches = ((torch.from_numpy(images[i:i + CHUNK]), torch.from_numpy(labels[i:i + CHUNK]))
                   for i in range(0, len(images), CHUNK))
        stats = compute_mixture_stats(batches, int(meta["num_classes"]))
        save_mixture_stats(stats, args.out / "stats.pt")
        jitter = 1e-4
        torch.manual_seed(0)
        mixture = GaussianMixture(stats, jitter=jitter)
        per_class = 8
        draws, _ = mixture.sample(per_class * stats.num_classes,
                                  y=torch.arange(stats.num_classes).repeat_interleave(per_class))
        means = stats.means.view(-1, *stats.shape).clamp(-1, 1)
        figure = args.out / "p0.png"
        grid = torch.cat([means[:, None], draws.view(stats.num_classes, per_class, *stats.shape)], 1)
        save_grid(((grid.flatten(0, 1) + 1) * 127.5).round().to(torch.uint8).numpy(), figure, nrow=per_class + 1)
        run.log_metrics({"classes": stats.num_classes, "images": int(stats.counts.sum()),
                         "mean_variance": float(stats.covs.diagonal(dim1=1, dim2=2).mean())})
        run.log_artifact(figure)
        dims = stats.means.shape[1]
        print(f"gmm@{meta['role']}: {stats.num_classes} classes x {dims} dims -> {args.out / 'stats.pt'}")


if __name__ == "__main__":
    main_guard(main)
