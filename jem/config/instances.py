"""What each DVC stage instance reads from the params file, resolved: one small mapping per
instance (``train@jempp_m10``, ``evaluate@softmax``, ``prepare@cifar100``...).

A variant's settings are spread over ``defaults``, ``families``, ``methods``, ``scales`` and the
stage sections, with per-family tables inside the sections (``evaluate.input_noise``,
``fid.protocol``). DVC can only track params by key, so a stage that declared the sections it
touches would rerun whenever any variant's part of them changed. Instead the ``configure``
stage writes, per instance, exactly what that instance reads, resolved for its variant and
scale; each instance declares its own file as its params, and DVC compares the values. The
stages take their settings from these same functions, so what DVC tracks is what they use.

Every mapping holds plain YAML types (lists, not tuples), so it compares equal to the file the
configure stage wrote once read back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jem.config.errors import ConfigError
from jem.config.params import (
    dataset_spec,
    lookup,
    resolve_variant,
    run_name,
    scale_name,
    selected_seeds,
    selected_variants,
    split_run,
)
from jem.config.settings import section
from jem.config.variant import BufferConfig, ObjectiveConfig, SamplerConfig

# the stage kinds with one instance per dataset role, per variant, or one in all
PER_ROLE = ("prepare", "gmm", "fid_ref")
PER_VARIANT = ("train", "sample", "evaluate", "fid", "robustness")
SINGLE = ("report",)
KINDS = (*PER_ROLE, *PER_VARIANT, *SINGLE)
TRAINING_ROLES = ("cifar10", "cifar100")  # the gmm and fid_ref stages' roles (dvc.yaml)


def plain(value: Any) -> Any:
    """The value as YAML/JSON gives it back: tuples become lists, keys strings."""
    return json.loads(json.dumps(value))


def _family_entry(table: dict[str, Any], family: str, fallback: Any) -> Any:
    return table.get(family, table.get("default", fallback))


def _method_family(params: dict[str, Any], variant: str) -> str:
    return str(lookup(params.get("methods", {}), variant, "variant").get("family", ""))


def instance_settings(params: dict[str, Any], kind: str, name: str = "", scale: str | None = None) -> dict[str, Any]:
    """The settings stage instance ``<kind>@<name>`` reads (``name``: a dataset role for
    prepare and fid_ref, a variant for the per-variant stages, a run ``<variant>/seed<seed>``
    for train (a bare variant name: the first of ``seeds``), empty for the report)."""
    scale = scale_name(params, scale)
    if kind == "prepare":
        data = dataclasses.asdict(section(params, "data", scale))
        return plain({"dataset": dataset_spec(params, name, scale), "data": data})
    if kind == "gmm":
        return plain({"splits": section(params, "gmm", scale).splits})
    if kind == "fid_ref":
        fid = section(params, "fid", scale)
        splits = fid.reference_splits_by_role.get(name, fid.reference_splits)
        return plain({"weights": fid.weights, "download": section(params, "data", scale).download,
                      "reference_splits": splits, "reference_max": fid.reference_max, "batch_size": fid.batch_size})
    if kind == "train":
        name, seed = split_run(name)
        variant = resolve_variant(params, name, scale)
        seed = selected_seeds(params)[0] if seed is None else seed
        variant = dataclasses.replace(variant, train=dataclasses.replace(variant.train, seed=seed))
        if not variant.uses_sampler:
            # a classifier trained without p(x) builds no sampler and no replay buffer
            # (jem.method.train): their keys stay at the defaults, so editing them does not retrain it
            objective = ObjectiveConfig(generative=False, clf_weight=variant.objective.clf_weight,
                                        input_noise=variant.objective.input_noise)
            variant = dataclasses.replace(variant, sampler=SamplerConfig(), buffer=BufferConfig(), objective=objective)
        return plain({"variant": variant.to_dict(), "val_every": section(params, "train", scale).val_every})
    if kind in ("sample", "robustness"):
        return plain(dataclasses.asdict(section(params, kind, scale)))
    if kind == "evaluate":
        cfg = dataclasses.asdict(section(params, "evaluate", scale))
        role = resolve_variant(params, name, scale).dataset
        cfg["input_noise"] = float(_family_entry(cfg["input_noise"], _method_family(params, name), 0.0))
        cfg["ood_sets"] = [r for r in cfg["ood_sets"] if r != role]  # the training role is not OOD for itself
        return plain(cfg)
    if kind == "fid":
        fid = section(params, "fid", scale)
        return plain({"weights": fid.weights, "download": section(params, "data", scale).download,
                      "sets": fid.sets, "splits": fid.splits, "batch_size": fid.batch_size,
                      "protocol": str(_family_entry(fid.protocol, _method_family(params, name), "whole")),
                      "is_ratio": fid.is_ratio, "fid_ratio": fid.fid_ratio})
    if kind == "report":
        return plain({"scale": scale, "variants": selected_variants(params), "seeds": selected_seeds(params),
                      "ood_sets": section(params, "evaluate", scale).ood_sets,
                      "fid_set": section(params, "fid", scale).sets[0],
                      "methods": sorted(params.get("methods", {}))})
    raise ConfigError(f"no stage kind {kind!r}; one of {', '.join(KINDS)}")


def instances(params: dict[str, Any], scale: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Every stage instance of the DAG at ``scale`` and its settings: (kind, name) -> mapping."""
    scale = scale_name(params, scale)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for role in params.get("datasets", {}):
        out["prepare", role] = instance_settings(params, "prepare", role, scale)
    for role in TRAINING_ROLES:
        out["gmm", role] = instance_settings(params, "gmm", role, scale)
        out["fid_ref", role] = instance_settings(params, "fid_ref", role, scale)
    for variant in selected_variants(params):
        for seed in selected_seeds(params):  # train: one instance per seed, the others read the seed's model
            out["train", run_name(variant, seed)] = instance_settings(params, "train", run_name(variant, seed), scale)
        for kind in PER_VARIANT[1:]:
            out[kind, variant] = instance_settings(params, kind, variant, scale)
    out["report", ""] = instance_settings(params, "report", "", scale)
    return out
