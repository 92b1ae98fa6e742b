"""The learning-rate schedule for MindSpore optimizers, counting applied updates.

    schedule = LRSchedule(cfg.train)
    optimizer = nn.Momentum(params, learning_rate=schedule, momentum=0.9)

A MindSpore optimizer evaluates its `learning_rate` schedule at its own `global_step`, which
`GuardedTrainStep` puts back on a skipped step: so the schedule counts applied updates only, like
`nanguard.backends.torch.devicestate.LRSchedule` (the same formula: `nanguard.guard.schedule`). `factor` is the
policy's LR factor (a backoff), a Parameter the host sets between steps.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from nanguard.config import TrainConfig
from nanguard.guard.schedule import multipliers


class LRSchedule(nn.learning_rate_schedule.LearningRateSchedule):
    """train.lr times the multiplier of `nanguard.guard.schedule` (a table indexed by the global step),
    times `factor`."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.base_lr = float(cfg.lr)
        table = multipliers(cfg)
        self.table = Tensor(np.array(table, np.float64), ms.float64)
        self.last = len(table) - 1
        self.factor = Parameter(Tensor(1.0, ms.float32), name="nanguard_lr_factor", requires_grad=False)

    def construct(self, global_step: Tensor) -> Tensor:
        index = ops.minimum(ops.cast(global_step, ms.int32).reshape(-1)[:1], self.last)
        return ops.cast(self.base_lr * ops.gather(self.table, index, 0).reshape(()), ms.float32) * self.factor

    def set_factor(self, value: float) -> None:
        """The policy's LR factor from the next step on (a host write between steps)."""
        self.factor.set_data(Tensor(float(value), ms.float32))
