"""Resolve a named variant from the params file: defaults <- method block <- scale override.

The params file (``params.yaml``) holds:

* ``scale``: which scale runs (``demo`` or ``paper``);
* ``variants``: the method names that run;
* ``defaults``: settings shared by every method;
* ``methods``: one block per variant, holding only what differs from ``defaults``;
* ``scales.<scale>``: ``datasets`` (maps a method's dataset to the one used at this scale)
  and ``override`` (settings applied to every variant at this scale, e.g. a small model
  and short schedule for the demo);
* ``datasets.<name>.num_classes`` and ``image_size``.

This module only reads dicts; loading the YAML file is the caller's business.
"""

from __future__ import annotations

import difflib
from typing import Any

from jem.config import ConfigError, Variant, deep_merge


def _lookup(mapping: dict[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        close = difflib.get_close_matches(key, list(mapping), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; defined: {', '.join(sorted(mapping))}"
        raise ConfigError(f"{where}: '{key}' is not defined{hint}")
    return mapping[key]


def scale_of(params: dict[str, Any], scale: str | None = None) -> dict[str, Any]:
    name = scale or params.get("scale")
    if not isinstance(name, str):
        raise ConfigError(f"scale = {name!r}: expected one of {', '.join(params.get('scales', {}))}")
    return _lookup(params.get("scales", {}), name, "scale")


def dataset_for(params: dict[str, Any], method_dataset: str, scale: str | None = None) -> str:
    """The dataset a method trains on at this scale (the demo maps every dataset to its own)."""
    mapping = scale_of(params, scale).get("datasets", {})
    return mapping.get(method_dataset, method_dataset)


def variant_dict(params: dict[str, Any], name: str, scale: str | None = None) -> dict[str, Any]:
    method = _lookup(params.get("methods", {}), name, "variant")
    if not isinstance(method, dict):
        raise ConfigError(f"methods.{name} = {method!r}: expected a mapping")
    merged = deep_merge(params.get("defaults", {}), method)
    merged = deep_merge(merged, scale_of(params, scale).get("override", {}))
    merged["name"] = name
    dataset = dataset_for(params, merged.get("dataset", "cifar10"), scale)
    merged["dataset"] = dataset
    spec = _lookup(params.get("datasets", {}), dataset, f"methods.{name}.dataset")
    model = dict(merged.get("model", {}))
    model["num_classes"] = spec["num_classes"]
    model["image_size"] = spec.get("image_size", 32)
    merged["model"] = model
    return merged


def resolve_variant(params: dict[str, Any], name: str, scale: str | None = None) -> Variant:
    return Variant.from_dict(variant_dict(params, name, scale), where=f"methods.{name}")


def selected_variants(params: dict[str, Any]) -> list[str]:
    names = params.get("variants")
    if not isinstance(names, list) or not names:
        raise ConfigError(f"variants = {names!r}: expected a non-empty list of method names")
    for n in names:
        _lookup(params.get("methods", {}), n, "variants")
    if len(set(names)) != len(names):
        raise ConfigError(f"variants lists a name twice: {names}")
    return names
