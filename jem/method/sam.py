"""Sharpness-aware minimisation (SAM, Foret et al.) and its adaptive form (ASAM, Kwon et al.).

A thin wrapper over any base optimizer:

1. after the first backward, ``first_step`` moves every weight to ``w + e`` with
   ``e = rho * g / ||g||_2`` (SAM) or ``e = rho * |w|^2 * g / || |w| * g ||_2`` (ASAM);
2. the caller recomputes the loss and its gradient at ``w + e`` (with batch-norm running
   statistics frozen: see ``jem.method.samplers.frozen_bn_stats``);
3. ``second_step`` restores ``w`` and steps the base optimizer with that gradient.

The learning-rate scheduler is attached to ``base``, which this class does not hide.
"""

from __future__ import annotations

from typing import Any

import torch


class SAM:
    def __init__(self, base: torch.optim.Optimizer, rho: float, adaptive: bool = False,
                 eps: float = 1e-12) -> None:
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        self.base = base
        self.rho = rho
        self.adaptive = adaptive
        self.eps = eps
        self._backup: tuple[list[torch.Tensor], list[torch.Tensor]] | tuple[()] = ()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for group in self.base.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every weight with a gradient to ``w + e`` (one fused kernel per step, no Python
        loop over parameters)."""
        params = self._params_with_grad()
        if not params:
            return
        grads = [p.grad for p in params]
        scaled = torch._foreach_mul(params, grads) if self.adaptive else grads
        if self.adaptive:
            torch._foreach_abs_(scaled)  # |w| * g (the sign of g does not change the norm)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
        scale = self.rho / (norm + self.eps)
        if self.adaptive:  # e = rho * w^2 * g / || |w| g ||
            e = torch._foreach_mul(params, params)
            torch._foreach_mul_(e, grads)
        else:  # e = rho * g / ||g||
            e = list(grads)
        e = torch._foreach_mul(e, scale)
        self._backup = params, torch._foreach_add(params, 0.0)  # copies of w
        torch._foreach_add_(params, e)

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore ``w`` and step the base optimizer with the gradient taken at ``w + e``."""
        if self._backup:
            params, saved = self._backup
            torch._foreach_copy_(params, saved)
        self._backup = ()
        self.base.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)
