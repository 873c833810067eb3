"""Pre-activation Wide-ResNet used by JEM, JEM++ and SADA-JEM.

``f(x)`` are the class logits; the energy is ``E(x) = -logsumexp_y f(x)[y]`` and the
classifier is ``softmax(f(x))``. The first convolution is exposed separately (``stem``)
because PYLD needs the output of the first layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jem.config.errors import InputError
from jem.config.variant import ModelConfig
from jem.runtime.checkpoint import atomic_torch_save, load_tensors


def _norm(channels: int, cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "batch":
        return nn.BatchNorm2d(channels, momentum=cfg.bn_momentum)
    return nn.Identity()


class WideBlock(nn.Module):
    """norm -> LeakyReLU -> conv3x3 -> dropout -> norm -> LeakyReLU -> conv3x3 (+ shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.bn1 = _norm(in_planes, cfg)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.bn2 = _norm(planes, cfg)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.act = nn.LeakyReLU(cfg.leak)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.act(self.bn1(x))))
        out = self.conv2(self.act(self.bn2(out)))
        return out + self.shortcut(x)


class Trunk(nn.Sequential):
    """The residual blocks (a ``Sequential``: the same parameter names, the same eager forward).

    ``compiled`` (set by ``jem.method.train.compile_trunk``) is a torch.compile'd
    ``trunk_with_stats``: the blocks then run as a function of the input *and of their
    batch-norm running statistics*, passed in as copies and returned updated, then copied back
    into the buffers. No compiled graph writes into a tensor that autograd may have saved, so
    any number of train-mode forwards (compiled, or eager where dynamo falls back) may precede
    one backward. Written the usual way, the compiled graph updates the buffers in place after
    it runs, and an eager forward of the same layers earlier in the step (which saves the
    running statistics for its backward) then fails at ``backward()`` with "modified by an
    inplace operation": the CUDA crash of compiled training, which ``tests/test_perf.py``
    reproduces on a CPU by forcing dynamo's fallback.
    """

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__(*blocks)
        self.compiled: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None

    def forward(self, x: torch.Tensor, plain: bool = False) -> torch.Tensor:
        if plain or self.compiled is None:
            return super().forward(x)
        if not any(m.training and m.track_running_stats for m in bn_layers(self)):
            return self.compiled(self, x, {})[0]  # nothing updates: the graph only reads the buffers
        names, current = map(list, zip(*self.named_buffers(), strict=True))
        # copies in (one multi-tensor kernel): no tensor a backend saves for backward is written again
        out, updated = self.compiled(self, x, dict(zip(names, torch._foreach_add(current, 0), strict=True)))
        with torch.no_grad():
            torch._foreach_copy_(current, [updated[name] for name in names])
        return out


def trunk_with_stats(trunk: Trunk, x: torch.Tensor,
                     stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``trunk(x)`` with its buffers replaced by ``stats``, which it leaves untouched: the
    running-statistics updates go to fresh tensors, returned with the output."""
    fresh = {name: t.clone() for name, t in stats.items()}
    out = torch.func.functional_call(trunk, fresh, (x,), {"plain": True}, strict=False)
    return out, fresh


class WideResNet(nn.Module):
    """WRN-depth-width with a linear classification head over the pooled features."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate("model")
        self.cfg = cfg
        n = (cfg.depth - 4) // 6
        widths = [16, 16 * cfg.width, 32 * cfg.width, 64 * cfg.width]
        self.stem = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1, bias=True)
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for group, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(in_planes, widths[group + 1], stride if i == 0 else 1, cfg))
                in_planes = widths[group + 1]
        self.blocks = Trunk(*blocks)
        self.bn = _norm(in_planes, cfg)
        self.act = nn.LeakyReLU(cfg.leak)
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, cfg.num_classes)

    def features_from_stem(self, h: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.blocks(h)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def logits_from_stem(self, h: torch.Tensor) -> torch.Tensor:
        """The network without its first layer (``g`` in the JEM++ paper)."""
        return self.head(self.features_from_stem(h))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_from_stem(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_stem(self.stem(x))


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``model`` (the training step, sampler and metrics touch their statistics)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def energy_from_logits(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """E(x) = -logsumexp_y f(x)[y]; with labels, the class-conditional E(x, y) = -f(x)[y].

    Half-precision logits (autocast) are summed in float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if y is None:
        return -torch.logsumexp(logits, dim=1)
    return -logits.gather(1, y.view(-1, 1)).squeeze(1)


def energy(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    return energy_from_logits(model(x), y)


def build_model(cfg: ModelConfig) -> WideResNet:
    return WideResNet(cfg)


def save_model(path: str | os.PathLike[str], model: WideResNet, variant: dict[str, Any],
               **payload: Any) -> None:
    """Write trained weights with the variant that made them (and anything else, e.g. a buffer)."""
    atomic_torch_save({"variant": variant, "model": model.state_dict(), **payload}, path)


def load_model(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[WideResNet, dict[str, Any]]:
    """The model (eval mode, on ``device``) and the whole saved payload (``variant`` included)."""
    from jem.config.variant import Variant

    try:
        payload = load_tensors(path, writer="its train stage")
        variant = Variant.from_dict(payload["variant"], where=f"{path}:variant")
        model = build_model(variant.model)
        model.load_state_dict(payload["model"])
    except FileNotFoundError:
        raise InputError(f"{path} not found: it is written by the train stage") from None
    except InputError:
        raise
    except Exception as exc:  # truncated file, other architecture, missing keys
        reason = " ".join(str(exc).split())[:160]
        raise InputError(f"{path}: not readable as trained weights ({type(exc).__name__}: {reason}); "
                         "rerun its train stage") from None
    return model.to(device).eval(), payload
