"""Mixture statistics against numpy, mixture draws against their moments, the replay buffer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jem.method.buffer import ReplayBuffer
from jem.method.gmm import (
    GaussianMixture,
    MixtureStats,
    UniformInit,
    compute_mixture_stats,
    load_mixture_stats,
    save_mixture_stats,
)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


def test_mixture_statistics_equal_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (203, 3, 2, 2), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (203,), generator=g)
    stats = compute_mixture_stats(_batches(x, y, 17), num_classes=3)  # uneven streaming batches
    xf = x.numpy().reshape(203, -1).astype(np.float64) / 127.5 - 1
    yn = y.numpy()
    for c in range(3):
        xc = xf[yn == c]
        assert stats.counts[c] == len(xc)
        np.testing.assert_allclose(stats.means[c].numpy(), xc.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats.covs[c].numpy(), np.cov(xc, rowvar=False, bias=True),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.priors.numpy(), np.bincount(yn) / 203)
    assert stats.shape == (3, 2, 2)


def test_mixture_statistics_reject_an_empty_class():
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ValueError, match=r"classes \[2\] have no training images"):
        compute_mixture_stats([(x, torch.tensor([0, 1, 0, 1]))], num_classes=3)


def _known_mixture() -> MixtureStats:
    """Two classes in 4 dims with different means and correlated covariances, far inside [-1, 1]."""
    rng = np.random.default_rng(3)
    covs, means = [], []
    for c in range(2):
        a = rng.normal(size=(4, 4)) * 0.05
        covs.append(a @ a.T + 0.001 * np.eye(4))
        means.append(np.full(4, -0.3 + 0.6 * c) + rng.normal(size=4) * 0.05)
    return MixtureStats(counts=torch.tensor([300, 100]), means=torch.tensor(np.array(means)).float(),
                        covs=torch.tensor(np.array(covs)).float(), shape=(1, 2, 2))


@pytest.mark.parametrize("dense", [False, True])
def test_mixture_draws_match_the_moments_and_priors(dense):
    stats = _known_mixture()
    torch.manual_seed(0)
    mix = GaussianMixture(stats, jitter=1e-4)
    n = 200_000
    x, comp = mix.sample(n, dense=dense)
    assert x.shape == (n, 1, 2, 2)
    assert abs((comp == 0).float().mean().item() - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    flat = x.reshape(n, -1).double().numpy()
    for c in range(2):
        xc = flat[comp.numpy() == c]
        expected_cov = stats.covs[c].double().numpy() + 1e-4 * np.eye(4)
        np.testing.assert_allclose(xc.mean(0), stats.means[c].numpy(), atol=4e-3)
        np.testing.assert_allclose(np.cov(xc, rowvar=False), expected_cov, atol=5e-4, rtol=0.03)


def test_mixture_draws_are_clamped_and_class_conditional():
    stats = _known_mixture()
    stats.covs = stats.covs * 400  # wide enough to leave [-1, 1] often
    mix = GaussianMixture(stats)
    x, comp = mix.sample(1000, y=torch.ones(1000, dtype=torch.long))
    assert x.min() >= -1 and x.max() <= 1 and (x.abs() == 1).any()
    assert (comp == 1).all()


def test_mixture_statistics_round_trip_and_shape_check(tmp_path):
    stats = _known_mixture()
    save_mixture_stats(stats, tmp_path / "gmm.pt")
    loaded = load_mixture_stats(tmp_path / "gmm.pt")
    assert torch.equal(loaded.covs, stats.covs) and loaded.shape == stats.shape
    torch.save({"counts": stats.counts, "means": stats.means, "covs": stats.covs[:, :3, :3],
                "shape": [1, 2, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="inconsistent mixture statistics"):
        load_mixture_stats(tmp_path / "bad.pt")


@pytest.mark.parametrize("dense", [False, True])
def test_buffer_reinitialises_the_configured_fraction(dense):
    torch.manual_seed(0)
    buf = ReplayBuffer(1000, UniformInit((3, 2, 2), 10), reinit_freq=0.05, dense_reinit=dense)
    assert buf.samples.min() >= -1 and buf.samples.max() <= 1
    buf.samples.fill_(5.0)  # a value p0 never produces
    n = 40_000
    x, idx, _ = buf.draw(n)
    fresh = (x != 5.0).all(dim=(1, 2, 3)).float().mean().item()
    assert abs(fresh - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)
    assert ((x == 5.0).all(dim=(1, 2, 3)) | (x.abs() <= 1).all(dim=(1, 2, 3))).all()
    assert idx.min() >= 0 and idx.max() < 1000 and len(torch.unique(idx)) > 990


@pytest.mark.parametrize("freq", [0.0, 1.0])
def test_buffer_reinit_extremes(freq):
    buf = ReplayBuffer(50, UniformInit((1, 2, 2), 5), reinit_freq=freq)
    buf.samples.fill_(5.0)
    x, _, _ = buf.draw(500)
    assert ((x == 5.0).all() if freq == 0 else (x.abs() <= 1).all())


def test_buffer_update_writes_back_to_the_drawn_slots():
    buf = ReplayBuffer(20, UniformInit((1, 2, 2), 2), reinit_freq=0.0)
    x, idx, _ = buf.draw(6)
    buf.update(idx, torch.full_like(x, 0.25))
    assert (buf.samples[idx] == 0.25).all()
    others = torch.ones(20, dtype=torch.bool)
    others[idx] = False
    assert (buf.samples[others] != 0.25).all()


@pytest.mark.parametrize("dense", [False, True])
def test_class_conditional_draws_come_from_the_right_class(dense):
    stats = _known_mixture()
    stats.means = torch.stack([torch.full((4,), -0.6), torch.full((4,), 0.6)])  # well separated
    torch.manual_seed(1)
    buf = ReplayBuffer(100, GaussianMixture(stats), reinit_freq=0.3, dense_reinit=dense)
    assert (buf.labels[:50] == 0).all() and (buf.labels[50:] == 1).all()  # filled class by class
    for _ in range(5):  # draws, re-initialisations and write-backs keep the classes apart
        y = torch.randint(0, 2, (64,))
        x, idx, starts = buf.draw(64, y=y)
        side = x.reshape(64, -1).mean(1) > 0
        assert torch.equal(side, y == 1)
        assert torch.equal(starts, y)
        buf.update(idx, x, starts)
        assert torch.equal(buf.labels[idx], y)


def test_update_with_repeated_slots_keeps_the_last_copy():
    """Slots are drawn with replacement; a repeated slot gets its last copy, whatever the threads do."""
    buf = ReplayBuffer(8, UniformInit((1, 1, 1), 2), reinit_freq=0.0)
    idx = torch.tensor([3, 5, 3, 0, 5, 3])
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    labels = torch.tensor([0, 1, 1, 0, 0, 1])
    buf.update(idx, x, labels)
    assert buf.samples[[3, 5, 0]].flatten().tolist() == [5.0, 4.0, 3.0]
    assert buf.labels[[3, 5, 0]].tolist() == [1, 0, 0]


@pytest.mark.e2e(cost=35)
def test_gmm_splits_choose_the_images_p0_is_fitted_on(tmp_path):
    """gmm.splits: [train] (ours: validation images unseen) or [train, val] (train_sadajem.py's 50,000);
    asking for val where there is none stops in one line."""
    import subprocess
    import sys

    import yaml

    from jem.data.datasets import load_split
    from jem.method.gmm import load_mixture_stats

    from .conftest import copy_repo, run_ok, stage_env, write_prepared_shapes

    copy_repo(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["scale"] = "tiny"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env()
    tiny = params["datasets"]["cifar10"]["tiny"]
    write_prepared_shapes(tmp_path / "data" / "tiny" / "cifar10", tiny["train"] + tiny["val"], train=tiny["train"])
    gmm = [sys.executable, "-m", "stages.gmm", "--data", "data/tiny/cifar10"]
    run_ok([*gmm, "--out", "gmm/train"], tmp_path, env)
    params["gmm"] = {"splits": ["train", "val"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_ok([*gmm, "--out", "gmm/both"], tmp_path, env)
    counts = {k: int(load_mixture_stats(tmp_path / "gmm" / k / "stats.pt").counts.sum()) for k in ("train", "both")}
    sizes = {s: len(load_split(tmp_path / "data" / "tiny" / "cifar10" / f"{s}.npz")[1]) for s in ("train", "val")}
    assert sizes["val"] == tiny["val"] > 0
    assert counts == {"train": sizes["train"], "both": sizes["train"] + sizes["val"]}

    (tmp_path / "data" / "tiny" / "cifar10" / "val.npz").unlink()
    proc = subprocess.run([*gmm, "--out", "gmm/none"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: gmm.splits lists val, but ")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "gmm" / "none").exists()
