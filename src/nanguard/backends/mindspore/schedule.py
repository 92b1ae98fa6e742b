"""The PyTorch backend's learning-rate schedule for MindSpore optimizers, counting applied updates.

    schedule = LRSchedule(cfg.train)
    optimizer = nn.Momentum(params, learning_rate=schedule, momentum=0.9)

A MindSpore optimizer evaluates its `learning_rate` schedule at its own `global_step`, which
`GuardedTrainStep` puts back on a skipped step: so the schedule counts applied updates only, like
`nanguard.backends.torch.devicestate.LRSchedule` (same formula, tested against it). `factor` is the
policy's LR factor (a backoff), a Parameter the host sets between steps.
"""

from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from nanguard.config import TrainConfig


class LRSchedule(nn.learning_rate_schedule.LearningRateSchedule):
    """warmup: linear from lr/warmup to lr; then `cosine` (down to lr * min_lr_ratio), `step` (x0.1 at
    2/3 and 8/9 of the steps) or `constant`; times `factor`."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.base_lr, self.total = float(cfg.lr), max(1, int(cfg.steps))
        self.warmup, self.kind, self.min_ratio = int(cfg.warmup_steps), cfg.schedule, float(cfg.min_lr_ratio)
        self.factor = Parameter(Tensor(1.0, ms.float32), name="nanguard_lr_factor", requires_grad=False)

    def construct(self, global_step: Tensor) -> Tensor:
        s = ops.cast(global_step, ms.float64).reshape(())
        factor = ops.ones((), ms.float64)
        if self.warmup > 0:
            factor = ops.clamp((s + 1) / self.warmup, max=1.0)
        if self.kind == "cosine":
            progress = ops.clamp(s / self.total, 0.0, 1.0)
            factor = factor * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + ops.cos(math.pi * progress)))
        elif self.kind == "step":
            drops = ops.cast(s >= self.total * 2 / 3, ms.float64) + ops.cast(s >= self.total * 8 / 9, ms.float64)
            factor = factor * ops.pow(0.1, drops)
        return ops.cast(self.base_lr * factor, ms.float32) * self.factor

    def set_factor(self, value: float) -> None:
        """The policy's LR factor from the next step on (a host write between steps)."""
        self.factor.set_data(Tensor(float(value), ms.float32))
