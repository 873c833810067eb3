"""DVC stage `sample@<variant>`: draw samples from a trained variant.

    python -m stages.sample --model models/demo/sadajem_k5 --gmm gmm/demo --out samples/demo/sadajem_k5

Three sets, saved together in ``samples.npz`` (uint8 images, clamped to [-1, 1] first) and as
PNG grids: the final replay buffer (what the reference code scores for IS/FID), fresh chains
started from p0 and run for the variant's sampler steps, and class-conditional fresh chains
(one grid row per class). Then, per class (the classifier's prediction), the ``ranked``
best and worst samples by ``log p(x)`` and by ``p(y|x)`` among the buffer and fresh sets
(``best_px.png``, ``worst_px.png``, ``best_pyx.png``, ``worst_pyx.png``; indices into the
concatenation buffer + fresh in ``samples.npz``). For every set, the classifier's prediction
and confidence ``max_y p(y|x)`` of each saved image (``pred_<set>``, ``conf_<set>``, eval
mode): the SADA-JEM IS/FID protocol selects by them (``jem.evaluation.inception.confident_per_class``).
Batch norm samples with batch statistics when the variant does, but never updates the
running statistics here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from jem.config.instances import instance_settings
from jem.config.variant import Variant
from jem.evaluation.metrics import predict_logits
from jem.method.gmm import load_mixture_stats
from jem.method.samplers import sample, without_bn_updates
from jem.method.train import build_p0
from jem.report.figures import save_grid
from jem.runtime.checkpoint import load_tensors
from pipeline.common import StageError, load_params, main_guard, setup_run
from pipeline.declared import Inputs, check_settings
from pipeline.outputs import building, write_json
from pipeline.tracking import mlflow_run
from pipeline.weights import diverged, load_selected, run_of, skip_diverged, stage_run


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def run_chains(model: torch.nn.Module, variant: Variant, p0, n: int, steps: int, device: torch.device,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` fresh chains from p0 in batches of the training p(x) batch size."""
    out = []
    batch = variant.train.px_batch_size
    sampler = without_bn_updates(variant.sampler)
    for i in range(0, n, batch):
        y = labels[i:i + batch].to(device) if labels is not None else None
        x0, _ = p0.sample(min(batch, n - i), y=y, device=device)
        out.append(sample(model, x0.to(device), sampler, y=y, steps=steps).cpu())
    return torch.cat(out) if out else torch.empty(0)


def rank_per_class(logits: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Per predicted class: indices of the k best/worst by log p(x) and by p(y|x); -1 pads."""
    classes = logits.shape[1]
    log_px = torch.logsumexp(logits, 1)
    prob, pred = torch.softmax(logits, 1).max(1)
    out = {key: np.full((classes, k), -1, dtype=np.int64) for key in ("best_px", "worst_px", "best_pyx", "worst_pyx")}
    for c in range(classes):
        idx = (pred == c).nonzero().flatten()
        if not len(idx):
            continue
        for key, score in (("px", log_px[idx]), ("pyx", prob[idx])):
            order = idx[torch.argsort(score, descending=True)]
            m = min(k, len(order))
            out[f"best_{key}"][c, :m] = order[:m].numpy()
            out[f"worst_{key}"][c, :m] = order.flip(0)[:m].numpy()
    return out


def _ranked_grid(images: np.ndarray, index: np.ndarray) -> np.ndarray:
    blank = np.full(images.shape[1:], 255, dtype=np.uint8)  # a white cell where a class has too few samples
    return np.stack([images[i] if i >= 0 else blank for i in index.flatten()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="trained variant folder")
    ap.add_argument("--gmm", type=Path, required=True, help="mixture statistics folder of this scale")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="its settings (stage configure), checked against params.yaml")
    ap.add_argument("--inputs", type=Path, help="its input fingerprints (stages inputs_*): each file read is checked")
    args = ap.parse_args()

    params = load_params()
    device = setup_run(params)
    name, seed = run_of(args.model)
    cfg = check_settings(args.config, instance_settings(params, "sample", name))
    inputs = Inputs(args.inputs)
    stopped = diverged(args.model)
    if stopped is not None:  # recovery off and the run diverged: nothing to sample
        skip_diverged("sample", stopped, params, folders=(args.out,))
        return
    model, variant, select = load_selected(args.model, "sample", str(cfg["select"]), device, params)
    role = variant.dataset
    tags = {"variant": variant.name, "seed": seed, "family": variant.family, "dataset": role}
    if not variant.uses_sampler:  # the papers report no IS/FID for softmax baselines
        with (mlflow_run(stage_run("sample", name, seed), params, {**tags, "generative": False}),
              building(args.out) as tmp):
            write_json(tmp / "info.json", {"variant": variant.name, "seed": seed, "dataset": role,
                                           "generative": False,
                                           "reason": "softmax baseline: trained without p(x), not sampled"})
        print(f"[sample] {variant.name}: softmax baseline, no samples (the papers report none)")
        return
    weights = args.model / ("final.pt" if select == "last" else "best_val.pt")
    chosen = load_tensors(weights, writer="its train stage")  # its replay buffer: the same moment as its weights
    if chosen.get("buffer") is None:
        raise StageError(f"{weights} holds no replay buffer (written before best_val kept one); rerun its train "
                         f"stage (dvc repro -f {stage_run('train', name, seed)}) or set sample.select: last")
    mixture = load_mixture_stats(inputs.need(args.gmm / role / "stats.pt")) if variant.buffer.init == "gmm" else None
    p0 = build_p0(variant, (variant.model.in_channels, variant.model.image_size, variant.model.image_size),
                  mixture, device)
    steps = int(cfg.get("fresh_steps") or variant.sampler.steps)
    classes = variant.model.num_classes
    torch.manual_seed(variant.train.seed)

    with mlflow_run(stage_run("sample", name, seed), params, tags) as run:
        run.log_params({"sample": cfg, "steps": steps})
        buffer = chosen["buffer"]["samples"]
        n_buffer = min(int(cfg["buffer"]), len(buffer))
        keep = torch.randperm(len(buffer))[:n_buffer]
        sets = {"buffer": to_uint8(buffer[keep])}
        sets["fresh"] = to_uint8(run_chains(model, variant, p0, int(cfg["fresh"]), steps, device))
        cond_labels = torch.arange(classes).repeat_interleave(int(cfg["per_class"]))
        sets["conditional"] = to_uint8(run_chains(model, variant, p0, len(cond_labels), steps, device, cond_labels))
        pool = np.concatenate([sets["buffer"], sets["fresh"]])
        logits = predict_logits(model, torch.from_numpy(pool), device=device)
        ranked = rank_per_class(logits, int(cfg.get("ranked", 8)))
        set_logits = {"buffer": logits[:len(sets["buffer"])], "fresh": logits[len(sets["buffer"]):],
                      "conditional": predict_logits(model, torch.from_numpy(sets["conditional"]), device=device)}
        confidence = {}
        for key, lg in set_logits.items():
            conf, pred = torch.softmax(lg, 1).max(1) if len(lg) else (torch.empty(0), torch.empty(0, dtype=torch.long))
            confidence[f"pred_{key}"], confidence[f"conf_{key}"] = pred.numpy().astype(np.int64), conf.numpy()

        with building(args.out) as tmp:
            np.savez(tmp / "samples.npz", conditional_labels=cond_labels.numpy(), **sets, **confidence,
                     **{f"ranked_{k}": v for k, v in ranked.items()})
            grid = int(cfg.get("grid", 100))
            for key in ("buffer", "fresh"):
                save_grid(sets[key][:grid], tmp / f"{key}.png", nrow=int(np.ceil(np.sqrt(min(grid, len(sets[key]))))))
            save_grid(sets["conditional"], tmp / "conditional.png", nrow=int(cfg["per_class"]))
            for key, index in ranked.items():
                save_grid(_ranked_grid(pool, index), tmp / f"{key}.png", nrow=index.shape[1])
            write_json(tmp / "info.json", {"variant": variant.name, "seed": seed, "dataset": role,
                                           "generative": True,
                                           "weights": select,
                                           "steps": steps, "counts": {k: len(v) for k, v in sets.items()},
                                           "ranked_from": "buffer + fresh, by predicted class"})
        for png in sorted(args.out.glob("*.png")):
            run.log_artifact(png, "samples")
        run.log_metrics({f"n_{k}": len(v) for k, v in sets.items()})
        print(f"[sample] {variant.name}: {', '.join(f'{k} {len(v)}' for k, v in sets.items())} -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
