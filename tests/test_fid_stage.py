"""The fid_ref and fid stages compute and store real IS/FID numbers when an Inception network is there.

The published weights cannot be downloaded here, so the network gets random weights; what
is checked is the stages' plumbing (reference statistics cached, every sample set scored,
numbers recorded), the metrics themselves being checked in test_eval_metrics.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import stages.fid as fid_stage
from jem.data.datasets import save_split
from jem.evaluation.inception import FIDInception, GaussianStats, fid_inception_architecture, random_inception_state
from pipeline.outputs import read_metrics

from .conftest import ROOT


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["scale"] = "tiny"
    params["scales"]["tiny"]["fid"] = {"reference_max": 24, "batch_size": 8, "splits": 2, "is_ratio": 0.5}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rng = np.random.default_rng(0)
    data = tmp_path / "data" / "tiny" / "cifar10"
    for split, n in (("train", 12), ("val", 4), ("test", 12)):
        save_split(data / f"{split}.npz", rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                   np.arange(n, dtype=np.int64) % 10)
    (data / "meta.json").write_text(json.dumps({"role": "cifar10", "source": "shapes", "counts": {}}))
    samples = tmp_path / "samples" / "tiny" / "sadajem_k5"
    samples.mkdir(parents=True)
    # the classifier's predictions: 10 buffer images in classes 0 (5 images) and 1 (5 images)
    np.savez(samples / "samples.npz", buffer=rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8),
             fresh=rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),
             pred_buffer=np.array([0, 1] * 5), conf_buffer=np.linspace(0.9, 0.5, 10),
             pred_fresh=np.zeros(4, dtype=np.int64), conf_fresh=np.full(4, 0.5))
    (samples / "info.json").write_text(json.dumps({"variant": "sadajem_k5", "dataset": "cifar10",
                                                   "generative": True}))
    net = fid_inception_architecture()
    net.load_state_dict(random_inception_state(seed=0))  # the published weights are not here
    model = FIDInception(net)
    monkeypatch.setattr(fid_stage, "load_fid_inception", lambda *a, **k: model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


# 24 reference images of 2048 features: a singular covariance, as expected with so few
@pytest.mark.e2e(cost=35)  # Inception's forward passes on the CPU
@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore:invalid value encountered")
def test_reference_then_score_record_real_numbers(workspace: Path):
    fid_stage.reference(argparse.Namespace(data=Path("data/tiny/cifar10"), out=Path("fid_ref/tiny/cifar10"),
                                           config=None, inputs=None))
    info = json.loads((workspace / "fid_ref/tiny/cifar10/info.json").read_text())
    assert info["status"] == "ok" and info["images"] == 24 and info["splits"] == ["train", "val", "test"]
    ref = GaussianStats.load(workspace / "fid_ref/tiny/cifar10/stats.npz")
    assert ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048) and ref.n == 24

    fid_stage.score(argparse.Namespace(samples=Path("samples/tiny/sadajem_k5"), ref=Path("fid_ref/tiny"),
                                       metrics=Path("metrics/tiny/fid/sadajem_k5.json"),
                                       config=None, inputs=None))
    metrics = read_metrics(workspace / "metrics/tiny/fid/sadajem_k5.json")  # numbers and notes joined
    assert metrics["status"] == "ok" and metrics["reference"] == "cifar10 (24 images)"
    assert metrics["protocol"] == "sadajem"  # sadajem_k5's family protocol
    for key, n in (("buffer", 10), ("fresh", 4)):
        assert metrics[key]["n"] == n
        whole = metrics[key]["protocols"]["whole"]
        assert whole["is_n"] == whole["fid_n"] == n and whole["is_splits"] == 2  # fid.splits: 2 in the fixture
        assert math.isfinite(whole["fid"]) and whole["fid"] >= 0
        assert 1.0 - 1e-9 <= whole["is"] <= 1008
    # sadajem protocol on the buffer: per class int(5 * 0.5) = 2 for IS and int(5 * 0.9) = 4 for FID
    sada = metrics["buffer"]["protocols"]["sadajem"]
    assert (sada["is_n"], sada["fid_n"]) == (4, 8)
    assert metrics["buffer"]["is"] == sada["is"] and metrics["buffer"]["fid"] == sada["fid"]
    assert math.isfinite(sada["fid"]) and math.isfinite(sada["is"]) and sada["is_splits"] == 2
    # fresh: int(4 * 0.5) = 2 images for IS, 3 for FID
    fresh = metrics["fresh"]["protocols"]["sadajem"]
    assert (fresh["is_n"], fresh["fid_n"]) == (2, 3)


def test_unavailable_reference_is_carried_to_the_score(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    from jem.evaluation.inception import InceptionUnavailable

    def missing(*args, **kwargs):
        raise InceptionUnavailable("Inception weights not found at weights/x.pth; download it")

    monkeypatch.setattr(fid_stage, "load_fid_inception", missing)
    fid_stage.reference(argparse.Namespace(data=Path("data/tiny/cifar10"), out=Path("fid_ref/tiny/cifar10"),
                                           config=None, inputs=None))
    assert not (workspace / "fid_ref/tiny/cifar10/stats.npz").exists()
    fid_stage.score(argparse.Namespace(samples=Path("samples/tiny/sadajem_k5"), ref=Path("fid_ref/tiny"),
                                       metrics=Path("m.json"), config=None, inputs=None))
    metrics = read_metrics(workspace / "m.json")
    assert metrics["status"] == "unavailable" and "weights/x.pth" in metrics["reason"]
    assert set(metrics) == {"variant", "seed", "status", "reason"} and metrics["seed"] is None  # no number at all
    assert json.loads((workspace / "m.json").read_text()) == {}  # the metrics file: numbers only, so empty
