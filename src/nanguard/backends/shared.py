"""What every backend does the same way, framework-free."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

P = TypeVar("P")


def split_decay(params: Iterable[P], ndim: Callable[[P], int]) -> tuple[list[P], list[P]]:
    """(decayed, not decayed): no weight decay on norms and biases (the 0-d and 1-d parameters), as
    torchvision's references' `norm_weight_decay=0` habit does."""
    decay, no_decay = [], []
    for p in params:
        (no_decay if ndim(p) <= 1 else decay).append(p)
    return decay, no_decay
