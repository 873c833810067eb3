"""Samplers against the update formulas, computed independently in numpy."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from jem.config.variant import ModelConfig, SamplerConfig
from jem.method.models import WideResNet
from jem.method.samplers import pyld_step, sample, sgld_step


class QuadraticEnergy(nn.Module):
    """logit_c(x) = -0.5 * sum_i a_c (x_i - m_c,i)^2 : an energy with a closed-form gradient."""

    def __init__(self, a: np.ndarray, m: np.ndarray) -> None:
        super().__init__()
        self.a = torch.tensor(a, dtype=torch.float64)
        self.m = torch.tensor(m, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], 1, -1)
        return -0.5 * (self.a[None, :, None] * (flat - self.m[None]) ** 2).sum(-1)


def lse_grad_numpy(x: np.ndarray, a: np.ndarray, m: np.ndarray) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1)
    logits = np.stack([-0.5 * a[c] * ((flat - m[c]) ** 2).sum(1) for c in range(len(a))], 1)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    grads = np.stack([-a[c] * (flat - m[c]) for c in range(len(a))], 1)  # d logit_c / dx
    return (w[:, :, None] * grads).sum(1).reshape(x.shape)


@pytest.fixture
def quadratic() -> tuple[QuadraticEnergy, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = np.array([0.5, 3.0, 8.0])
    m = rng.uniform(-1, 1, size=(3, 2 * 2 * 2))
    x = rng.uniform(-1.5, 1.5, size=(5, 2, 2, 2))
    return QuadraticEnergy(a, m), a, m, x


def _noise_for(seed: int, like: torch.Tensor) -> np.ndarray:
    torch.manual_seed(seed)
    return torch.randn_like(like).numpy()


def test_sgld_step_matches_formula(quadratic):
    model, a, m, x = quadratic
    cfg = SamplerConfig(kind="sgld", step_size=0.7, noise=0.05)
    xt = torch.tensor(x)
    torch.manual_seed(11)
    out = sgld_step(model, xt, cfg).numpy()
    expected = x + 0.7 * lse_grad_numpy(x, a, m) + 0.05 * _noise_for(11, xt)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_proximal_sgld_step_clamps_gradient_and_image(quadratic):
    model, a, m, x = quadratic
    cfg = SamplerConfig(kind="sgld", step_size=1.0, noise=0.02, grad_clamp=0.3, image_clamp=True)
    xt = torch.tensor(x)
    torch.manual_seed(5)
    out = sgld_step(model, xt, cfg).numpy()
    g = lse_grad_numpy(x, a, m)
    assert (np.abs(g) > 0.3).any(), "the test must exercise the gradient clamp"
    expected = np.clip(x + np.clip(g, -0.3, 0.3) + 0.02 * _noise_for(5, xt), -1, 1)
    assert (np.abs(x + np.clip(g, -0.3, 0.3)) > 1).any(), "the test must exercise the image clamp"
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert out.min() >= -1 and out.max() <= 1


def test_class_conditional_step_follows_that_class_logit(quadratic):
    model, a, m, x = quadratic
    cfg = SamplerConfig(kind="sgld", step_size=0.1, noise=0.0)
    y = torch.tensor([2, 0, 1, 2, 1])
    out = sgld_step(model, torch.tensor(x), cfg, y=y).numpy()
    flat = x.reshape(5, -1)
    grad = np.stack([-a[c] * (flat[i] - m[c]) for i, c in enumerate(y.tolist())]).reshape(x.shape)
    np.testing.assert_allclose(out, x + 0.1 * grad, rtol=1e-10)


def _tiny_wrn(norm: str = "none") -> WideResNet:
    torch.manual_seed(0)
    return WideResNet(ModelConfig(depth=10, width=1, image_size=8, num_classes=4, norm=norm)).double()


def test_pyld_with_one_inner_step_equals_proximal_sgld_step():
    """Without noise the two agree. PYLD adds its noise after the inner steps and does not clamp
    it (JEM++ reference); proximal SGLD clamps after the noise (SADA-JEM reference)."""
    model = _tiny_wrn()
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # at the box edge
    prox = SamplerConfig(kind="sgld", step_size=0.2, noise=0.0, grad_clamp=1e-3, image_clamp=True)
    pyld = SamplerConfig(kind="pyld", steps=1, inner_steps=1, step_size=0.0, inner_step_size=0.2,
                         noise=0.0, grad_clamp=1e-3, image_clamp=True)
    a = sample(model, x0, prox, steps=1)
    b = sample(model, x0, pyld, steps=1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert not torch.equal(a, x0)
    torch.manual_seed(7)
    noisy = sample(model, x0, dataclasses.replace(pyld, noise=0.01), steps=1)
    torch.manual_seed(7)
    torch.testing.assert_close(noisy, b + 0.01 * torch.randn(b.shape, dtype=b.dtype), rtol=0, atol=1e-14)
    assert noisy.abs().max() > 1.0  # the noise is not clamped away


def _lse_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    torch.logsumexp(model(x), 1).sum().backward()
    return x.grad


@pytest.mark.parametrize("outer", [0.0, 0.3])
def test_pyld_inner_steps_on_linear_first_layer_repeat_the_outer_gradient(outer):
    """With a linear stem, grad_x <p, f0(x)> does not depend on x: N identical clamped steps."""
    model = _tiny_wrn()
    x0 = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 0.2 - 0.1
    eps, lr, n_inner = 2e-4, 0.5, 4
    cfg = SamplerConfig(kind="pyld", steps=1, inner_steps=n_inner, step_size=outer, inner_step_size=lr,
                        noise=0.0, grad_clamp=eps, image_clamp=False)
    g = _lse_grad(model, x0)
    assert (g.abs() < eps).any() and (g.abs() > eps).any(), "both clamped and unclamped entries"
    out = pyld_step(model, x0, cfg)
    expected = x0 + (outer + n_inner * lr) * g.clamp(-eps, eps)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_pyld_reusing_the_outer_gradient_equals_recomputing_it_per_inner_step(norm):
    """The cheap path (one gradient per outer step) against the reference's N first-layer
    forward/backward passes per outer step: same chains, clamps and noise included."""
    model = _tiny_wrn(norm=norm).train()
    x0 = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 2 - 1
    cfg = SamplerConfig(kind="pyld", steps=3, inner_steps=4, step_size=0.1, inner_step_size=0.2,
                        noise=0.01, grad_clamp=1e-3, image_clamp=True, bn_mode="train")
    runs = []
    for reuse in (False, True):
        clone = copy.deepcopy(model)
        torch.manual_seed(11)
        x = x0
        for _ in range(cfg.steps):
            x = pyld_step(clone, x, cfg, reuse_outer_gradient=reuse)
        runs.append((x, [b.clone() for b in clone.buffers()]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=1e-12)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):  # the same running-statistics updates
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(runs[1][0], x0)


class TanhStem(nn.Module):
    """f0(x) = tanh(W x) and g(h) = V h: a non-linear first layer with a hand-derivable gradient."""

    def __init__(self, w: np.ndarray, v: np.ndarray) -> None:
        super().__init__()
        self.w = torch.tensor(w)
        self.v = torch.tensor(v)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.reshape(x.shape[0], -1) @ self.w.T)

    def logits_from_stem(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.v.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_stem(self.stem(x))


def test_pyld_inner_steps_follow_the_frozen_slack_through_a_nonlinear_first_layer():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 4)) * 0.8
    v = rng.normal(size=(3, 6))
    x0 = rng.uniform(-0.5, 0.5, size=(2, 4))
    model = TanhStem(w, v)
    lr, n_inner = 0.1, 3
    cfg = SamplerConfig(kind="pyld", steps=1, inner_steps=n_inner, step_size=0.0, inner_step_size=lr,
                        noise=0.0, grad_clamp=None, image_clamp=False)
    out = pyld_step(model, torch.tensor(x0), cfg).numpy()  # type: ignore[arg-type]
    # p = dLSE/dh at x0 = V^T softmax(V h0); inner gradient = W^T (p * (1 - tanh^2(W x))).
    h0 = np.tanh(x0 @ w.T)
    logits = h0 @ v.T
    s = np.exp(logits - logits.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    p = s @ v
    x = x0.copy()
    for _ in range(n_inner):
        x = x + lr * (p * (1 - np.tanh(x @ w.T) ** 2)) @ w
    np.testing.assert_allclose(out, x, rtol=1e-10)
    one_full_step = x0 + n_inner * lr * (p * (1 - h0**2)) @ w
    assert not np.allclose(out, one_full_step), "inner steps must re-evaluate the first layer"


def test_sampling_batch_norm_modes():
    model = _tiny_wrn(norm="batch").float()
    model.train()
    for _ in range(2):  # give the running statistics something other than their init values
        model(torch.randn(16, 3, 8, 8))
    model.eval()
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1

    def stats(m: nn.Module) -> list[torch.Tensor]:
        return [b.clone() for name, b in m.named_buffers() if "running" in name]

    results = {}
    for mode in ("eval", "train", "train_frozen"):
        clone = copy.deepcopy(model)
        before = stats(clone)
        torch.manual_seed(0)
        results[mode] = sample(clone, x0, SamplerConfig(kind="sgld", steps=2, noise=0.0, bn_mode=mode))
        after = stats(clone)
        changed = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert changed == (mode == "train"), mode
        assert not clone.training, "sampling restores the model's own mode"
    torch.testing.assert_close(results["train"], results["train_frozen"])  # both use batch statistics
    assert not torch.allclose(results["eval"], results["train"])


def test_sampling_leaves_no_parameter_gradients():
    model = _tiny_wrn()
    sample(model, torch.rand(2, 3, 8, 8, dtype=torch.float64), SamplerConfig(kind="pyld", steps=2))
    assert all(p.grad is None for p in model.parameters())
