"""Replay buffer of persistent chains, kept on the training device.

Each draw takes a batch of stored samples (slots drawn with replacement, as in the
reference code) and replaces each one, independently with probability ``reinit_freq``, by
a fresh draw from p0 (uniform or the Gaussian mixture); the sampler then runs from there
and the results are written back to the same slots. When a slot was drawn more than once,
the last of its copies is written back, deterministically (a plain indexed assignment
with repeated indices lets the threads decide, which breaks exact resume).

On a GPU (``dense_reinit``) a draw re-initialises without host synchronisation: fresh p0
draws are made for every row and kept where the re-initialisation mask says so; the
write-back sends the discarded copies of a repeated slot to a scratch row past the end,
so no step waits on a data-dependent shape.

Random numbers: which slots to draw, and the initial fill, come from the buffer's own
generator (one per rank under data parallelism, saved in its state); the re-initialisation
mask and the fresh p0 draws come from the global generator, drawn for the whole global
batch and sliced, so that they are what a single process would draw (``jem.runtime.distributed``).

The buffer is laid out in ``num_classes`` equal segments. Filling it from the mixture puts
class c's draws in segment c, so a class-conditional draw reads segment c and
re-initialises from component c.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from jem.config.errors import InputError
from jem.method.gmm import InitDistribution
from jem.runtime.distributed import SINGLE, DistInfo


class Draw(NamedTuple):
    x: torch.Tensor  # chain starts
    idx: torch.Tensor  # the slots they came from
    labels: torch.Tensor  # class each chain started from (mixture component or segment; -1: none)


class ReplayBuffer:
    """``size`` chains (this rank's shard of them under data parallelism: ``size / world``)."""

    def __init__(self, size: int, p0: InitDistribution, reinit_freq: float,
                 device: torch.device | str = "cpu", dense_reinit: bool | None = None,
                 dist: DistInfo = SINGLE, seed: int = 0) -> None:
        if size % dist.world:
            raise InputError(f"buffer size {size} does not split evenly over {dist.world} processes")
        self.dist = dist
        self.size = size // dist.world
        if self.size < p0.num_classes:
            raise ValueError(f"buffer size {self.size} is smaller than the number of classes {p0.num_classes}")
        self.p0 = p0
        self.reinit_freq = reinit_freq
        self.device = torch.device(device)
        self.dense_reinit = self.device.type == "cuda" if dense_reinit is None else dense_reinit
        self.num_classes = p0.num_classes
        self.segment = self.size // p0.num_classes
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self._seed(seed, dist.rank))
        # Fill class by class: slot i holds a draw from component i // segment (slots past
        # num_classes * segment, if any, from the whole mixture).
        seg_labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(self.segment)
        samples, labels = p0.sample(seg_labels.numel(), y=seg_labels, device=self.device, generator=self.generator)
        rest = self.size - seg_labels.numel()
        if rest:
            extra, extra_labels = p0.sample(rest, device=self.device, generator=self.generator)
            samples, labels = torch.cat([samples, extra]), torch.cat([labels, extra_labels])
        # one scratch row past the end takes the discarded writes of repeated slots
        self._samples = torch.cat([samples, samples[:1]]).contiguous()
        self._labels = torch.cat([labels.long(), labels[:1].long()])

    @staticmethod
    def _seed(seed: int, rank: int, step: int = 0) -> int:
        return (seed * 1_000_003 + 7919 * rank + 104_729 * step + 17) % (2**63 - 1)

    @property
    def samples(self) -> torch.Tensor:
        """The stored chains (a view: writing to it writes to the buffer)."""
        return self._samples[:self.size]

    @property
    def labels(self) -> torch.Tensor:
        return self._labels[:self.size]

    def draw(self, n: int, y: torch.Tensor | None = None) -> Draw:
        """``n`` chain starts, their slots and p0 components (class-conditional when ``y`` is given)."""
        g = self.generator
        if y is None:
            idx = torch.randint(0, self.size, (n,), device=self.device, generator=g)
        else:
            if self.dist.enabled:
                raise ValueError("class-conditional draws are for a single process (the sample stage)")
            y = y.to(self.device).long()
            idx = y * self.segment + torch.randint(0, self.segment, (n,), device=self.device, generator=g)
        x = self.samples[idx]
        labels = self.labels[idx]
        if self.reinit_freq > 0:
            total, mine = n * self.dist.world, self.dist.rows(n)  # the global batch and this rank's rows
            every = torch.rand(total, device=self.device) < self.reinit_freq  # the same on every rank
            mask = every[mine]
            if self.dense_reinit:
                fresh, comp = self.p0.sample(total, y=y, device=self.device, dense=True)
                x = torch.where(mask.view(-1, *([1] * (x.dim() - 1))), fresh[mine].to(x.dtype), x)
                labels = torch.where(mask, comp[mine].to(labels.dtype), labels)
            else:  # every rank draws the fresh chains of every rank's rows, and keeps its own
                rows = every.nonzero().flatten()
                if rows.numel():
                    ys = None if y is None else y[rows]
                    fresh, comp = self.p0.sample(rows.numel(), y=ys, device=self.device)
                    local = (rows >= mine.start) & (rows < mine.stop)
                    x[rows[local] - mine.start] = fresh[local]
                    labels[rows[local] - mine.start] = comp[local].to(labels.dtype)
        return Draw(x, idx, labels)

    def update(self, idx: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Write sampler results (and their p0 components) back to the slots they were drawn from."""
        idx = idx.to(self.device)
        position = torch.arange(len(idx), device=self.device)
        last = torch.full((self.size + 1,), -1, dtype=torch.long, device=self.device)
        last = last.scatter_reduce(0, idx, position, reduce="amax")  # order-free, so deterministic
        target = torch.where(last[idx] == position, idx, self.size)  # earlier copies go to the scratch row
        self._samples[target] = x.detach().to(self.device, self._samples.dtype).contiguous()
        if labels is not None:
            self._labels[target] = labels.to(self.device, self._labels.dtype)

    def state_dict(self) -> dict[str, Any]:
        """This rank's chains and its generator (``jem.method.train.Trainer`` gathers the ranks' parts)."""
        return {"samples": self.samples, "labels": self.labels, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], generator: bool = True) -> None:
        """Chains of this rank (``state`` holds ``size`` rows); ``generator=False`` keeps the current one."""
        if tuple(state["samples"].shape) != tuple(self.samples.shape):
            raise InputError(f"buffer shape {tuple(state['samples'].shape)} does not match "
                             f"the configured {tuple(self.samples.shape)}")
        self.samples.copy_(state["samples"])
        self.labels.copy_(state["labels"])
        if generator and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def reseed(self, seed: int, step: int) -> None:
        """A fresh generator for this rank (a run resumed on another number of processes)."""
        self.generator.manual_seed(self._seed(seed, self.dist.rank, step))
