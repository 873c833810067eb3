"""Short CPU runs of every method family on a small learnable task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jem.config.variant import Variant, deep_merge
from jem.data.batches import to_unit_range
from jem.method.gmm import compute_mixture_stats
from jem.method.models import energy
from jem.method.samplers import sample
from jem.method.train import Trainer


def prototype_task(n: int, seed: int, size: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class is a fixed smooth colour pattern plus pixel noise (uint8 images)."""
    protos = F.interpolate(torch.rand(classes, 3, 3, 3, generator=torch.Generator().manual_seed(123)),
                           size=size, mode="bilinear", align_corners=True)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = protos[labels] * 0.7 + 0.15 + 0.12 * torch.randn(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


BASE = {
    "model": {"depth": 10, "width": 1, "image_size": 8, "num_classes": 4},
    "buffer": {"size": 256},
    "optim": {"name": "adam", "lr": 2e-3, "weight_decay": 0.0, "warmup_iters": 20, "schedule": "constant"},
    "augment": {"crop_padding": 1},
    "train": {"epochs": 4, "batch_size": 32, "px_batch_size": 32, "log_every": 16},
}
FAMILIES = {
    "softmax": {"objective": {"generative": False}},
    "jem": {"model": {"norm": "none"},
            "sampler": {"kind": "sgld", "steps": 5, "step_size": 1.0, "noise": 0.01}},
    "jempp": {"sampler": {"kind": "pyld", "steps": 2, "inner_steps": 3, "step_size": 0.0,
                          "inner_step_size": 0.2, "grad_clamp": 1.0, "image_clamp": True, "bn_mode": "train"},
              "buffer": {"init": "gmm"}},
    "sadajem": {"sampler": {"kind": "sgld", "steps": 3, "step_size": 1.0, "noise": 0.0, "grad_clamp": 1.0,
                            "image_clamp": True, "bn_mode": "train"},
                "buffer": {"init": "gmm"}, "optim": {"sam": "sam", "rho": 0.05},
                "objective": {"px_augment": False}},
}


@pytest.mark.e2e
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_learns_and_its_samples_lower_their_energy(family):
    x, y = prototype_task(512, seed=0)
    x_test, y_test = prototype_task(256, seed=1)
    variant = Variant.from_dict(deep_merge(BASE, {**FAMILIES[family], "name": family}))
    trainer = Trainer(variant, x, y, mixture=compute_mixture_stats([(x, y)], 4))
    trainer.fit(progress=False)
    model = trainer.model.eval()
    with torch.no_grad():
        accuracy = (model(to_unit_range(x_test)).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.7, f"{family}: test accuracy {accuracy:.3f} (chance 0.25)"
    if trainer.buffer is not None:
        torch.manual_seed(0)
        x0, _ = trainer.buffer.p0.sample(128)
        x_k = sample(model, x0, variant.sampler)
        with torch.no_grad():
            e0, e_k = energy(model.eval(), x0).mean().item(), energy(model, x_k).mean().item()
        assert e_k < e0, f"{family}: sampling raised the energy ({e0:.3f} -> {e_k:.3f})"
