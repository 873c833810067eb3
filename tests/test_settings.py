"""params.yaml against its schema: a table of malformed files, each rejected with the right one-line message."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from jem.config.errors import ConfigError
from jem.config.settings import validate_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def edit(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    params = copy.deepcopy(PARAMS)
    fn(params)
    return params


def setitem(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(params: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        d = params
        for key in parents:
            d = d.setdefault(key, {}) if isinstance(d.get(key), dict) or key not in d else d[key]
        d[last] = value
    return fn


def delitem(path: str) -> Callable[[dict[str, Any]], None]:
    def fn(params: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        d = params
        for key in parents:
            d = d[key]
        del d[last]
    return fn


def both(*fns: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def fn(params: dict[str, Any]) -> None:
        for f in fns:
            f(params)
    return fn


MALFORMED = [
    # a table names a method that is not defined
    (setitem("tables.sadajem_table1", ["sadajem_k5", "sadajem_k50"]), r"tables.sadajem_table1: 'sadajem_k50' is not defined \(did you mean 'sadajem_k5'\?\)"),
    (setitem("tables.demo", []), r"tables.demo = \[\]: expected a non-empty list of distinct method names"),
    # seeds: a list of distinct integers, and the only place a training seed is set
    (setitem("seeds", []), r"^seeds = \[\]: expected a non-empty list of integers >= 0"),
    (setitem("seeds", [1, "2"]), r"^seeds = \[1, '2'\]: expected a non-empty list of integers >= 0"),
    (setitem("seeds", [1, 1]), r"^seeds lists a seed twice: \[1, 1\]"),
    (setitem("methods.sadajem_k5.train", {"seed": 3}), r"^methods.sadajem_k5.train.seed .*comes from the top-level `seeds`"),
    (setitem("methods.jem_k20.recovery", {"enabled": "no"}), r"methods.jem_k20.recovery.enabled = 'no': expected true or false"),
    # unknown keys, with a "did you mean"
    (setitem("robustnes", {}), r"params.yaml.robustnes: unknown key \(did you mean 'robustness'\?\)"),
    (setitem("methods.sadajem_k5.sampler.stpes", 3), r"methods.sadajem_k5.sampler.stpes: unknown key \(did you mean 'steps'\?\)"),
    (setitem("evaluate.ece_bin", 15), r"evaluate.ece_bin: unknown key \(did you mean 'ece_bins'\?\)"),
    (setitem("scales.demo.robustness.bpda.eps", [8]), r"scales.demo.robustness.bpda.eps: unknown key"),
    (setitem("scales.demo.varaint", {}), r"scales.demo.varaint: unknown key \(did you mean 'variant'\?\)"),
    (setitem("datasets.cifar10.demo.tran", 10), r"datasets.cifar10.demo.tran: unknown key \(did you mean 'train'\?\)"),
    # wrong types
    (setitem("methods.sadajem_k5.optim.rho", "big"), r"methods.sadajem_k5.optim.rho = 'big': expected a number"),
    (setitem("sample.buffer", 2.5), r"sample.buffer = 2.5: expected an integer"),
    (setitem("data.download", "yes"), r"data.download = 'yes': expected true or false"),
    (setitem("robustness.linf", 8), r"robustness.* = 8: expected a list"),
    (setitem("evaluate.landscape", [1]), r"evaluate.*landscape = \[1\]: expected a mapping of LandscapeSettings"),
    # out of range
    (setitem("methods.sadajem_k5.optim.rho", -0.1), r"methods.sadajem_k5.optim.rho = -0.1: expected a value >= 0"),
    (setitem("methods.sadajem_k5.sampler.steps", 0), r"methods.sadajem_k5.sampler.steps = 0: expected an integer >= 1"),
    (setitem("defaults.buffer.reinit_freq", 1.5), r"methods.\w+.buffer.reinit_freq = 1.5: expected a fraction in \[0, 1\]"),
    (setitem("evaluate.landscape.fraction", 0), r"^evaluate.landscape.fraction = 0.0: expected a fraction in \(0, 1\]"),
    (setitem("scales.demo.evaluate.landscape.points", 0), r"^scales.demo.evaluate.landscape.points = 0: expected an"),
    (setitem("robustness.bpda.chains", 0), r"robustness.*bpda.chains = 0: expected an integer >= 1"),
    (setitem("robustness.bpda.sampler", {"noise": -1}), r"robustness.*bpda.sampler.noise = -1.0: expected a value >= 0"),
    (setitem("fid.sets", ["buffer", "best"]), r"fid.sets = \['buffer', 'best'\]: expected a non-empty list of buffer"),
    (setitem("fid.protocol", {"default": "whole", "sadajem": "top10"}),
     r"^fid.protocol.sadajem = 'top10': expected one of whole, sadajem$"),
    (setitem("fid.is_ratio", 0), r"^fid.is_ratio = 0.0: expected a fraction in \(0, 1\]$"),
    (setitem("fid.protocol", {"sadajm": "whole"}), r"^fid.protocol: 'sadajm' is not defined \(did you mean 'sadajem'\?\)$"),
    (setitem("fid.reference_splits_by_role", {"cifar100": ["train", "tset"]}),
     r"^fid.reference_splits_by_role.cifar100 = \['train', 'tset'\]: expected a non-empty list of train"),
    (setitem("robustness.success", "last"), r"^robustness.success = 'last': expected 'any_iterate' or 'final'$"),
    (setitem("robustness.linf_step", 0), r"^robustness.linf_step = 0.0: expected a step > 0, or null"),
    (setitem("evaluate.input_noise", {"default": 0.0, "jem": -0.03}),
     r"^evaluate.input_noise.jem = -0.03: expected a noise std >= 0$"),
    (setitem("evaluate.input_noise", {"jemm": 0.03}), r"^evaluate.input_noise: 'jemm' is not defined \(did you mean"),
    (setitem("datasets.cifar10.demo.image_size", 30), r"^datasets.cifar10.demo.image_size = 30: expected a multiple of 4"),
    (setitem("datasets.cifar10.paper.image_size", 16), r"^datasets.cifar10.paper.image_size = 16: expected 32: the cifar10"),
    (setitem("datasets.svhn.demo.image_size", 16),
     r"^datasets.svhn.demo.image_size = 16: methods.\w+ trains 32x32 images \(model.image_size at scale demo\)"),
    (setitem("datasets.svhn.demo.crop", "none"), r"^datasets.svhn.demo.crop = 'none': expected 'center', or 'none' for"),
    (setitem("run.device", "gpu"), r"run.device = 'gpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (setitem("run.nnodes", 2), r"run.rdzv_endpoint = '': expected host:port of the rendezvous"),
    (setitem("run.rdzv_endpoint", "node1"), r"run.rdzv_endpoint = 'node1': expected host:port"),
    (setitem("run.perf", "fast"), r"run.perf = 'fast': expected 'auto' or 'safe', or a mapping"),
    (setitem("datasets.cifar10.demo.val", 5000), r"datasets.cifar10.demo.val = 5000: expected fewer than train \(4000\)"),
    # unknown names
    (setitem("variants", ["softmax", "sadajem_k50"]), r"variants: 'sadajem_k50' is not defined \(did you mean 'sadajem_k5'\?\)"),
    (setitem("scale", "papr"), r"scale: 'papr' is not defined \(did you mean 'paper'\?\)"),
    (setitem("methods.sadajem_k5.family", "sadajm"), r"methods.sadajem_k5.family: 'sadajm' is not defined \(did you mean 'sadajem'\?\)"),
    (setitem("methods.sadajem_k5.dataset", "cifar1O"), r"'cifar1O' is not defined \(did you mean 'cifar10'\?\)"),
    (setitem("evaluate.ood_sets", ["svhn", "lsun"]), r"evaluate.ood_sets: 'lsun' is not defined"),
    (setitem("datasets.svhn.demo.source", "svnh"), r"datasets.svhn.demo.source = 'svnh': expected one of shapes"),
    (delitem("datasets.celeba.demo"), r"datasets.celeba: 'demo' is not defined"),
    # incoherent combinations
    (setitem("methods.softmax.objective", {"energy_l2": 1.0}), r"methods.softmax.objective.energy_l2 = 1.0: has no effect without"),
    (setitem("scales.demo.variant.buffer", {"size": 12}), r"methods.\w+.train.px_batch_size = 16: must not exceed buffer.size \(12\)"),
    (both(setitem("methods.sadajem_k5.optim.sam", "asam"), setitem("methods.sadajem_k5.optim.rho", 0.0)),
     r"methods.sadajem_k5.optim.rho = 0.0: expected a value > 0 when sam is enabled"),
    (setitem("methods.jem_k20.optim.nesterov", True), r"methods.jem_k20.optim.nesterov = true: needs name 'sgd'"),
    (setitem("methods.sadajem_k5.dataset", "svhn"), r"methods.sadajem_k5.dataset = 'svhn': datasets.svhn.demo has no num_classes"),
    (setitem("methods.c100_jem_k20.model", {"dropout": 1.5}), r"methods.c100_jem_k20.model.dropout = 1.5: expected a value in \[0, 1\)"),
]


@pytest.mark.parametrize("mutate,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_params_are_rejected_with_one_line(mutate, message):
    params = edit(mutate)
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    text = str(info.value)
    assert "\n" not in text
    assert re.search(message, text), text


def test_the_shipped_params_are_valid_at_every_scale():
    for scale in PARAMS["scales"]:
        validate_params({**PARAMS, "scale": scale})
