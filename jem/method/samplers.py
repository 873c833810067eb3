"""Samplers of p(x) ∝ exp(-E(x)): SGLD (JEM), proximal SGLD (JEM++, SADA-JEM) and PYLD-M-N (JEM++).

All run on images scaled to [-1, 1] and ascend ``LSE(x) = -E(x)`` (or ``f(x)[y]`` when a
class is given):

* SGLD: ``x <- x + alpha * dLSE/dx + sigma * N(0, I)``.
* Proximal SGLD: the same with the gradient clamped to ``[-eps, eps]`` (``grad_clamp``)
  and x clamped to ``[-1, 1]`` after the step (``image_clamp``). Noise is added before the
  image clamp so chains stay inside the data box.
* PYLD-M-N: M outer steps each run one full forward/backward to get the gradient and the
  slack variable ``p = dLSE/dh`` at the output ``h = f0(x)`` of the first layer; N inner
  steps then move x along ``grad_x <p, f0(x)>`` only through the first layer, clamped and
  scaled by ``inner_step_size``. An outer step of ``step_size * clamp(dLSE/dx)`` precedes
  the inner steps when ``step_size > 0`` (the reference's ``sgld_lr``); noise follows them,
  unclamped, as in the JEM++ reference (each inner step clamps x to the box).
  When f0 is a single linear convolution (the WRN's), ``grad_x <p, f0(x)>`` equals the outer
  gradient at every inner step: the N inner steps are N clamped steps along one gradient,
  computed once.

Batch norm during sampling is explicit: ``eval`` (running statistics), ``train`` (batch
statistics and running-stat updates, as the JEM++/SADA-JEM reference code does) or
``train_frozen`` (batch statistics, running statistics untouched).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from jem.config.variant import SamplerConfig
from jem.method.models import WideResNet, bn_layers
from jem.runtime.distributed import SINGLE, DistInfo


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, count_batches: bool = False) -> Iterator[None]:
    """Batch norm keeps using batch statistics but its running statistics are not updated.

    ``count_batches``: the forwards still count in ``num_batches_tracked``, as the SADA-JEM
    reference's ``disable_running_stats`` (momentum 0) leaves it for SAM's second pass; the
    count only matters for a cumulative average (momentum None), which no family uses."""
    saved = []
    for m in bn_layers(model):
        tracked = m.num_batches_tracked
        saved.append((m, m.momentum, None if tracked is None or count_batches else tracked.clone()))
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@contextlib.contextmanager
def input_grad_only(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients while sampling: only dE/dx is needed, and a compiled
    graph would otherwise compute (and throw away) every weight gradient at every step."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put the model in the sampling mode and restore its train/eval flags afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode != "eval")
    try:
        if mode == "train_frozen":
            with frozen_bn_stats(model):
                yield
        else:
            yield
    finally:
        for m, training in flags:
            m.training = training


def _lse(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):  # autocast: reduce in float32
        logits = logits.float()
    if y is None:
        return torch.logsumexp(logits, dim=1)
    return logits.gather(1, y.view(-1, 1)).squeeze(1)


def _clamp_grad(g: torch.Tensor, eps: float | None) -> torch.Tensor:
    return g if eps is None else g.clamp(-eps, eps)


def _finish_step(x: torch.Tensor, cfg: SamplerConfig, shard: DistInfo = SINGLE) -> torch.Tensor:
    if cfg.noise > 0:
        # drawn in logical (NCHW) order, so a channels_last x gets the same noise per pixel; under
        # data parallelism, for the whole global batch and sliced, as a single process draws it
        noise = torch.randn((len(x) * shard.world, *x.shape[1:]), device=x.device, dtype=x.dtype)
        x = x + cfg.noise * noise[shard.rows(len(x))]
    if cfg.image_clamp:
        x = x.clamp(-1.0, 1.0)
    return x


def sgld_step(model: nn.Module, x: torch.Tensor, cfg: SamplerConfig,
              y: torch.Tensor | None = None, shard: DistInfo = SINGLE) -> torch.Tensor:
    """One (proximal) SGLD step; returns a new detached tensor."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(_lse(model(x), y).sum(), [x])
    x = x.detach() + cfg.step_size * _clamp_grad(g, cfg.grad_clamp)
    return _finish_step(x, cfg, shard).detach()


def _linear_stem(model: nn.Module) -> bool:
    return isinstance(getattr(model, "stem", None), (nn.Conv2d, nn.Linear))


def pyld_step(model: WideResNet, x: torch.Tensor, cfg: SamplerConfig,
              y: torch.Tensor | None = None, shard: DistInfo = SINGLE,
              reuse_outer_gradient: bool | None = None) -> torch.Tensor:
    """One outer step of PYLD-M-N: one full forward/backward, then N first-layer inner steps.

    The inner steps ascend ``H(x) = <p, stem(x)>`` with the slack ``p = dLSE/dh`` at ``h =
    stem(x)`` frozen. When the stem is one linear layer (the WRN's first convolution),
    ``dH/dx = stem^T p`` does not depend on x and is exactly the outer gradient ``dLSE/dx``
    (LSE sees x only through h): the N inner steps reuse it with no network call, where the
    reference recomputes it N times. ``reuse_outer_gradient=False`` forces the general path
    (a forward/backward of the stem per inner step), which a non-linear stem always takes."""
    reuse = _linear_stem(model) if reuse_outer_gradient is None else reuse_outer_gradient
    x = x.detach().requires_grad_(True)
    h = model.stem(x)
    gx, p = torch.autograd.grad(_lse(model.logits_from_stem(h), y).sum(), [x, h])
    p = p.detach()
    x = x.detach()
    step = _clamp_grad(gx.detach(), cfg.grad_clamp)
    if cfg.step_size > 0:
        x = x + cfg.step_size * step
        if cfg.image_clamp:
            x = x.clamp(-1.0, 1.0)
    for _ in range(cfg.inner_steps):
        if not reuse:
            xi = x.requires_grad_(True)
            (gi,) = torch.autograd.grad((model.stem(xi) * p).sum(), [xi])
            x, step = xi.detach(), _clamp_grad(gi, cfg.grad_clamp)
        x = x + cfg.inner_step_size * step
        if cfg.image_clamp:
            x = x.clamp(-1.0, 1.0)
    # noise after the inner steps and not clamped (JEM++ reference: the next outer step's
    # inner steps clamp again)
    return _finish_step(x, dataclasses.replace(cfg, image_clamp=False), shard).detach()


def sample(model: nn.Module, x0: torch.Tensor, cfg: SamplerConfig, y: torch.Tensor | None = None,
           steps: int | None = None, shard: DistInfo = SINGLE) -> torch.Tensor:
    """Run the configured chain from ``x0`` for ``steps`` (default ``cfg.steps``) steps.

    ``shard``: under data parallelism, ``x0`` is this rank's slice of the global p(x) batch."""
    step = sgld_step if cfg.kind == "sgld" else pyld_step
    x = x0.detach()
    with bn_mode(model, cfg.bn_mode), input_grad_only(model):
        for _ in range(cfg.steps if steps is None else steps):
            x = step(model, x, cfg, y, shard)  # type: ignore[arg-type]
    return x


def without_bn_updates(cfg: SamplerConfig) -> SamplerConfig:
    """The same sampler, but batch-norm running statistics are never updated (for evaluation:
    ``train`` becomes ``train_frozen``, which still normalises with batch statistics)."""
    return dataclasses.replace(cfg, bn_mode="train_frozen") if cfg.bn_mode == "train" else cfg
