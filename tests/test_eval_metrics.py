"""Evaluation metrics against independent computations: ECE, AUROC and OOD scores, FID, IS, landscape."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from jem.config.errors import InputError
from jem.config.variant import AugmentConfig, ModelConfig
from jem.data.batches import augment
from jem.evaluation.inception import GaussianStats, feature_stats, frechet_distance, inception_score
from jem.evaluation.landscape import energy_curve, energy_sum, filter_normalized_direction
from jem.evaluation.metrics import calibration, with_reestimated_bn
from jem.evaluation.ood import auroc, ood_scores
from jem.method.models import WideResNet

# ---- ECE --------------------------------------------------------------------------------------


def _logits_with_confidence(conf: list[float], pred: list[int], classes: int = 4) -> torch.Tensor:
    """Logits whose softmax has maximum ``conf[i]`` at class ``pred[i]`` (the rest spread evenly)."""
    probs = torch.zeros(len(conf), classes, dtype=torch.float64)
    for i, (c, k) in enumerate(zip(conf, pred, strict=True)):
        probs[i] = (1 - c) / (classes - 1)
        probs[i, k] = c
    return probs.log()


def test_bn_reestimation_sets_running_statistics_to_the_data_averages():
    """The re-estimated running mean of the first batch norm is the mean of its input over the
    data (equal batches: the average of batch means); the model itself is left untouched."""
    torch.manual_seed(0)
    model = WideResNet(ModelConfig(depth=10, width=1, image_size=8, num_classes=4, bn_momentum=0.9))
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied = with_reestimated_bn(model, images, batch_size=10)
    assert not copied.training and copied is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = images.float() / 127.5 - 1.0
    with torch.no_grad():
        h = model.stem(x)
    torch.testing.assert_close(copied.blocks[0].bn1.running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    batch_vars = torch.stack([h[i:i + 10].var((0, 2, 3), unbiased=True) for i in range(0, 40, 10)])
    torch.testing.assert_close(copied.blocks[0].bn1.running_var, batch_vars.mean(0), rtol=1e-5, atol=1e-6)
    plain = WideResNet(ModelConfig(depth=10, width=1, image_size=8, num_classes=4, norm="none"))
    assert with_reestimated_bn(plain, images) is plain  # nothing to re-estimate


def test_bn_reestimation_prepares_batches_as_training_did():
    """With the variant's augmentation and input noise, every batch is cropped, flipped and
    noised as training prepared its labelled batches (a seeded generator, in order), and the
    running mean is the average of those batches' means."""
    torch.manual_seed(0)
    model = WideResNet(ModelConfig(depth=10, width=1, image_size=8, num_classes=4, bn_momentum=0.9))
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    cfg = AugmentConfig(crop_padding=2, pad_mode="reflect", hflip=True)
    copied = with_reestimated_bn(model, images, batch_size=10, augment=cfg, input_noise=0.1, seed=3)
    g = torch.Generator().manual_seed(3)
    means = []
    for i in range(0, 40, 10):
        x = augment(images[i:i + 10].float() / 127.5 - 1.0, cfg, g)
        x = x + 0.1 * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            means.append(model.stem(x).mean((0, 2, 3)))
    torch.testing.assert_close(copied.blocks[0].bn1.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    clean = with_reestimated_bn(model, images, batch_size=10)
    assert not torch.allclose(clean.blocks[0].bn1.running_mean, copied.blocks[0].bn1.running_mean)


def test_ece_of_hand_built_bins():
    # 20 bins of width 0.05. Bin (0.9, 0.95]: confidences 0.92, 0.93, 0.94, 0.91 with 3 of 4 right
    # (acc 0.75, conf 0.925); bin (0.55, 0.6]: 0.6 and 0.58, 1 of 2 right (acc 0.5, conf 0.59).
    conf = [0.92, 0.93, 0.94, 0.91, 0.6, 0.58]
    pred = [0, 1, 2, 3, 0, 1]
    labels = torch.tensor([0, 1, 2, 0, 0, 2])
    cal = calibration(_logits_with_confidence(conf, pred), labels, n_bins=20)
    expected = 4 / 6 * abs(0.75 - 0.925) + 2 / 6 * abs(0.5 - 0.59)
    assert cal.ece == pytest.approx(expected, abs=1e-12)
    assert cal.bin_count[18] == 4 and cal.bin_count[11] == 2 and sum(cal.bin_count) == 6
    assert cal.bin_accuracy[18] == pytest.approx(0.75) and cal.bin_confidence[11] == pytest.approx(0.59)
    assert cal.bin_accuracy[0] is None  # empty bins carry no number


def test_ece_is_zero_when_confidence_equals_accuracy_and_the_edge_goes_to_the_lower_bin():
    conf = [0.5] * 4  # exactly on the edge between bins 9 (0.45, 0.5] and 10 (0.5, 0.55]
    cal = calibration(_logits_with_confidence(conf, [0, 1, 2, 3]), torch.tensor([0, 1, 0, 0]), n_bins=20)
    assert cal.ece == pytest.approx(0.0, abs=1e-12) and cal.bin_count[9] == 4
    wrong = calibration(_logits_with_confidence([1.0 - 1e-9] * 3, [0, 0, 0]), torch.tensor([1, 1, 1]), n_bins=20)
    assert wrong.ece == pytest.approx(1.0, abs=1e-6)


# ---- AUROC and OOD scores -----------------------------------------------------------------------


def _auroc_by_pairs(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of an in-distribution input > score of an OOD input), ties counting half."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_equals_the_pairwise_probability(seed):
    rng = np.random.default_rng(seed)
    pos = rng.normal(0.5, 1.0, 60)
    neg = np.round(rng.normal(0.0, 1.0, 45), 1)  # rounding makes ties
    neg[:5] = np.round(pos[:5], 1)
    pos[:5] = neg[:5]
    assert auroc(pos, neg) == pytest.approx(_auroc_by_pairs(pos, neg), abs=1e-12)
    assert auroc(pos + 100, neg) == 1.0 and auroc(neg - 100, pos) == 0.0


class Linear(nn.Module):
    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = torch.tensor(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() @ self.w.T


def test_ood_scores_match_closed_forms_on_a_linear_model():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 12))
    x = rng.uniform(-1, 1, size=(7, 3, 2, 2)).astype(np.float32)  # images reach models as float32
    scores = ood_scores(Linear(w), torch.tensor(x), batch_size=3)
    x = x.astype(np.float64)
    logits = x.reshape(7, -1) @ w.T
    lse = np.log(np.exp(logits).sum(1))
    soft = np.exp(logits - lse[:, None])
    grad = soft @ w  # d lse / dx = W^T softmax(W x)
    np.testing.assert_allclose(scores["log_px"], lse, rtol=1e-10)
    np.testing.assert_allclose(scores["max_prob"], soft.max(1), rtol=1e-6)
    np.testing.assert_allclose(scores["grad_norm"], -np.linalg.norm(grad, axis=1), rtol=1e-6)


# ---- FID and IS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [64, 20])  # full rank, and singular covariances (fewer samples than dims)
def test_frechet_distance_on_the_device_equals_pytorch_fids_scipy_computation(rank):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(rank)
    a = rng.normal(size=(rank + 1, 64)) @ rng.normal(size=(64, 64)) * 0.3
    b = rng.normal(size=(rank + 1, 64)) * 1.7 + 0.5
    sa, sb = feature_stats(a), feature_stats(b)
    expected = calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert frechet_distance(sa, sb, device="cpu") == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n", [2, 3, 257])
def test_feature_stats_on_the_device_equal_numpys_cov(n):
    """The path that runs on a GPU (float64 matrix product in torch) against pytorch-fid's
    ``np.mean``/``np.cov``; the caller's array is left as it was."""
    feats = np.random.default_rng(n).normal(size=(n, 48)) * np.linspace(0.1, 3.0, 48) + 5.0
    before = feats.copy()
    torch_stats = feature_stats(feats, device="cpu")
    assert np.array_equal(feats, before)
    assert torch_stats.n == n and torch_stats.mu.dtype == torch_stats.sigma.dtype == np.float64
    np.testing.assert_allclose(torch_stats.mu, feats.mean(0), rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(torch_stats.sigma, np.cov(feats, rowvar=False), rtol=1e-11, atol=1e-11)
    with pytest.raises(InputError, match="at least 2 feature vectors"):
        feature_stats(feats[:1], device="cpu")


def test_frechet_distance_of_gaussians_with_a_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenvectors: S1 and S2 commute
    l1, l2 = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    closed = ((mu1 - mu2) ** 2).sum() + (l1 + l2 - 2 * np.sqrt(l1 * l2)).sum()
    got = frechet_distance(GaussianStats(mu1, s1, 10), GaussianStats(mu2, s2, 10))
    assert got == pytest.approx(closed, rel=1e-8)
    assert frechet_distance(GaussianStats(mu1, s1, 10), GaussianStats(mu1, s1, 10)) == pytest.approx(0, abs=1e-6)


def test_fid_of_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(40_000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(40_000, 3)) * [1.5, 1.0, 0.5] + [1.0, 0.0, -1.0]
    closed = 2.0 + (1 + 2.25 - 2 * 1.5) + (4 + 1 - 2 * 2) + 0.0
    stats = feature_stats(a)
    np.testing.assert_allclose(stats.sigma, np.cov(a, rowvar=False))
    assert frechet_distance(stats, feature_stats(b)) == pytest.approx(closed, abs=0.08)


def test_inception_score_on_synthetic_logits():
    assert inception_score(np.zeros((100, 1008)), splits=10) == pytest.approx((1.0, 0.0))
    # confident and evenly spread over k classes in every split: IS = k
    k = 8
    confident = np.full((80, 1008), -50.0)
    confident[np.arange(80), np.arange(80) % k] = 50.0
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n,splits,scale", [(50, 5, 3.0), (53, 5, 3.0), (41, 4, 300.0)])
def test_inception_score_equals_the_definition_per_split(n, splits, scale):
    """Random logits against the definition computed with scipy's entropy per split: uneven
    parts (np.array_split's), and logits large enough that probabilities underflow to 0."""
    from scipy.special import softmax
    from scipy.stats import entropy

    logits = np.random.default_rng(n).normal(scale=scale, size=(n, 20))
    p = softmax(logits, axis=1)
    want = [math.exp(np.mean([entropy(row, part.mean(0)) for row in part])) for part in np.array_split(p, splits)]
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.mean(want), rel=1e-9) and std == pytest.approx(np.std(want), rel=1e-9)
    assert inception_score(logits, splits, device="cpu") == (mean, std)


# ---- energy landscape ---------------------------------------------------------------------------


def test_filter_normalised_direction_and_curve():
    torch.manual_seed(0)
    model = WideResNet(ModelConfig(depth=10, width=1, image_size=8, num_classes=3)).eval()
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(1))
    for name, p in model.named_parameters():
        d = direction[name]
        if p.dim() <= 1:
            assert not d.any(), f"{name}: biases and batch-norm parameters are not perturbed"
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = energy_curve(model, images, [-1.0, 0.0, 0.5], direction, batch_size=4)
    assert curve[1] == pytest.approx(energy_sum(model, images))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} not restored"
    with torch.no_grad():  # the point at alpha = 0.5, by hand
        for name, p in model.named_parameters():
            p.add_(0.5 * direction[name])
        x = images.float() / 127.5 - 1
        by_hand = (-torch.logsumexp(model(x).double(), 1)).sum().item()
    assert curve[2] == pytest.approx(by_hand, rel=1e-6)


def test_test_time_input_noise_is_seeded_gaussian_on_the_unit_range():
    from jem.data.batches import to_unit_range
    from jem.evaluation.metrics import with_input_noise

    images = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert with_input_noise(images, 0.0) is images  # SADA-JEM's evaluation: the images as they are
    noisy = with_input_noise(images, 0.03, seed=5)
    delta = noisy - to_unit_range(images)
    assert noisy.dtype == torch.float32 and abs(delta.mean().item()) < 1e-3
    assert delta.std().item() == pytest.approx(0.03, rel=0.02)  # JEM's / JEM++'s default sigma
    torch.testing.assert_close(with_input_noise(images, 0.03, seed=5), noisy)
    assert not torch.equal(with_input_noise(images, 0.03, seed=6), noisy)
