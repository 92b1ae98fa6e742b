"""A tiny model, batches and loss dict shared by the torch guard tests."""

from __future__ import annotations

import torch
from torch import nn

NAN = float("nan")


def small_net() -> nn.Module:
    """conv -> BatchNorm2d -> ReLU -> pool -> linear; images: [B, 3, 8, 8] float32, 3 classes."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images: [4, 3, 8, 8] float32; labels: [4] int64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator)


def two_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two loss components, as a detector has several (0-dim tensors)."""
    logits = model(images)
    return {"loss_classifier": nn.functional.cross_entropy(logits, labels),
            "loss_box_reg": 0.1 * logits.pow(2).mean()}
