"""The learning-rate schedule's formula, written once: the LR multiplier after `s` applied updates.

warmup: linear from 1/warmup to 1 over the first `warmup` updates; then `cosine` (down to
`min_lr_ratio`), `step` (x0.1 at 2/3 and 8/9 of the steps, torchvision's 26/29-of-26 style) or
`constant`. A backend puts `multipliers(cfg)` on its device once and picks entry `min(s, last)` with a
device-side index (no host round trip, and a masked step does not advance `s`); past the last entry
the multiplier no longer changes.
"""

from __future__ import annotations

import math

from nanguard.config import TrainConfig


def multiplier(s: int, *, steps: int, warmup: int, kind: str, min_ratio: float) -> float:
    """The LR multiplier after `s` applied updates (float64)."""
    total = max(1, int(steps))
    factor = min((s + 1) / warmup, 1.0) if warmup > 0 else 1.0
    if kind == "cosine":
        progress = min(max(s / total, 0.0), 1.0)
        factor *= min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif kind == "step":
        factor *= 0.1 ** ((s >= total * 2 / 3) + (s >= total * 8 / 9))
    return factor


def multipliers(cfg: TrainConfig) -> list[float]:
    """`multiplier(s)` for s = 0 .. max(train.steps, train.warmup_steps): the last entry holds beyond."""
    last = max(1, int(cfg.steps), int(cfg.warmup_steps))
    settings = dict(steps=cfg.steps, warmup=int(cfg.warmup_steps), kind=cfg.schedule, min_ratio=float(cfg.min_lr_ratio))
    return [multiplier(s, **settings) for s in range(last + 1)]
