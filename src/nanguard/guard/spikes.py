"""A robust spike detector (median / MAD over a window that excludes suspects): the pure-Python
reference. The device-side version in a backend mirrors it exactly, and tests compare the two.

The algorithm, for each new value x:

1. If x is not finite (nan, inf, -inf): return False (non-finite is its own flag, not a spike) and do
   not add x to the window.
2. If the window holds fewer than `min_history` values (still learning):
     spike = the window holds at least `early_history` values and x > early_ratio * max(v)
   A jump by an order of magnitude (an LR blow-up in the first steps of a run) is caught at once,
   without waiting for a history long enough for the robust bounds. Flagged: return True, do not add x;
   else add x, return False.
3. Otherwise, over the window `v` (the last `window` ACCEPTED values, oldest dropped first):
     median = lower median of v             (sorted(v)[(len(v) - 1) // 2], what torch.median returns)
     mad    = lower median of |v_i - median|
     scale  = max(mad, rel_eps * |median|)  (a floor: a flat window must not flag tiny noise)
     spike  = x > median + threshold * 1.4826 * scale  and  x > min_ratio * median
   Upward only: a drop is never a spike. If spike: return True and do NOT add x (a suspect must not
   drag the baseline up). Else add x, return False.

1.4826 makes the MAD a consistent estimator of the standard deviation for normal data. Defaults:
window=50, min_history=20, threshold=10, min_ratio=2.0, rel_eps=1e-3, early_history=3,
early_ratio=10 (early_history=0 turns the early rule off). A lasting level shift of more
than both bounds is flagged on every step (the window only learns accepted values); the policy's skip
budget turns that into a stop with a verdict rather than a silent drift.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

MAD_TO_STD = 1.4826


def lower_median(values: list[float]) -> float:
    """sorted(values)[(n - 1) // 2]: the lower of the two middle values for an even n."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


class SpikeDetector:
    """Flags upward spikes of a scalar series (a loss, a gradient norm). See the module docstring."""

    def __init__(self, window: int = 50, min_history: int = 20, threshold: float = 10.0,
                 min_ratio: float = 2.0, rel_eps: float = 1e-3, early_history: int = 3,
                 early_ratio: float = 10.0) -> None:
        if window < 1 or not 1 <= min_history <= window:
            raise ValueError(f"need 1 <= min_history <= window, got {min_history=} {window=}")
        if threshold <= 0 or min_ratio < 0 or rel_eps < 0 or early_history < 0 or early_ratio < 1:
            raise ValueError(f"bad spike bounds: {threshold=} {min_ratio=} {rel_eps=} {early_history=} "
                             f"{early_ratio=}")
        self.window = int(window)
        self.min_history = int(min_history)
        self.threshold = float(threshold)
        self.min_ratio = float(min_ratio)
        self.rel_eps = float(rel_eps)
        self.early_history = int(early_history)
        self.early_ratio = float(early_ratio)
        self._history: deque[float] = deque(maxlen=self.window)

    @property
    def history(self) -> list[float]:
        """The accepted values in the window, oldest first."""
        return list(self._history)

    def bound(self) -> float | None:
        """The value above which x is a spike, or None while the window is too short for any rule."""
        if len(self._history) < self.min_history:
            if self.early_history and len(self._history) >= self.early_history:
                return self.early_ratio * max(self._history)
            return None
        values = list(self._history)
        median = lower_median(values)
        mad = lower_median([abs(value - median) for value in values])
        scale = max(mad, self.rel_eps * abs(median))
        return max(median + self.threshold * MAD_TO_STD * scale, self.min_ratio * median)

    def is_spike(self, x: float) -> bool:
        """Would x be flagged now? (Does not change the window.)"""
        x = float(x)
        if not math.isfinite(x):
            return False
        bound = self.bound()
        return bound is not None and x > bound

    def update(self, x: float) -> bool:
        """Judge x, add it to the window unless it is flagged or non-finite, return whether it is a
        spike."""
        x = float(x)
        if not math.isfinite(x):
            return False
        spike = self.is_spike(x)
        if not spike:
            self._history.append(x)
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "min_history": self.min_history,
            "threshold": self.threshold,
            "min_ratio": self.min_ratio,
            "rel_eps": self.rel_eps,
            "early_history": self.early_history,
            "early_ratio": self.early_ratio,
            "history": list(self._history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the settings and the window (e.g. from a checkpoint or a rollback snapshot)."""
        self.__init__(  # type: ignore[misc]  # re-validate the settings
            window=state["window"], min_history=state["min_history"],
            threshold=state["threshold"], min_ratio=state["min_ratio"],
            rel_eps=state.get("rel_eps", 1e-3), early_history=state.get("early_history", 0),
            early_ratio=state.get("early_ratio", 10.0))
        self._history.extend(float(value) for value in state["history"][-self.window:])
