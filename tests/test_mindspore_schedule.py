"""The MindSpore LR schedule is the shared formula (`nanguard.guard.schedule`) at every applied-update
count, as the PyTorch backend's is, and a skipped step does not advance it (the optimizer's global_step
is put back)."""

from __future__ import annotations

import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="mindspore is not installed (make install installs it)")
torch = pytest.importorskip("torch")
from mindspore import Tensor, nn  # noqa: E402

from nanguard.backends.mindspore import GuardedTrainStep  # noqa: E402
from nanguard.backends.mindspore.schedule import LRSchedule  # noqa: E402
from nanguard.backends.torch.devicestate import LRSchedule as TorchLRSchedule  # noqa: E402
from nanguard.config import TrainConfig  # noqa: E402
from nanguard.guard.schedule import multiplier  # noqa: E402


@pytest.mark.parametrize("kind", ["cosine", "step", "constant"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_the_schedule_equals_the_torch_backends(kind, warmup):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = TrainConfig(lr=0.04, steps=30, warmup_steps=warmup, schedule=kind, min_lr_ratio=0.02)
    ours = LRSchedule(cfg)
    for s in range(35):
        assert float(ours(Tensor(s, ms.int32))) == pytest.approx(_torch_lr(cfg, s), rel=1e-6), s
    ours.set_factor(0.25)
    assert float(ours(Tensor(3, ms.int32))) == pytest.approx(0.25 * _torch_lr(cfg, 3), rel=1e-6)


def _torch_lr(cfg, s):
    schedule = TorchLRSchedule(cfg)
    schedule.applied.fill_(s)
    lr = float(schedule.lr())
    assert lr == pytest.approx(cfg.lr * _formula(cfg, s), rel=1e-6)
    return lr


def _formula(cfg, s):
    return multiplier(s, steps=cfg.steps, warmup=cfg.warmup_steps, kind=cfg.schedule, min_ratio=cfg.min_lr_ratio)


class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(3, 1)

    def construct(self, x, poison):
        return ((self.dense(x) ** 2).mean() * poison,)


def test_a_skipped_step_does_not_advance_the_schedule():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = TrainConfig(lr=0.1, steps=10, warmup_steps=4, schedule="cosine")
    net = Net()
    schedule = LRSchedule(cfg)
    opt = nn.Momentum(net.trainable_params(), learning_rate=schedule, momentum=0.9)
    step = GuardedTrainStep(net, opt)
    x = Tensor(np.ones((4, 3), np.float32))
    lrs = []
    for poison in (1.0, 1.0, math.nan, 1.0):
        _, vector = step(x, Tensor(np.float32(poison)))
        lrs.append(float(vector.asnumpy()[2]))  # STEP_FIELDS "lr"
    assert lrs == pytest.approx([_torch_lr(cfg, 0), _torch_lr(cfg, 1), _torch_lr(cfg, 2), _torch_lr(cfg, 2)], rel=1e-6)
    assert int(opt.global_step.asnumpy()) == 3
