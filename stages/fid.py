"""DVC stages for IS/FID on pytorch-fid's Inception network.

    python -m stages.fid reference --data data/demo/cifar10 --out fid_ref/demo/cifar10
    python -m stages.fid score --samples samples/demo/sadajem_k5 --ref fid_ref/demo \
        --metrics metrics/demo/fid/sadajem_k5.json

``reference`` (stage ``fid_ref@<role>``): Inception statistics of a training dataset's real
images (``fid.reference_splits``, or ``fid.reference_splits_by_role`` for the role; the
reference code uses CIFAR-10 train + test and the CIFAR-100 training set), computed once
and cached as a DVC output: ``stats.npz`` and ``info.json``.

``score`` (stage ``fid@<variant>``): IS and FID of each sample set in ``fid.sets`` (the final
replay buffer, as the reference code scores, and fresh chains from p0) against the
reference of the variant's training data, under every protocol of
``jem.config.settings.PROTOCOLS`` (one Inception pass per set; a protocol only picks images):
``whole`` scores every image (JEM++'s eval_buffer), ``sadajem`` the most confident
``fid.is_ratio`` (IS) and ``fid.fid_ratio`` (FID) per predicted class (SADA-JEM's
cond_is_fid). The set's top-level ``is``/``fid`` are those of the variant family's protocol
(``fid.protocol``); every protocol's numbers are under ``protocols``.

The weights come from ``fid.weights`` (a local file; ``weights/`` is tracked so that dropping
the file there reruns these stages) or, when ``data.download`` is true, pytorch-fid's
release URL. When neither is available, both stages finish and record the metric as
``unavailable`` with the reason: never a made-up number.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jem.config.instances import instance_settings
from jem.config.settings import PROTOCOLS
from jem.data.datasets import load_split, subset_indices
from jem.evaluation.inception import (
    GaussianStats,
    InceptionUnavailable,
    feature_stats,
    inception_outputs,
    load_fid_inception,
    protocol_indices,
    score_protocol,
)
from jem.runtime.checkpoint import load_arrays
from jem.runtime.files import read_json
from pipeline.common import StageError, load_params, main_guard, setup_run
from pipeline.declared import Inputs, check_settings
from pipeline.outputs import building, write_json, write_metrics
from pipeline.tracking import mlflow_run
from pipeline.weights import model_channels_last, skip_diverged, stage_run


def _inception(cfg: dict[str, Any], device: torch.device) -> Any:
    download = bool(cfg["download"])
    try:
        return load_fid_inception(cfg["weights"], download=download, device=device)
    except InceptionUnavailable as exc:
        hint = "" if download else " (fid.weights names the file; data.download: true fetches it)"
        raise InceptionUnavailable(f"{exc}{hint}") from None


def _nhwc(params: dict[str, Any], device: torch.device) -> bool:
    """``run.perf.channels_last`` on a GPU: the Inception network runs NHWC (fp32 either way)."""
    return device.type == "cuda" and model_channels_last(params, device)


def reference(args: argparse.Namespace) -> None:
    params = load_params()
    device = setup_run(params)
    inputs = Inputs(args.inputs)
    meta = read_json(inputs.need(args.data / "meta.json"))
    cfg = check_settings(args.config, instance_settings(params, "fid_ref", meta["role"]))
    splits = list(cfg["reference_splits"])
    with mlflow_run(f"fid_ref@{meta['role']}", params, {"dataset": meta["role"]}) as run:
        run.log_params({"fid": cfg})
        parts = []
        for split in splits:
            if split == "val" and "val" not in meta["counts"]:
                continue  # no hold-out (val: 0): the training split is the whole training set
            path = args.data / f"{split}.npz"
            if not path.exists():
                raise StageError(f"fid.reference_splits names {split!r} but {path} does not exist; "
                                 f"{meta['role']} has {', '.join(sorted(meta['counts']))}")
            parts.append(load_split(inputs.need(path))[0])
        images = np.concatenate(parts)
        limit = cfg.get("reference_max")
        idx = subset_indices(len(images), None if limit is None else int(limit), 0)
        if idx is not None:
            images = images[idx]
        info: dict[str, Any] = {"role": meta["role"], "source": meta["source"], "splits": splits, "images": len(images)}
        with building(args.out) as tmp:
            try:
                model = _inception(cfg, device)
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


def score_set(feats: np.ndarray, logits: np.ndarray, ref: GaussianStats, pred: np.ndarray | None,
              conf: np.ndarray | None, cfg: dict[str, Any], protocol: str) -> dict[str, Any]:
    """One set's numbers under every protocol; top level: ``protocol``'s."""
    by_protocol = {}
    for name in PROTOCOLS:
        if name != "whole" and pred is None:
            by_protocol[name] = {"note": "samples.npz has no predictions (rerun the sample stage)"}
            continue
        is_idx, fid_idx = protocol_indices(name, pred, conf, len(feats), float(cfg.get("is_ratio", 0.1)),
                                           float(cfg.get("fid_ratio", 0.9)))
        by_protocol[name] = score_protocol(feats, logits, ref, is_idx, fid_idx, cfg.get("splits"))
    chosen = by_protocol[protocol]
    return {"n": len(feats), "protocol": protocol, "is": chosen.get("is"), "is_std": chosen.get("is_std"),
            "fid": chosen.get("fid"), "protocols": by_protocol}


def score(args: argparse.Namespace) -> None:
    params = load_params()
    device = setup_run(params)
    info = read_json(args.samples / "info.json")
    name, seed = info["variant"], info.get("seed")
    cfg = check_settings(args.config, instance_settings(params, "fid", name))
    inputs = Inputs(args.inputs)
    if info.get("diverged"):  # recovery off and the run diverged: no samples to score
        skip_diverged("fid", info["diverged"], params, args.metrics)
        return
    with mlflow_run(stage_run("fid", name, seed), params, {"variant": name, "seed": seed,
                                                          "dataset": info["dataset"]}) as run:
        run.log_params({"fid": cfg})
        metrics: dict[str, Any] = {"variant": name, "seed": seed}
        if not info.get("generative"):
            metrics.update(status="not applicable", reason=info.get("reason", "no samples"))
        else:
            samples = load_arrays(args.samples / "samples.npz",
                                  writer=f"its sample stage ({stage_run('sample', name, seed)})")
            role = info["dataset"]
            ref_info = read_json(inputs.need(args.ref / role / "info.json"))
            if ref_info["status"] != "ok":
                metrics.update(status="unavailable", reason=ref_info["reason"])
            else:
                try:
                    model = _inception(cfg, device)
                except InceptionUnavailable as exc:
                    metrics.update(status="unavailable", reason=str(exc))
                else:
                    ref = GaussianStats.load(inputs.need(args.ref / role / "stats.npz"))
                    protocol = str(cfg["protocol"])  # fid.protocol of the variant's family
                    metrics.update(status="ok", reference=f"{role} ({ref.n} images)", protocol=protocol)
                    for key in cfg.get("sets", ["buffer", "fresh"]):
                        if key not in samples:
                            sets = [f for f in samples if not f.startswith(("ranked_", "pred_", "conf_"))]
                            raise StageError(f"fid.sets names {key!r}; {args.samples}/samples.npz holds "
                                             f"{', '.join(sets)}")
                        feats, logits = inception_outputs(model, samples[key], int(cfg.get("batch_size", 200)),
                                                          device, desc=f"inception {key}",
                                                          channels_last=_nhwc(params, device))
                        pred = samples[f"pred_{key}"] if f"pred_{key}" in samples else None
                        conf = samples[f"conf_{key}"] if f"conf_{key}" in samples else None
                        metrics[key] = score_set(feats, logits, ref, pred, conf, cfg, protocol)
                        run.log_metrics({f"{key}/{p}/{m}": v[m] for p, v in metrics[key]["protocols"].items()
                                         for m in ("is", "fid") if v.get(m) is not None})
        write_metrics(args.metrics, metrics)
        run.set_tags({"status": metrics["status"]})
        shown = {k: tuple(None if v[m] is None else round(v[m], 2) for m in ("is", "fid"))
                 for k, v in metrics.items() if isinstance(v, dict)}
        print(f"[fid] {name}: {metrics['status']} {shown or metrics.get('reason', '')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="Inception statistics of a dataset's real images")
    ref.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    ref.add_argument("--out", type=Path, required=True)
    ref.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    ref.add_argument("--inputs", type=Path, help="its input fingerprints (stages inputs_*): each file read is checked")
    sc = sub.add_parser("score", help="IS and FID of a variant's samples")
    sc.add_argument("--samples", type=Path, required=True)
    sc.add_argument("--ref", type=Path, required=True, help="reference statistics folder of this scale")
    sc.add_argument("--metrics", type=Path, required=True)
    sc.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    sc.add_argument("--inputs", type=Path, help="its input fingerprints (stages inputs_*): each file read is checked")
    args = ap.parse_args()
    (reference if args.command == "reference" else score)(args)


if __name__ == "__main__":
    main_guard(main)
