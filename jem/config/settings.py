"""The schema of the whole params file: every section, key, type and range, checked up front.

``validate_params(params)`` raises ``ConfigError`` with one line naming the key, the value
and what is allowed, for: unknown keys (with a "did you mean"), wrong types, out-of-range
values, unknown variant or dataset names, and incoherent combinations. It checks every
scale's overrides and resolves every variant listed in ``variants`` at the current scale, so
a typo anywhere fails before any stage touches its outputs.

The stage sections are dataclasses like the variant description (``jem.config.variant``); the
stages read them as plain dicts (``stage_section``) once they are valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from jem.config.errors import ConfigError
from jem.config.params import lookup, resolve_variant, scale_name, selected_seeds, selected_variants, variant_dataset
from jem.config.variant import PERF_PRESETS, PerfConfig, SamplerConfig, Variant, _build, _check, deep_merge

SELECT = ("last", "best_val")
SOURCES_PROCEDURAL = ("shapes", "glyphs", "clouds", "gratings")
SOURCES_REAL = ("cifar10", "cifar100", "svhn", "celeba")
SAMPLE_SETS = ("buffer", "fresh", "conditional")
SPLITS = ("train", "val", "test")
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "databricks")
# which images of a sample set IS and FID score (jem.evaluation.inception.protocol_indices)
PROTOCOLS = ("whole", "sadajem")


@dataclass
class RunSettings:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0
    deterministic: bool = False
    nproc: int = 1  # training processes per machine (torchrun, one GPU each): data parallel when > 1
    nnodes: int = 1  # machines of one training run (torchrun --nnodes, c10d rendezvous)
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous (any one of the machines), when nnodes > 1
    rdzv_id: str = ""  # rendezvous id shared by the machines of one run; empty: jem-<variant>
    # MLflow tracking store: empty = <repo>/mlflow.db; e.g. http://mlflow.lab:5000 (MLFLOW_TRACKING_URI wins)
    tracking_uri: str = ""
    # auto (the fastest verified configuration for the device) | safe | a mapping of PerfConfig switches
    perf: Any = "auto"

    def validate(self, where: str) -> None:
        if isinstance(self.perf, dict):
            self.perf = _build(PerfConfig, self.perf, f"{where}.perf")
        if isinstance(self.perf, PerfConfig):
            self.perf.validate(f"{where}.perf")
        else:
            _check(self.perf in PERF_PRESETS, where, "perf", self.perf,
                   f"{' or '.join(repr(p) for p in PERF_PRESETS)}, or a mapping of switches ("
                   f"{', '.join(PerfConfig.__dataclass_fields__)})")
        _check(self.nproc >= 1, where, "nproc", self.nproc, "an integer >= 1")
        _check(self.nnodes >= 1, where, "nnodes", self.nnodes, "an integer >= 1")
        if self.rdzv_endpoint or self.nnodes > 1:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            _check(bool(host) and port.isdigit(), where, "rdzv_endpoint", self.rdzv_endpoint,
                   "host:port of the rendezvous (e.g. node1:29400) when run.nnodes > 1")
        ok = self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        _check(ok, where, "device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        _check(self.threads >= 0, where, "threads", self.threads, "an integer >= 0 (0 = torch's default)")
        _check(self.tracking_uri == "" or self.tracking_uri.split(":", 1)[0] in TRACKING_SCHEMES, where,
               "tracking_uri", self.tracking_uri,
               "empty (the repository's mlflow.db) or a URI of " + ", ".join(f"{s}:" for s in TRACKING_SCHEMES))


@dataclass
class TrainSettings:
    val_every: int = 1

    def validate(self, where: str) -> None:
        _check(self.val_every >= 1, where, "val_every", self.val_every, "an integer >= 1 (epochs)")


@dataclass
class SampleSettings:
    select: str = "last"
    buffer: int = 10000
    fresh: int = 10000
    fresh_steps: int | None = None
    per_class: int = 10
    grid: int = 100
    ranked: int = 8

    def validate(self, where: str) -> None:
        _check(self.select in SELECT, where, "select", self.select, "'last' or 'best_val'")
        for key in ("buffer", "fresh", "per_class", "ranked"):
            _check(getattr(self, key) >= 0, where, key, getattr(self, key), "an integer >= 0")
        _check(self.fresh_steps is None or self.fresh_steps >= 1, where, "fresh_steps", self.fresh_steps,
               "an integer >= 1, or null for the variant's steps")
        _check(self.grid >= 1, where, "grid", self.grid, "an integer >= 1")


@dataclass
class LandscapeSettings:
    fraction: float = 0.1
    points: int = 21
    span: float = 1.0
    seed: int = 0

    def validate(self, where: str) -> None:
        _check(0 < self.fraction <= 1, where, "fraction", self.fraction, "a fraction in (0, 1]")
        _check(self.points >= 1, where, "points", self.points, "an integer >= 1")
        _check(self.span > 0, where, "span", self.span, "a value > 0")


@dataclass
class EvaluateSettings:
    select: str = "last"
    batch_size: int = 500
    ece_bins: int = 20
    ood_sets: list[str] = field(default_factory=lambda: ["svhn", "interp", "cifar100", "celeba"])
    ood_max: int | None = None
    seed: int = 0
    # std of Gaussian noise on test and OOD inputs ([-1, 1] scale), per family ("default": the rest)
    input_noise: dict[str, float] = field(default_factory=lambda: {"default": 0.0})
    landscape: LandscapeSettings = field(default_factory=LandscapeSettings)

    def validate(self, where: str) -> None:
        _check(self.select in SELECT, where, "select", self.select, "'last' or 'best_val'")
        _check(self.batch_size >= 1, where, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.ece_bins >= 1, where, "ece_bins", self.ece_bins, "an integer >= 1")
        _check(self.ood_max is None or self.ood_max >= 1, where, "ood_max", self.ood_max,
               "an integer >= 1, or null for every image")
        _check(isinstance(self.input_noise, dict), where, "input_noise", self.input_noise,
               "a mapping of family name (or 'default') to a noise std")
        for family, sigma in self.input_noise.items():
            ok = isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma >= 0
            _check(ok, f"{where}.input_noise", str(family), sigma, "a noise std >= 0")
        self.landscape.validate(f"{where}.landscape")


@dataclass
class FidSettings:
    weights: str = "weights/pt_inception-2015-12-05-6726825d.pth"
    sets: list[str] = field(default_factory=lambda: ["buffer", "fresh"])
    reference_splits: list[str] = field(default_factory=lambda: list(SPLITS))
    reference_splits_by_role: dict[str, list[str]] = field(default_factory=dict)  # role -> splits
    reference_max: int | None = None
    batch_size: int = 200
    splits: int | None = None  # IS splits; null = the reference scripts' max(1, n // 5000)
    # which images are scored, per family ("default" for the others): PROTOCOLS
    protocol: dict[str, str] = field(default_factory=lambda: {"default": "whole", "sadajem": "sadajem"})
    is_ratio: float = 0.1  # sadajem protocol: most confident fraction per predicted class for IS
    fid_ratio: float = 0.9  # ... and for FID

    def validate(self, where: str) -> None:
        _check(bool(self.sets) and set(self.sets) <= set(SAMPLE_SETS), where, "sets", self.sets,
               f"a non-empty list of {', '.join(SAMPLE_SETS)}")
        _check(bool(self.reference_splits) and set(self.reference_splits) <= set(SPLITS), where,
               "reference_splits", self.reference_splits, f"a non-empty list of {', '.join(SPLITS)}")
        _check(isinstance(self.reference_splits_by_role, dict), where, "reference_splits_by_role",
               self.reference_splits_by_role, "a mapping of dataset role to a list of splits")
        for role, splits in self.reference_splits_by_role.items():
            _check(isinstance(splits, list) and bool(splits) and set(splits) <= set(SPLITS),
                   f"{where}.reference_splits_by_role", str(role), splits, f"a non-empty list of {', '.join(SPLITS)}")
        _check(isinstance(self.protocol, dict), where, "protocol", self.protocol,
               "a mapping of family name (or 'default') to a protocol")
        for family, name in self.protocol.items():
            _check(name in PROTOCOLS, f"{where}.protocol", str(family), name, f"one of {', '.join(PROTOCOLS)}")
        for key in ("is_ratio", "fid_ratio"):
            _check(0 < getattr(self, key) <= 1, where, key, getattr(self, key), "a fraction in (0, 1]")
        _check(self.reference_max is None or self.reference_max >= 2, where, "reference_max", self.reference_max,
               "an integer >= 2, or null for every image")
        _check(self.batch_size >= 1, where, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.splits is None or self.splits >= 1, where, "splits", self.splits,
               "an integer >= 1, or null for max(1, n // 5000) as the reference scripts")


@dataclass
class BpdaSettings:
    images: int = 1000
    norm: str = "linf"
    epsilons: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0])
    steps: int = 40
    purify_steps: int = 10
    chains: int = 5
    input_noise: float = 0.03
    eot: int = 1
    sampler: dict[str, Any] = field(default_factory=dict)
    rel_stepsize: float | None = None
    batch_size: int | None = None

    def validate(self, where: str) -> None:
        _check(self.images >= 1, where, "images", self.images, "an integer >= 1")
        _check(self.norm in ("linf", "l2"), where, "norm", self.norm, "'linf' or 'l2'")
        _check(all(e > 0 for e in self.epsilons), where, "epsilons", self.epsilons,
               "radii > 0 (L-inf in 1/255, L2 on [0, 1] images), or [] to skip BPDA")
        for key in ("steps", "purify_steps", "chains", "eot"):
            _check(getattr(self, key) >= 1, where, key, getattr(self, key), "an integer >= 1")
        _check(self.input_noise >= 0, where, "input_noise", self.input_noise, "a value >= 0")
        _check(self.rel_stepsize is None or self.rel_stepsize > 0, where, "rel_stepsize", self.rel_stepsize,
               "a value > 0, or null for the PGD setting")
        _check(self.batch_size is None or self.batch_size >= 1, where, "batch_size", self.batch_size,
               "an integer >= 1, or null for robustness.batch_size")
        sampler = _build(SamplerConfig, {**self.sampler, "steps": self.purify_steps}, f"{where}.sampler")
        sampler.validate(f"{where}.sampler")


@dataclass
class RobustnessSettings:
    select: str = "last"
    images: int = 1000
    batch_size: int = 250
    seed: int = 0
    steps: int = 50
    rel_stepsize: float | None = None
    linf_step: float | None = None  # fixed L-inf PGD step in 1/255 (the reference: 2); null = rel_stepsize
    l2_step: float | None = None  # fixed L2 PGD step on [0, 1] images; null = rel_stepsize
    success: str = "any_iterate"  # any_iterate (the reference's accounting) | final (foolbox's last iterate)
    shuffle: bool = False  # attack a seeded random subset of the test set (the reference) instead of the first N
    linf: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 22.0, 30.0])
    l2: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0])
    bpda: BpdaSettings = field(default_factory=BpdaSettings)

    def validate(self, where: str) -> None:
        _check(self.select in SELECT, where, "select", self.select, "'last' or 'best_val'")
        for key in ("images", "batch_size", "steps"):
            _check(getattr(self, key) >= 1, where, key, getattr(self, key), "an integer >= 1")
        _check(self.rel_stepsize is None or self.rel_stepsize > 0, where, "rel_stepsize", self.rel_stepsize,
               "a value > 0, or null for foolbox's default")
        for key in ("linf_step", "l2_step"):
            _check(getattr(self, key) is None or getattr(self, key) > 0, where, key, getattr(self, key),
                   "a step > 0, or null for rel_stepsize times the radius")
        _check(self.success in ("any_iterate", "final"), where, "success", self.success, "'any_iterate' or 'final'")
        _check(all(e > 0 for e in self.linf), where, "linf", self.linf, "radii > 0 in 1/255 (or [] to skip)")
        _check(all(e > 0 for e in self.l2), where, "l2", self.l2, "radii > 0 on [0, 1] images (or [] to skip)")
        self.bpda.validate(f"{where}.bpda")


@dataclass
class DataSettings:
    root: str = "data/raw"
    download: bool = False


@dataclass
class GmmSettings:
    # the splits of a training role the class-wise Gaussians (p0) are fitted on: [train] keeps the
    # validation images unseen by training; [train, val] is train_sadajem.py's (all 50,000 images)
    splits: list[str] = field(default_factory=lambda: ["train"])

    def validate(self, where: str) -> None:
        _check(isinstance(self.splits, list) and "train" in self.splits and len(set(self.splits)) == len(self.splits)
               and all(s in ("train", "val") for s in self.splits), where, "splits", self.splits,
               "[train] or [train, val]")


@dataclass
class DatasetSpec:
    source: str = "shapes"
    num_classes: int | None = None  # set for training datasets
    train: int | None = None  # procedural sources: training pool size (train + val are carved from it)
    val: int = 0  # validation images held out of the training set (model selection)
    test: int | None = None  # procedural: test images; real: a cap on the test split
    interp: int = 0  # pairs averaged into the Interp OOD set (0 = none)
    seed: int = 0
    crop: str = "center"  # CelebA: centre square (center) or the reference's aspect-keeping Resize(32) (none)
    image_size: int = 32  # procedural sources: side of the square images; the real datasets are read at 32

    def validate(self, where: str) -> None:
        if self.source in SOURCES_PROCEDURAL:
            _check(self.image_size >= 8 and self.image_size % 4 == 0, where, "image_size", self.image_size,
                   "a multiple of 4, at least 8")
        else:
            _check(self.image_size == 32, where, "image_size", self.image_size,
                   f"32: the {self.source} loader reads its images at 32x32")
        _check(self.source in SOURCES_PROCEDURAL + SOURCES_REAL, where, "source", self.source,
               f"one of {', '.join(SOURCES_PROCEDURAL + SOURCES_REAL)}")
        _check(self.num_classes is None or self.num_classes >= 2, where, "num_classes", self.num_classes,
               "an integer >= 2 (training datasets), or absent for OOD-only sets")
        _check(self.val >= 0 and self.interp >= 0, where, "val" if self.val < 0 else "interp",
               self.val if self.val < 0 else self.interp, "an integer >= 0")
        _check(self.crop == "center" or (self.crop == "none" and self.source == "celeba"), where, "crop", self.crop,
               "'center', or 'none' for the celeba source (its non-square Resize(32))")
        if self.source in ("shapes", "glyphs"):
            _check(self.num_classes is None or self.num_classes <= 10, where, "num_classes", self.num_classes,
                   f"at most 10 for the procedural {self.source} set")
            _check(self.test is not None and self.test >= 1, where, "test", self.test,
                   "an integer >= 1: the procedural sets need a test size")
        if self.source in ("clouds", "gratings"):
            _check(self.num_classes is None, where, "num_classes", self.num_classes,
                   f"absent: {self.source} is an unlabelled OOD set")
            _check(self.test is not None and self.test >= 1, where, "test", self.test,
                   "an integer >= 1: the procedural sets need a test size")
        if self.num_classes is not None and self.source in SOURCES_PROCEDURAL:
            _check(self.train is not None and self.train >= 1, where, "train", self.train,
                   "an integer >= 1: a procedural training set needs a size")
            _check(self.val < (self.train or 0), where, "val", self.val, f"fewer than train ({self.train})")


SECTIONS: dict[str, type] = {
    "run": RunSettings, "train": TrainSettings, "sample": SampleSettings, "evaluate": EvaluateSettings,
    "fid": FidSettings, "robustness": RobustnessSettings, "data": DataSettings, "gmm": GmmSettings,
}
SCALE_KEYS = ("variant", "sample", "evaluate", "fid", "robustness")
TOP_LEVEL = ("scale", "variants", "seeds", "tables", "scales", "defaults", "families", "methods", "datasets", *SECTIONS)


def _known(d: Any, allowed: tuple[str, ...] | list[str], where: str) -> dict[str, Any]:
    import difflib

    if not isinstance(d, dict):
        raise ConfigError(f"{where} = {d!r}: expected a mapping")
    for key in d:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(allowed)}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")
    return d


def section(params: dict[str, Any], name: str, scale: str) -> Any:
    """The validated settings object of a stage section at ``scale`` (scale overrides merged).

    The section and the scale's override are each checked under their own path in the file
    (``evaluate.x`` or ``scales.demo.evaluate.x``) before the merged result is.
    """
    base = params.get(name) or {}
    override = ((params["scales"][scale] or {}).get(name) or {}) if name in SCALE_KEYS else {}
    for part, where in ((base, name), (override, f"scales.{scale}.{name}")):
        if part:
            settings = _build(SECTIONS[name], part, where)
            if hasattr(settings, "validate"):
                settings.validate(where)
    settings = _build(SECTIONS[name], deep_merge(base, override), name)
    if hasattr(settings, "validate"):
        settings.validate(name)
    return settings


def stage_section(params: dict[str, Any], stage: str, scale: str | None = None) -> dict[str, Any]:
    """A stage's section (``sample``, ``evaluate``...) with the scale's overrides merged in,
    checked against its schema and completed with the defaults."""
    return dataclasses.asdict(section(params, stage, scale_name(params, scale)))


def validate_params(params: Any) -> None:
    """Check the whole params file; raises ``ConfigError`` (one line) at the first problem."""
    params = _known(params, TOP_LEVEL, "params.yaml")
    for key in ("scales", "methods", "families", "datasets"):
        if not isinstance(params.get(key), dict) or not params.get(key):
            raise ConfigError(f"params.yaml: '{key}' must be a non-empty mapping")
    scale = params.get("scale")
    lookup(params["scales"], str(scale), "scale")
    for name, block in params["scales"].items():
        _known(block or {}, SCALE_KEYS, f"scales.{name}")
    roles = list(params["datasets"])
    specs: dict[tuple[str, str], DatasetSpec] = {}
    for role, by_scale in params["datasets"].items():
        for s, spec in _known(by_scale, list(params["scales"]), f"datasets.{role}").items():
            specs[role, s] = _build(DatasetSpec, spec, f"datasets.{role}.{s}")
            specs[role, s].validate(f"datasets.{role}.{s}")
        lookup(by_scale, str(scale), f"datasets.{role}")
    for s in params["scales"]:  # every scale's stage overrides are well-formed
        for name in ("sample", "evaluate", "fid", "robustness"):
            section(params, name, s)
    for name in ("run", "train", "data", "gmm"):
        section(params, name, str(scale))
    evaluate = section(params, "evaluate", str(scale))
    for family in evaluate.input_noise:
        if family != "default":
            lookup(params["families"], str(family), "evaluate.input_noise")
    fid = section(params, "fid", str(scale))
    for family in fid.protocol:
        if family != "default":
            lookup(params["families"], str(family), "fid.protocol")
    for role in fid.reference_splits_by_role:
        lookup(params["datasets"], str(role), "fid.reference_splits_by_role")
    for ood in evaluate.ood_sets:
        if ood != "interp":
            lookup(params["datasets"], ood, "evaluate.ood_sets")
    for name, method in params["methods"].items():  # every block, run or not: a typo is a typo
        if not isinstance(method, dict):
            raise ConfigError(f"methods.{name} = {method!r}: expected a mapping with a 'family'")
        lookup(params["families"], str(method.get("family")), f"methods.{name}.family")
        if params["datasets"].get(method.get("dataset", "cifar10"), {}).get(scale, {}).get("num_classes"):
            _coherent(resolve_variant(params, name, str(scale)), f"methods.{name}")
    tables = params.get("tables") or {}
    if not isinstance(tables, dict):
        raise ConfigError(f"tables = {tables!r}: expected a mapping of table name to a list of method names")
    for table, names in tables.items():
        if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
            raise ConfigError(f"tables.{table} = {names!r}: expected a non-empty list of distinct method names")
        for n in names:
            lookup(params["methods"], str(n), f"tables.{table}")
    selected_seeds(params)
    for name in selected_variants(params):
        role = variant_dataset(params, name, str(scale))
        lookup(params["datasets"], role, f"methods.{name}.dataset")
        if not params["datasets"][role][scale].get("num_classes"):
            labelled = [r for r in roles if (params["datasets"][r].get(scale) or {}).get("num_classes")]
            raise ConfigError(f"methods.{name}.dataset = {role!r}: datasets.{role}.{scale} has no num_classes; "
                              f"a variant trains on a labelled dataset ({', '.join(labelled)})")
        variant = resolve_variant(params, name, str(scale))
        _coherent(variant, f"methods.{name}")
        for other in [role, *(r for r in evaluate.ood_sets if r != "interp")]:  # what the network is shown
            size = specs[other, scale].image_size
            if size != variant.model.image_size:
                raise ConfigError(f"datasets.{other}.{scale}.image_size = {size}: methods.{name} trains "
                                  f"{variant.model.image_size}x{variant.model.image_size} images "
                                  f"(model.image_size at scale {scale}); give every dataset role of a scale "
                                  "the size of its models")


def _coherent(v: Variant, where: str) -> None:
    """Combinations that are each valid but make no sense together."""
    if v.optim.nesterov and (v.optim.name != "sgd" or v.optim.momentum <= 0):
        raise ConfigError(f"{where}.optim.nesterov = true: needs name 'sgd' with momentum > 0 "
                          f"(got {v.optim.name!r}, momentum {v.optim.momentum})")
    if not v.objective.generative:
        if v.objective.energy_l2 > 0:
            raise ConfigError(f"{where}.objective.energy_l2 = {v.objective.energy_l2}: has no effect without the "
                              "generative term (objective.generative: false); set it to 0 or enable generative")
        return
    if v.train.px_batch_size > v.buffer.size:
        raise ConfigError(f"{where}.train.px_batch_size = {v.train.px_batch_size}: must not exceed "
                          f"buffer.size ({v.buffer.size}); the sampler batch is drawn from the buffer")
