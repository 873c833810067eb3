"""DVC stages for IS/FID on pytorch-fid's Inception network.

    python -m stages.fid reference --data data/demo/cifar10 --out fid_ref/demo/cifar10
    python -m stages.fid score --samples samples/demo/sadajem_k5 --ref fid_ref/demo \
        --metrics metrics/demo/fid/sadajem_k5.json

``reference`` (stage ``fid_ref@<role>``): Inception statistics of a training dataset's real
images (``fid.reference_splits``; the papers use CIFAR-10 train + test), computed once
and cached as a DVC output: ``stats.npz`` and ``info.json``.

``score`` (stage ``fid@<variant>``): IS and FID of each sample set in ``fid.sets`` (the final
replay buffer, as the reference code scores, and fresh chains from p0) against the
reference of the variant's training data.

The weights come from ``fid.weights`` (a local file; ``weights/`` is tracked so that dropping
the file there reruns these stages) or, when ``data.download`` is true, pytorch-fid's
release URL. When neither is available, both stages finish and record the metric as
``unavailable`` with the reason: never a made-up number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jem.datasets import load_split
from jem.inception import (
    GaussianStats,
    InceptionUnavailable,
    feature_stats,
    frechet_distance,
    inception_outputs,
    inception_score,
    load_fid_inception,
)
from jem.params import scale_name, stage_section
from jem.settings import section
from stages.common import (
    StageError,
    building,
    load_params,
    main_guard,
    mlflow_run,
    setup_run,
    write_json,
    write_metrics,
)


def _inception(params: dict[str, Any], cfg: dict[str, Any], device: torch.device) -> Any:
    download = bool((params.get("data") or {}).get("download", False))
    try:
        return load_fid_inception(cfg.get("weights", "weights/pt_inception-2015-12-05-6726825d.pth"),
                                  download=download, device=device)
    except InceptionUnavailable as exc:
        hint = "" if download else " (fid.weights names the file; data.download: true fetches it)"
        raise InceptionUnavailable(f"{exc}{hint}") from None


def _nhwc(params: dict[str, Any], device: torch.device) -> bool:
    """``run.perf.channels_last`` on a GPU: the Inception network runs NHWC (fp32 either way)."""
    return device.type == "cuda" and section(params, "run", scale_name(params)).perf.channels_last


def reference(args: argparse.Namespace) -> None:
    params = load_params()
    device = setup_run(params)
    cfg = stage_section(params, "fid")
    meta = json.loads((args.data / "meta.json").read_text())
    splits = list(cfg.get("reference_splits", ["train", "val", "test"]))
    with mlflow_run(f"fid_ref@{meta['role']}", params, {"dataset": meta["role"]}) as run:
        run.log_params({"fid": cfg})
        parts = []
        for split in splits:
            path = args.data / f"{split}.npz"
            if not path.exists():
                raise StageError(f"fid.reference_splits names {split!r} but {path} does not exist; "
                                 f"{meta['role']} has {', '.join(sorted(meta['counts']))}")
            parts.append(load_split(path)[0])
        images = np.concatenate(parts)
        limit = cfg.get("reference_max")
        if limit is not None and int(limit) < len(images):
            images = images[np.sort(np.random.default_rng(0).choice(len(images), int(limit), replace=False))]
        info: dict[str, Any] = {"role": meta["role"], "source": meta["source"], "splits": splits, "images": len(images)}
        with building(args.out) as tmp:
            try:
                model = _inception(params, cfg, device)
            except InceptionUnavailable as exc:
                info.update(status="unavailable", reason=str(exc))
            else:
                feats, _ = inception_outputs(model, images, int(cfg.get("batch_size", 200)), device,
                                             desc=f"inception {meta['role']}", channels_last=_nhwc(params, device))
                feature_stats(feats).save(tmp / "stats.npz")
                info.update(status="ok")
            write_json(tmp / "info.json", info)
        run.set_tags({"status": info["status"]})
        print(f"[fid_ref] {meta['role']}: {len(images)} images, " +
              ("statistics cached" if info["status"] == "ok" else f"unavailable: {info['reason']}"))


def score(args: argparse.Namespace) -> None:
    params = load_params()
    device = setup_run(params)
    cfg = stage_section(params, "fid")
    info = json.loads((args.samples / "info.json").read_text())
    name = info["variant"]
    with mlflow_run(f"fid@{name}", params, {"variant": name, "dataset": info["dataset"]}) as run:
        run.log_params({"fid": cfg})
        metrics: dict[str, Any] = {"variant": name}
        if not info.get("generative"):
            metrics.update(status="not applicable", reason=info.get("reason", "no samples"))
        else:
            samples = np.load(args.samples / "samples.npz")
            role = info["dataset"]
            ref_info = json.loads((args.ref / role / "info.json").read_text())
            if ref_info["status"] != "ok":
                metrics.update(status="unavailable", reason=ref_info["reason"])
            else:
                try:
                    model = _inception(params, cfg, device)
                except InceptionUnavailable as exc:
                    metrics.update(status="unavailable", reason=str(exc))
                else:
                    ref = GaussianStats.load(args.ref / role / "stats.npz")
                    metrics.update(status="ok", reference=f"{role} ({ref.n} images)")
                    for key in cfg.get("sets", ["buffer", "fresh"]):
                        if key not in samples.files:
                            raise StageError(f"fid.sets names {key!r}; {args.samples}/samples.npz holds "
                                             f"{', '.join(f for f in samples.files if not f.startswith('ranked_'))}")
                        feats, logits = inception_outputs(model, samples[key], int(cfg.get("batch_size", 200)),
                                                          device, desc=f"inception {key}",
                                                          channels_last=_nhwc(params, device))
                        is_mean, is_std = inception_score(logits, int(cfg.get("splits", 10)))
                        metrics[key] = {"n": len(feats), "is": is_mean, "is_std": is_std,
                                        "fid": frechet_distance(feature_stats(feats), ref)}
                        run.log_metrics({f"{key}/is": is_mean, f"{key}/fid": metrics[key]["fid"]})
        write_metrics(args.metrics, metrics)
        run.set_tags({"status": metrics["status"]})
        shown = {k: (round(v["is"], 2), round(v["fid"], 2)) for k, v in metrics.items() if isinstance(v, dict)}
        print(f"[fid] {name}: {metrics['status']} {shown or metrics.get('reason', '')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="Inception statistics of a dataset's real images")
    ref.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    ref.add_argument("--out", type=Path, required=True)
    sc = sub.add_parser("score", help="IS and FID of a variant's samples")
    sc.add_argument("--samples", type=Path, required=True)
    sc.add_argument("--ref", type=Path, required=True, help="reference statistics folder of this scale")
    sc.add_argument("--metrics", type=Path, required=True)
    args = ap.parse_args()
    (reference if args.command == "reference" else score)(args)


if __name__ == "__main__":
    main_guard(main)
