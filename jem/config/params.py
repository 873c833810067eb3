"""Resolve a named variant from the params file: defaults <- family <- method block <- scale.

The params file (``params.yaml``) holds:

* ``scale``: which scale runs (``demo``, ``paper``, or ``tiny`` for the test suite);
* ``variants``: the method names that run;
* ``defaults``: settings shared by every method;
* ``families``: the settings of each method family (jem, jempp, sadajem, softmax);
* ``methods``: one block per variant: its ``family`` and what differs from it;
* ``scales.<scale>.variant``: settings applied to every variant at that scale (e.g. a small
  model and a short schedule for the demo);
* ``datasets.<role>.<scale>``: how each dataset role (cifar10, cifar100, svhn, celeba) is
  made at each scale: the real dataset at the paper scale, an embedded procedural set at
  the demo scale. A method names the role it trains on (``dataset``).

This module only reads dicts; loading the YAML file is the caller's business.
"""

from __future__ import annotations

import difflib
from typing import Any

from jem.config.errors import ConfigError
from jem.config.variant import Variant, deep_merge


def lookup(mapping: Any, key: str, where: str) -> Any:
    """``mapping[key]`` or a one-line error naming the closest defined key."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {mapping!r}")
    if key not in mapping:
        close = difflib.get_close_matches(str(key), [str(k) for k in mapping], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; defined: {', '.join(sorted(map(str, mapping)))}"
        raise ConfigError(f"{where}: '{key}' is not defined{hint}")
    return mapping[key]


def scale_name(params: dict[str, Any], scale: str | None = None) -> str:
    name = scale or params.get("scale")
    lookup(params.get("scales", {}), str(name), "scale")
    return str(name)


def dataset_spec(params: dict[str, Any], role: str, scale: str | None = None) -> dict[str, Any]:
    scale = scale_name(params, scale)
    spec = lookup(lookup(params.get("datasets", {}), role, "datasets"), scale, f"datasets.{role}")
    if not isinstance(spec, dict) or "source" not in spec:
        raise ConfigError(f"datasets.{role}.{scale}: expected a mapping with a 'source' key")
    return spec


def variant_dataset(params: dict[str, Any], name: str, scale: str | None = None) -> str:
    """The dataset role a variant trains on."""
    return str(variant_dict(params, name, scale, num_classes=0)["dataset"])


def variant_dict(params: dict[str, Any], name: str, scale: str | None = None,
                 num_classes: int | None = None) -> dict[str, Any]:
    """The merged variant block. ``num_classes`` defaults to the dataset spec's."""
    scale = scale_name(params, scale)
    method = lookup(params.get("methods", {}), name, "variant")
    if not isinstance(method, dict):
        raise ConfigError(f"methods.{name} = {method!r}: expected a mapping")
    family = method.get("family")
    if family is None:
        raise ConfigError(f"methods.{name}: missing 'family' (one of {', '.join(params.get('families', {}))})")
    base = lookup(params.get("families", {}), family, f"methods.{name}.family")
    merged = deep_merge(deep_merge(params.get("defaults", {}), base), method)
    scale_variant = (params["scales"][scale] or {}).get("variant") or {}
    merged = deep_merge(merged, scale_variant)
    merged["name"] = name
    if "seed" in (method.get("train") or {}) or "seed" in (scale_variant.get("train") or {}):
        raise ConfigError(f"methods.{name}.train.seed (or scales.{scale}.variant.train.seed): the training seed "
                          "comes from the top-level `seeds` list; remove the key and list the seeds there")
    role = merged.setdefault("dataset", "cifar10")
    if num_classes is None:  # 0: the caller does not need it
        spec = dataset_spec(params, role, scale)
        if "num_classes" not in spec:
            raise ConfigError(f"datasets.{role}.{scale}: a training dataset needs num_classes")
        num_classes = int(spec["num_classes"])
    model = dict(merged.get("model", {}))
    model["num_classes"] = num_classes
    merged["model"] = model
    return merged


def resolve_variant(params: dict[str, Any], name: str, scale: str | None = None,
                    num_classes: int | None = None) -> Variant:
    return Variant.from_dict(variant_dict(params, name, scale, num_classes), where=f"methods.{name}")


def selected_seeds(params: dict[str, Any]) -> list[int]:
    """The training seeds every variant runs with (``seeds``; one run per variant and seed)."""
    seeds = params.get("seeds", [1])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"seeds = {seeds!r}: expected a non-empty list of integers >= 0, e.g. [1, 2, 3]")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds lists a seed twice: {seeds}")
    return list(seeds)


def run_name(variant: str, seed: int) -> str:
    """One training run of a variant: ``<variant>/seed<seed>``, the folder its outputs go to."""
    return f"{variant}/seed{seed}"


def split_run(name: str) -> tuple[str, int | None]:
    """``run_name``'s inverse; a bare variant name gives (name, None)."""
    variant, sep, seed = name.partition("/seed")
    return (variant, int(seed)) if sep and seed.isdigit() else (name, None)


def selected_variants(params: dict[str, Any]) -> list[str]:
    names = params.get("variants")
    if not isinstance(names, list) or not names:
        raise ConfigError(f"variants = {names!r}: expected a non-empty list of method names")
    for n in names:
        lookup(params.get("methods", {}), n, "variants")
    if len(set(names)) != len(names):
        raise ConfigError(f"variants lists a name twice: {names}")
    return names
