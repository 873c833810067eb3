"""Training batches as a pure function of (seed, stream, iteration).

The whole prepared split lives in one tensor (uint8 images, or floats already in
[-1, 1]) on any device. A stream shuffles it once per epoch with a generator seeded from
(seed, stream, epoch), cuts batches in order, and applies augmentation and input noise
with a generator seeded from (seed, stream, iteration). Nothing depends on hidden
iterator state, so a resumed run sees exactly the batches the uninterrupted run would
have seen, and two variants with the same seed see the same data.

SADA-JEM uses two streams: an augmented labelled stream for the classifier and an
un-augmented stream for the p(x) term. JEM/JEM++ augment both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jem.config.errors import InputError
from jem.config.variant import AugmentConfig
from jem.runtime.distributed import SINGLE, DistInfo

_STREAM_SALT = 1_000_003


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (ToTensor + Normalize(0.5, 0.5)); floats pass through."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


def _generator(device: torch.device, *keys: int) -> torch.Generator:
    g = torch.Generator(device=device)
    seed = 0
    for k in keys:
        seed = (seed * _STREAM_SALT + int(k)) % (2**63 - 1)
    g.manual_seed(seed)
    return g


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Pad-and-random-crop plus horizontal flip, vectorised over the batch, on x's device."""
    n, c, h, w = x.shape
    if cfg.crop_padding > 0:
        pad = cfg.crop_padding
        padded = F.pad(x, (pad, pad, pad, pad), mode=cfg.pad_mode)
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if cfg.hflip:
        flip = torch.rand(n, generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def prepare(images: torch.Tensor, cfg: AugmentConfig | None, noise: float,
            generator: torch.Generator) -> torch.Tensor:
    """Training inputs from stored images: [-1, 1], then augmentation (``cfg``, None: none),
    then Gaussian noise of std ``noise``, all drawn from ``generator`` in that order."""
    x = to_unit_range(images)
    if cfg is not None:
        x = augment(x, cfg, generator)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator, device=x.device)
    return x


class BatchStream:
    """Endless shuffled batches over one split; ``batch(it)`` is deterministic in ``it``.

    Under data parallelism (``shard``) every rank builds the same global batch of
    ``batch_size`` images (augmentation and noise included) and keeps its own rows.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 stream: int, augment: AugmentConfig | None, noise: float,
                 device: torch.device | str = "cpu", shard: DistInfo = SINGLE) -> None:
        if batch_size % shard.world:
            raise InputError(f"batch size {batch_size} does not split evenly over {shard.world} processes")
        self.shard = shard
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if batch_size > images.shape[0]:
            raise InputError(f"batch size {batch_size} exceeds the {images.shape[0]} training images")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device).long()
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.augment_cfg = augment
        self.noise = noise
        self.per_epoch = images.shape[0] // batch_size
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = _generator(torch.device("cpu"), self.seed, self.stream, epoch, 0)
            self._perm = torch.randperm(self.images.shape[0], generator=g).to(self.device)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, it: int) -> torch.Tensor:
        epoch, pos = divmod(it, self.per_epoch)
        return self._permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]

    def batch(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(it)
        g = _generator(self.device, self.seed, self.stream, it, 1)
        x = prepare(self.images[idx], self.augment_cfg, self.noise, g)
        mine = self.shard.rows(self.batch_size // self.shard.world)
        return x[mine], self.labels[idx][mine]
