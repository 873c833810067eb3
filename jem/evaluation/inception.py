"""Inception Score and Frechet Inception Distance on pytorch-fid's Inception network.

The network is the one pytorch-fid uses (the TensorFlow FID Inception-v3 ported to PyTorch,
1008-way classifier): torchvision's Inception3 with pytorch-fid's patched blocks. One pass
gives both the 2048-d pool features (FID) and the 1008 *unbiased* logits (IS), so IS comes
from the same network as FID. The logits are ``pool3 @ W`` without the output layer's bias,
as the published Inception Score computes them (Salimans et al.'s improved-GAN code, which
the SADA-JEM and JEM++ ``Task/inception.py`` reuse, and torch-fidelity's
``logits_unbiased``); with the bias the softmax, hence the score, differs. Inputs are
images in [-1, 1] (or uint8), resized bilinearly to 299x299 as pytorch-fid does.

The weights come from a local file (``pt_inception-2015-12-05-6726825d.pth``, checked
against the sha256 prefix in its name) or, when allowed, from pytorch-fid's release URL.
When neither works, ``InceptionUnavailable`` says why in one line, and the caller reports
the metric as unavailable; nothing here ever invents a number.

* FID: ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)`` over pool features, in float64 on the
  device from the eigenvalues of ``S1^1/2 S2 S1^1/2`` (``frechet_distance``; tested against
  pytorch-fid's ``calculate_frechet_distance``, which uses scipy's ``sqrtm``); statistics are
  the mean and the unbiased covariance (``np.cov``), as pytorch-fid computes them, on the
  device too (``feature_stats``; tested against ``np.cov``).
* IS: ``exp(E_x KL(p(y|x) || p(y)))`` over the softmax of the unbiased logits, per split;
  mean and standard deviation over the splits. The reference scripts use
  ``max(1, n // 5000)`` splits (``reference_is_splits``): 2 for a 10,000-image buffer, 1 for
  the ~1,000 images SADA-JEM scores.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from jem.config.errors import InputError
from jem.config.settings import PROTOCOLS
from jem.data.batches import to_unit_range
from jem.runtime.checkpoint import load_arrays
from jem.runtime.files import atomic_write, file_sha256

# pytorch_fid.inception.FID_WEIGHTS_URL (pytorch-fid and torchvision are imported only where the
# network is built: they cost seconds at start-up, and most runs of the fid stages need neither)
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class InceptionUnavailable(RuntimeError):
    """The Inception weights cannot be had; the message (one line) says why and how to fix it."""


def fid_inception_architecture() -> nn.Module:
    """pytorch-fid's FID Inception-v3, randomly initialised (no download)."""
    from pytorch_fid import inception as pfi

    net = pfi._inception_v3(num_classes=NUM_LOGITS, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for ``fid_inception_architecture`` with small random weights and sane
    batch-norm statistics (finite features, a well-conditioned covariance): the standard
    network's arithmetic without its weights, for tests and timing. Its scores mean nothing.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in fid_inception_architecture().state_dict().items():
        if name.endswith("running_var"):
            state[name] = torch.rand(t.shape, generator=g) + 0.5
        elif t.is_floating_point():
            state[name] = torch.randn(t.shape, generator=g) * (0.1 if t.dim() > 1 else 0.01)
        else:
            state[name] = t
    return state


class FIDInception(nn.Module):
    """Pool features (N, 2048) and unbiased logits ``pool @ W.T`` (N, 1008) of images in [-1, 1].

    The output layer's bias is left out, as in the published Inception Score (see the module
    docstring); FID uses the pool features only.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a,
                      n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        pool = torch.flatten(n.avgpool(x), 1)
        return pool, pool @ n.fc.weight.T  # no bias: the published IS's logits


def load_fid_inception(weights: str | os.PathLike[str], download: bool = False,
                       device: torch.device | str = "cpu", check_hash: bool = True) -> FIDInception:
    """The FID Inception with its standard weights, from ``weights`` (a file path).

    A missing file is downloaded there when ``download`` is true. Raises
    ``InceptionUnavailable`` (one line) when the file is missing and cannot be downloaded,
    or is not the standard weights.
    """
    path = Path(weights)
    if not path.is_file():
        if not download:
            raise InceptionUnavailable(f"Inception weights not found at {path}; download {FID_WEIGHTS_URL} "
                                       "to that path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=FID_WEIGHTS_SHA256_PREFIX,
                                           progress=True)
        except Exception as exc:  # no network, proxy, bad hash...
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise InceptionUnavailable(f"Inception weights not found at {path} and the download of "
                                       f"{FID_WEIGHTS_URL} failed ({reason})") from exc
    if check_hash:
        digest = file_sha256(path)
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise InceptionUnavailable(f"{path} is not pytorch-fid's Inception weights (sha256 {digest[:8]}..., "
                                       f"expected {FID_WEIGHTS_SHA256_PREFIX}...); replace it with "
                                       f"{FID_WEIGHTS_URL}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = fid_inception_architecture()
        net.load_state_dict(state)
    except Exception as exc:
        raise InceptionUnavailable(f"{path} could not be loaded as the FID Inception ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:200]})") from exc
    return FIDInception(net).to(device)


@torch.no_grad()
def inception_outputs(model: FIDInception, images: torch.Tensor | np.ndarray, batch_size: int = 200,
                      device: torch.device | str = "cpu", progress: bool = True,
                      desc: str = "inception", channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pool features (float64, N x 2048) and unbiased logits (float64, N x 1008) of uint8 or [-1, 1] images.

    The network runs in fp32 (the standard FID); outputs stay on ``device`` until the end, so
    a GPU is not synchronised per batch. ``channels_last`` runs the convolutions in NHWC
    (faster with cuDNN; equal within float tolerance).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
    device = torch.device(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and images.device.type == "cpu":
        images = images.pin_memory()
    feats, logits = [], []
    for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc=desc, unit="batch"):
        x = to_unit_range(images[i:i + batch_size].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pool, out = model(x)
        feats.append(pool.float())
        logits.append(out.float())
    if not feats:
        raise ValueError("no images to score")
    return torch.cat(feats).cpu().double().numpy(), torch.cat(logits).cpu().double().numpy()


@dataclass
class GaussianStats:
    """Mean and covariance of Inception features (pytorch-fid's statistics)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write(path, lambda fh: np.savez(fh, mu=self.mu, sigma=self.sigma, n=np.array(self.n)),
                     size=self.mu.nbytes + self.sigma.nbytes + 1024)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GaussianStats:
        try:
            f = load_arrays(path, writer="the fid_ref stage")
            stats = cls(mu=f["mu"], sigma=f["sigma"], n=int(f["n"]))
        except FileNotFoundError:
            raise InputError(f"{path} not found: it is written by the fid_ref stage") from None
        except InputError:  # refused as unsafe
            raise
        except Exception as exc:
            raise InputError(f"{path}: not readable as Inception statistics ({type(exc).__name__}); "
                             "rerun the fid_ref stage") from None
        d = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
        if stats.mu.ndim != 1 or stats.sigma.shape != (d, d):
            raise InputError(f"{path}: mu {stats.mu.shape} and sigma {stats.sigma.shape} are not a mean and "
                             "covariance of one dimension; rerun the fid_ref stage")
        return stats


def _stats_device(device: torch.device | str | None) -> torch.device | None:
    """``device``, else the GPU when there is one; None: numpy on the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else None


def feature_stats(features: np.ndarray, device: torch.device | str | None = None) -> GaussianStats:
    """Mean and unbiased covariance of ``features`` (N x d) in float64, as pytorch-fid computes
    them (``np.cov(rowvar=False)``: centre on the mean, ``X^T X / (N - 1)``). On ``device`` (by
    default the GPU when there is one) that is one float64 matrix product there instead of
    numpy's on the CPU (50,000 x 2048 features: seconds on a CPU); equal within float64
    rounding. Without a GPU and without ``device``, numpy's own ``np.cov``."""
    if len(features) < 2:
        raise InputError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    dev = _stats_device(device)
    if dev is None:
        return GaussianStats(mu=features.mean(0), sigma=np.cov(features, rowvar=False), n=len(features))
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=dev)
    mu = x.mean(0)
    x = x - mu
    sigma = (x.T @ x) / (len(x) - 1)
    return GaussianStats(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n=len(features))


def frechet_distance(a: GaussianStats, b: GaussianStats, device: torch.device | str | None = None) -> float:
    """``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2)`` in float64 on ``device`` (the GPU
    when there is one): ``S1 S2`` is similar to the symmetric ``S1^1/2 S2 S1^1/2``, so the trace
    term is the sum of the square roots of that matrix's eigenvalues (two ``eigh`` of 2048 x 2048
    instead of scipy's ``sqrtm`` on the CPU, which pytorch-fid uses; equal to it within float64
    rounding, and never complex: tiny negative eigenvalues of a singular product clamp to 0)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    device = _stats_device(device) or torch.device("cpu")

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)

    mu1, mu2, s1, s2 = t(a.mu), t(b.mu), t(a.sigma), t(b.sigma)
    w, v = torch.linalg.eigh(0.5 * (s1 + s1.T))
    sqrt_s1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def reference_is_splits(n: int) -> int:
    """The IS split count of the SADA-JEM and JEM++ ``Task/eval_buffer.py``: ``max(1, n // 5000)``."""
    return max(1, n // 5000)


def inception_score(logits: np.ndarray, splits: int = 10,
                    device: torch.device | str | None = None) -> tuple[float, float]:
    """IS mean and standard deviation over ``splits`` equal parts of the samples (unbiased logits):
    ``exp(mean_x KL(p(y|x) || p(y)))`` per part, ``p(y)`` the part's mean of ``p(y|x)``, in
    float64 with log-domain sums (finite when a probability underflows), on ``device`` (by
    default the GPU when there is one; on a 2-core CPU, 50,000 x 1008 logits take 1.2 s in
    torch where numpy's ``logaddexp.reduce`` took 4.4 s)."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) < splits:
        raise InputError(f"need at least {splits} samples for {splits} splits, got {len(logits)}")
    dev = _stats_device(device) or torch.device("cpu")
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64, device=dev), dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits):  # np.array_split's parts: the first n % splits one longer
        log_py = torch.logsumexp(part, dim=0) - math.log(len(part))  # log p(y)
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(correction=0))


# ---- which samples are scored: the papers' protocols --------------------------------------------
#
# ``whole`` (JEM++ ``Task/eval_buffer.py``): IS and FID of every image of the set.
# ``sadajem`` (SADA-JEM ``eval_sadajem.py`` -> ``Task/eval_buffer.cond_is_fid``): the set is
# classified by the JEM itself; per predicted class the images are sorted by confidence
# ``max_y p(y|x)`` and the first ``int(n_class * ratio)`` kept; IS on ratio 0.1 (~1,000 of a
# 10,000-image buffer), FID on ratio 0.9 (~9,000). Their names, ``PROTOCOLS``, are part of the
# params schema (``jem.config.settings``, ``fid.protocol``).


def confident_per_class(pred: np.ndarray, confidence: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the ``int(n_c * ratio)`` most confident images of each predicted class c.

    SADA-JEM's selection: classes in increasing order, within a class by decreasing
    confidence (ties by index). ``ratio`` in (0, 1]; a class with ``n_c * ratio < 1`` gives none.
    """
    pred = np.asarray(pred).reshape(-1)
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if len(pred) != len(confidence):
        raise ValueError(f"{len(pred)} predictions but {len(confidence)} confidences")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    keep = []
    for c in np.unique(pred):
        members = np.flatnonzero(pred == c)
        order = members[np.argsort(-confidence[members], kind="stable")]
        keep.append(order[:int(len(members) * ratio)])
    return np.concatenate(keep).astype(np.int64) if keep else np.empty(0, dtype=np.int64)


def protocol_indices(protocol: str, pred: np.ndarray | None, confidence: np.ndarray | None,
                     n: int, is_ratio: float = 0.1, fid_ratio: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """(IS indices, FID indices) into a set of ``n`` images under ``protocol`` (``PROTOCOLS``)."""
    if protocol == "whole":
        every = np.arange(n, dtype=np.int64)
        return every, every
    if protocol == "sadajem":
        if pred is None or confidence is None or len(pred) != n:
            raise InputError(f"the sadajem protocol needs the classifier's prediction and confidence for each of "
                             f"the {n} images")
        return confident_per_class(pred, confidence, is_ratio), confident_per_class(pred, confidence, fid_ratio)
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def score_protocol(feats: np.ndarray, logits: np.ndarray, ref: GaussianStats, is_idx: np.ndarray,
                   fid_idx: np.ndarray, splits: int | None = None) -> dict[str, object]:
    """IS on ``is_idx`` and FID on ``fid_idx`` of precomputed Inception outputs.

    ``splits`` null: the reference scripts' ``max(1, n // 5000)``. A subset too small for a
    number (IS: fewer images than splits; FID: fewer than 2) gets ``None`` and a ``note``.
    """
    n_splits = reference_is_splits(len(is_idx)) if splits is None else int(splits)
    out: dict[str, object] = {"is_n": len(is_idx), "is_splits": n_splits, "fid_n": len(fid_idx)}
    notes = []
    if len(is_idx) >= max(1, n_splits):
        out["is"], out["is_std"] = inception_score(logits[is_idx], n_splits)
    else:
        out["is"] = out["is_std"] = None
        notes.append(f"IS needs at least {max(1, n_splits)} images, the selection has {len(is_idx)}")
    if len(fid_idx) >= 2:
        out["fid"] = frechet_distance(feature_stats(feats[fid_idx]), ref)
    else:
        out["fid"] = None
        notes.append(f"FID needs at least 2 images, the selection has {len(fid_idx)}")
    if notes:
        out["note"] = "; ".join(notes)
    return out
