"""The FID Inception network and its weights handling, without downloading the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_fid import inception as pfi

from jem.evaluation.inception import (
    FEATURE_DIM,
    NUM_LOGITS,
    FIDInception,
    InceptionUnavailable,
    fid_inception_architecture,
    inception_outputs,
    load_fid_inception,
    random_inception_state,
)


@pytest.fixture(scope="module")
def random_weights() -> dict[str, torch.Tensor]:
    # torchvision skips its weight init for this network; every tensor gets a sane random value
    return random_inception_state(seed=0)


def test_architecture_is_pytorch_fids_and_computes_the_same_features(monkeypatch, random_weights):
    # pytorch-fid builds its network and loads the published weights; hand it ours instead
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: random_weights)
    reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]]).eval()  # strict load
    net = fid_inception_architecture()
    net.load_state_dict(random_weights)
    ours = FIDInception(net)
    x01 = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = reference(x01)[0].flatten(1)
        pool, logits = ours(2 * x01 - 1)
    assert pool.shape == (2, FEATURE_DIM) and logits.shape == (2, NUM_LOGITS)
    torch.testing.assert_close(pool, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, pool @ random_weights["fc.weight"].T)  # no bias: the published IS


def test_inception_score_uses_unbiased_logits_like_an_independent_computation(monkeypatch, random_weights):
    """IS from pool3 @ W (no bias), checked against pytorch-fid's own pool features and scipy's KL.

    Batch-norm scales of 1 keep the images apart in feature space; the output weights are
    scaled so the logits spread over a few units, and the output bias is large, so that a
    score computed with it would differ clearly.
    """
    from scipy.special import softmax
    from scipy.stats import entropy

    from jem.evaluation.inception import inception_score

    state = {k: torch.ones_like(v) if k.endswith("bn.weight") else v for k, v in random_weights.items()}
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]]).eval()
    images = np.random.default_rng(2).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        ref_pool = reference(torch.from_numpy(images).float() / 255)[0].flatten(1).double()
    spread = (ref_pool - ref_pool.mean(0)).norm(dim=1).mean()
    assert spread > 0  # the images differ in feature space
    g = torch.Generator().manual_seed(1)
    mu = ref_pool.mean(0) / ref_pool.mean(0).norm()
    weight = torch.randn(state["fc.weight"].shape, generator=g, dtype=torch.float64)
    weight -= (weight @ mu)[:, None] * mu[None]  # orthogonal to the mean feature: logits of a few units
    state["fc.weight"] = (weight * 3 / spread).float()
    state["fc.bias"] = torch.randn(state["fc.bias"].shape, generator=g) * 3
    w, b = state["fc.weight"].double().numpy(), state["fc.bias"].double().numpy()
    ref_logits = ref_pool.numpy() @ w.T

    def independent_is(logits: np.ndarray) -> float:  # Salimans et al.: exp(mean_x KL(p(y|x) || p(y)))
        p = softmax(logits, axis=1)
        return float(np.exp(np.mean([entropy(px, p.mean(0)) for px in p])))

    net = fid_inception_architecture()
    net.load_state_dict(state)
    _, logits = inception_outputs(FIDInception(net), images, progress=False)
    ours, std = inception_score(logits, splits=1)
    assert std == 0.0
    want = independent_is(ref_logits)
    assert want > 1.5  # a score that depends on the images
    assert ours == pytest.approx(want, rel=1e-3)
    biased = independent_is(ref_logits + b)
    assert abs(ours - biased) > 0.05 * ours, (ours, biased)  # the test would catch the bias coming back


def test_outputs_of_uint8_images_in_batches(random_weights):
    net = fid_inception_architecture()
    net.load_state_dict(random_weights)
    model = FIDInception(net)
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    pool, logits = inception_outputs(model, images, batch_size=2, progress=False)
    assert pool.dtype == np.float64 and pool.shape == (3, FEATURE_DIM) and logits.shape == (3, NUM_LOGITS)
    one, _ = inception_outputs(model, images[1:2], progress=False)
    np.testing.assert_allclose(pool[1:2], one, rtol=1e-5, atol=1e-6)


def test_missing_wrong_and_unreadable_weights_say_why(tmp_path, random_weights):
    with pytest.raises(InceptionUnavailable, match=r"Inception weights not found at .*nothing\.pth; download "
                                                   r"https://github.com/mseitzer/pytorch-fid"):
        load_fid_inception(tmp_path / "nothing.pth")
    path = tmp_path / "weights.pth"
    torch.save(random_weights, path)
    with pytest.raises(InceptionUnavailable, match=r"is not pytorch-fid's Inception weights \(sha256 [0-9a-f]{8}"):
        load_fid_inception(path)
    assert isinstance(load_fid_inception(path, check_hash=False), FIDInception)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionUnavailable, match="could not be loaded as the FID Inception"):
        load_fid_inception(tmp_path / "junk.pth", check_hash=False)


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure\n in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionUnavailable) as info:
        load_fid_inception(tmp_path / "w.pth", download=True)
    assert "\n" not in str(info.value) and "download of https://github.com" in str(info.value)


def test_weights_url_is_pytorch_fids():
    from jem.evaluation.inception import FID_WEIGHTS_SHA256_PREFIX, FID_WEIGHTS_URL

    assert FID_WEIGHTS_URL == pfi.FID_WEIGHTS_URL and FID_WEIGHTS_SHA256_PREFIX in pfi.FID_WEIGHTS_URL


def test_channels_last_gives_the_same_outputs(random_weights):
    net = fid_inception_architecture()
    net.load_state_dict(random_weights)
    images = np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    pool, logits = inception_outputs(FIDInception(net), images, progress=False)
    net_nhwc = fid_inception_architecture()
    net_nhwc.load_state_dict(random_weights)
    pool_nhwc, logits_nhwc = inception_outputs(FIDInception(net_nhwc), images, progress=False, channels_last=True)
    np.testing.assert_allclose(pool_nhwc, pool, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits_nhwc, logits, rtol=1e-4, atol=1e-5)


# ---- the papers' sample selection -------------------------------------------------------------


def _hand_built_buffer() -> tuple[np.ndarray, np.ndarray]:
    """20 images predicted as class 2, 10 as class 0, 5 as class 7 (class 1 never), confidences
    chosen so the expected selection can be read off: within a class, the confidence is the
    image's rank from the top, shuffled over the positions."""
    pred = np.array([2] * 20 + [0] * 10 + [7] * 5)
    conf = np.concatenate([np.linspace(0.99, 0.80, 20), np.linspace(0.95, 0.50, 10), np.linspace(0.7, 0.3, 5)])
    perm = np.random.default_rng(0).permutation(len(pred))
    return pred[perm], conf[perm]


def test_sadajem_selection_keeps_the_most_confident_fraction_of_each_predicted_class():
    from jem.evaluation.inception import confident_per_class, protocol_indices

    pred, conf = _hand_built_buffer()
    # IS, ratio 0.1: int(10 * 0.1) = 1 of class 0, int(20 * 0.1) = 2 of class 2, int(5 * 0.1) = 0 of class 7
    top10 = confident_per_class(pred, conf, 0.1)
    assert pred[top10].tolist() == [0, 2, 2]  # classes in order
    assert conf[top10].tolist() == pytest.approx([0.95, 0.99, 0.99 - 0.01])  # most confident first
    # FID, ratio 0.9: 9 of class 0, 18 of class 2, int(4.5) = 4 of class 7: the least confident dropped
    is_idx, fid_idx = protocol_indices("sadajem", pred, conf, len(pred))
    assert is_idx.tolist() == top10.tolist()
    assert [int((pred[fid_idx] == c).sum()) for c in (0, 2, 7)] == [9, 18, 4]
    dropped = np.setdiff1d(np.arange(len(pred)), fid_idx)
    assert sorted(conf[dropped].tolist()) == pytest.approx([0.3, 0.5, 0.8, 0.81])
    assert len(set(fid_idx.tolist())) == len(fid_idx)
    # the whole-buffer protocol scores every image for both
    every = np.arange(len(pred))
    assert all(ix.tolist() == every.tolist() for ix in protocol_indices("whole", None, None, len(pred)))


def test_protocol_scores_are_the_subsets_scores(random_weights):
    from jem.evaluation.inception import (
        feature_stats,
        frechet_distance,
        inception_score,
        reference_is_splits,
        score_protocol,
    )

    rng = np.random.default_rng(3)
    feats, logits = rng.normal(size=(40, 8)), rng.normal(size=(40, 12)) * 3
    ref = feature_stats(rng.normal(size=(50, 8)))
    is_idx, fid_idx = np.array([3, 7, 11, 19]), np.arange(0, 40, 2)
    out = score_protocol(feats, logits, ref, is_idx, fid_idx)
    assert out["is_n"] == 4 and out["fid_n"] == 20 and out["is_splits"] == 1  # max(1, 4 // 5000)
    assert out["is"] == pytest.approx(inception_score(logits[is_idx], 1)[0])
    assert out["fid"] == pytest.approx(frechet_distance(feature_stats(feats[fid_idx]), ref))
    assert [reference_is_splits(n) for n in (1000, 9000, 10000, 50000)] == [1, 1, 2, 10]
    empty = score_protocol(feats, logits, ref, np.empty(0, dtype=np.int64), fid_idx)
    assert empty["is"] is None and "IS needs at least 1 images, the selection has 0" in empty["note"]
