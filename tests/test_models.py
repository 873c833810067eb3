"""The Wide-ResNet against its definition: shapes, parameter and FLOP counts, energy."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jem.config.variant import ModelConfig
from jem.method.models import WideResNet, energy, energy_from_logits


def expected_parameters(depth: int, k: int, classes: int, batch_norm: bool) -> int:
    """Conv weights + biases, BN affine pairs and the linear head, counted from the WRN recipe."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 16 * 9 + 16  # stem
    bn = (lambda c: 2 * c) if batch_norm else (lambda c: 0)
    in_c = 16
    for out_c in widths[1:]:
        for _ in range(n):
            total += bn(in_c) + in_c * out_c * 9 + out_c + bn(out_c) + out_c * out_c * 9 + out_c
            if in_c != out_c:
                total += in_c * out_c + out_c  # 1x1 shortcut
            in_c = out_c
    return total + bn(in_c) + in_c * classes + classes


@pytest.mark.parametrize("depth,k,classes,norm", [(28, 10, 10, "batch"), (28, 10, 100, "none"), (10, 2, 4, "batch")])
def test_parameter_count_matches_the_recipe(depth, k, classes, norm):
    model = WideResNet(ModelConfig(depth=depth, width=k, num_classes=classes, norm=norm))
    got = sum(p.numel() for p in model.parameters())
    assert got == expected_parameters(depth, k, classes, norm == "batch")
    assert model.feature_dim == 64 * k


def expected_flops(depth: int, k: int, size: int, classes: int) -> int:
    """2 x MACs of one image, stride on each group's second 3x3 conv (the JEM variant of WRN)."""
    n = (depth - 4) // 6
    macs = size * size * 16 * 27  # stem
    in_c, res = 16, size
    for out_c, stride in zip((16 * k, 32 * k, 64 * k), (1, 2, 2), strict=True):
        for i in range(n):
            s = stride if i == 0 else 1
            macs += res * res * out_c * in_c * 9  # conv1 at the input resolution
            res //= s
            macs += res * res * out_c * out_c * 9  # conv2 (strided)
            if in_c != out_c or s != 1:
                macs += res * res * out_c * in_c  # 1x1 shortcut
            in_c = out_c
    return 2 * (macs + in_c * classes)


def test_wrn_28_10_is_the_papers_size():
    model = WideResNet(ModelConfig())
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(36.5, abs=0.1)


@pytest.mark.parametrize("depth,k,size,classes", [(28, 10, 32, 10), (10, 1, 8, 3), (16, 2, 16, 5)])
def test_flop_count_matches_the_recipe(depth, k, size, classes):
    """FlopCounterMode (what jem-bench counts iterations with) on a forward of 3 images."""
    model = WideResNet(ModelConfig(depth=depth, width=k, image_size=size, num_classes=classes))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(3, 3, size, size))
    assert counter.get_total_flops() == 3 * expected_flops(depth, k, size, classes)


def test_forward_shapes_norms_and_energy():
    cfg = ModelConfig(depth=10, width=2, num_classes=7, image_size=16, norm="batch", bn_momentum=0.9)
    model = WideResNet(cfg).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.9 for m in bns)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    logits = model(x)
    assert logits.shape == (5, 7) and model.features(x).shape == (5, 128)
    torch.testing.assert_close(model.logits_from_stem(model.stem(x)), logits)
    assert model.stem(x).shape == (5, 16, 16, 16)
    torch.testing.assert_close(energy(model, x), -torch.log(torch.exp(logits).sum(1)))
    y = torch.tensor([0, 6, 3, 3, 1])
    torch.testing.assert_close(energy_from_logits(logits, y), -logits[torch.arange(5), y])
    plain = WideResNet(ModelConfig(depth=10, width=1, norm="none"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
