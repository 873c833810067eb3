"""SAM / ASAM against hand-computed updates; batch-norm statistics in the second pass."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from jem.method.sam import SAM
from jem.method.samplers import frozen_bn_stats
from jem.method.train import Trainer

from .conftest import tiny_variant


class TwoParams(nn.Module):
    """L(w) = 2 w1^2 + w1 w2 + 3 w2^2 - w2, gradient (4 w1 + w2, w1 + 6 w2 - 1)."""

    def __init__(self, w1: float, w2: float) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(w1, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor(w2, dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        return 2 * self.w1**2 + self.w1 * self.w2 + 3 * self.w2**2 - self.w2


def grad(w: np.ndarray) -> np.ndarray:
    return np.array([4 * w[0] + w[1], w[0] + 6 * w[1] - 1])


def sam_step(model: TwoParams, opt: SAM) -> None:
    opt.zero_grad()
    model.loss().backward()
    opt.first_step()
    opt.zero_grad()
    model.loss().backward()
    opt.second_step()


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_steps_equal_the_hand_computed_update(adaptive):
    w = np.array([0.7, -1.3])
    rho, lr, mom = 0.3, 0.1, 0.9
    model = TwoParams(*w)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=lr, momentum=mom), rho=rho, adaptive=adaptive)
    buf = np.zeros(2)
    for _ in range(3):
        g = grad(w)
        if adaptive:  # e = rho |w|^2 g / || |w| g ||
            e = rho * w**2 * g / np.linalg.norm(np.abs(w) * g)
        else:  # e = rho g / ||g||
            e = rho * g / np.linalg.norm(g)
        g_sam = grad(w + e)
        buf = mom * buf + g_sam if buf.any() else g_sam
        w = w - lr * buf
        sam_step(model, opt)
        got = np.array([model.w1.item(), model.w2.item()])
        np.testing.assert_allclose(got, w, rtol=1e-12)


def test_sam_with_rho_zero_is_the_base_optimizer():
    a, b = TwoParams(0.2, 0.4), TwoParams(0.2, 0.4)
    sam = SAM(torch.optim.Adam(a.parameters(), lr=0.01), rho=0.0)
    base = torch.optim.Adam(b.parameters(), lr=0.01)
    for _ in range(3):
        sam_step(a, sam)
        base.zero_grad()
        b.loss().backward()
        base.step()
    assert a.w1.item() == b.w1.item() and a.w2.item() == b.w2.item()


def test_second_pass_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.9), nn.Flatten(), nn.LazyLinear(2))
    model.train()
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    bn = model[1]
    after_first = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    opt.first_step()
    opt.zero_grad()
    with frozen_bn_stats(model):
        nn.functional.cross_entropy(model(x * 3 + 1), y).backward()  # very different statistics
    opt.second_step()
    assert torch.equal(bn.running_mean, after_first[0])
    assert torch.equal(bn.running_var, after_first[1])
    assert torch.equal(bn.num_batches_tracked, after_first[2])
    assert bn.momentum == 0.9


def test_trainer_sam_step_updates_batch_norm_once(tiny_data):
    """A softmax+SAM step moves the running statistics exactly as one forward of its batch does;
    the second pass counts in num_batches_tracked, as the reference's momentum-0 pass does."""
    images, labels = tiny_data
    variant = tiny_variant(objective={"generative": False}, optim={"sam": "sam", "rho": 0.5},
                           model={"bn_momentum": 0.5})
    trainer = Trainer(variant, images, labels)
    reference = copy.deepcopy(trainer.model)
    x_lab, _ = trainer.clf_stream.batch(0)
    trainer.train_step()
    reference.train()
    with torch.no_grad():
        reference(x_lab)
    for (name, got), (_, want) in zip(trainer.model.named_buffers(), reference.named_buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert int(got) == int(want) + 1, name
        else:
            torch.testing.assert_close(got, want, msg=name)
