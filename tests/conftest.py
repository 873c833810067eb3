from __future__ import annotations

import pytest
import torch

from jem.config import Variant, deep_merge

torch.set_num_threads(2)


def tiny_variant(**overrides: object) -> Variant:
    """A WRN-10-1 on 8x8 images: small enough for many CPU steps per test."""
    base = {
        "name": "tiny",
        "model": {"depth": 10, "width": 1, "image_size": 8, "num_classes": 4, "bn_momentum": 0.1},
        "sampler": {"kind": "sgld", "steps": 2, "step_size": 1.0, "noise": 0.01},
        "buffer": {"size": 64, "init": "uniform"},
        "optim": {"name": "sgd", "lr": 0.05, "warmup_iters": 3, "milestones": [2]},
        "augment": {"crop_padding": 2},
        "train": {"epochs": 3, "batch_size": 8, "px_batch_size": 6, "log_every": 2, "seed": 3},
    }
    return Variant.from_dict(deep_merge(base, overrides))


@pytest.fixture
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(48) % 4
    return images, labels
