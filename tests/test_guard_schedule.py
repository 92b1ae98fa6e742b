"""The LR schedule's formula, written once for every backend (`nanguard.guard.schedule`): warmup,
cosine, step drops, and the table a backend indexes on its device."""

from __future__ import annotations

import math

import pytest

from nanguard.config import TrainConfig
from nanguard.guard.schedule import multiplier, multipliers


def test_warmup_is_linear_then_cosine_ends_at_the_floor():
    f = [multiplier(s, steps=100, warmup=10, kind="cosine", min_ratio=0.05) for s in range(101)]
    assert f[0] == pytest.approx(0.1 * (0.05 + 0.95 * 0.5 * (1 + math.cos(0.0))))
    assert f[4] == pytest.approx(0.5 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.04))))
    assert f[50] == pytest.approx(0.05 + 0.95 * 0.5)  # halfway: the middle of the cosine
    assert f[100] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # after the warmup it only goes down


def test_step_drops_tenfold_at_two_thirds_and_eight_ninths():
    f = [multiplier(s, steps=90, warmup=0, kind="step", min_ratio=0.0) for s in range(91)]
    assert f[59] == 1.0 and f[60] == pytest.approx(0.1) and f[79] == pytest.approx(0.1)
    assert f[80] == pytest.approx(0.01)
    assert multiplier(40, steps=90, warmup=0, kind="constant", min_ratio=0.0) == 1.0


@pytest.mark.parametrize("steps,warmup", [(30, 5), (3, 8), (1, 0)])
def test_the_table_covers_every_count_until_the_multiplier_stops_changing(steps, warmup):
    cfg = TrainConfig(lr=0.1, steps=steps, warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1)
    table = multipliers(cfg)
    assert len(table) == max(steps, warmup) + 1
    settings = dict(steps=steps, warmup=warmup, kind="cosine", min_ratio=0.1)
    assert table == [multiplier(s, **settings) for s in range(len(table))]
    assert multiplier(len(table) + 50, **settings) == table[-1]  # beyond the table nothing changes
