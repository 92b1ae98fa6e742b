"""What the guard checks on the device every step (`guard.*` in the config). Framework-neutral: every
backend reads the same settings; the recovery side is `nanguard.guard.policy.PolicyConfig`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GuardConfig:
    enabled: bool = True  # false: a plain step (backward, clip, step), as torchvision's reference runs
    clip_norm: float = 10.0  # 0 disables clipping; the check always runs before the clip
    param_check_every: int = 10
    param_abs_max: float = 1.0e4  # a finite weight above this is silent corruption (a flipped exponent bit)
    spike_window: int = 50
    spike_min_history: int = 20
    spike_threshold: float = 10.0  # in robust standard deviations (1.4826 * MAD)
    spike_min_ratio: float = 3.0  # and at least 3x the median: late in a cosine schedule grad norms sit
    # so still that 2x their median (harmless: clipping bounds the update) was flagged in clean runs
    spike_early_history: int = 3  # from this many healthy steps until spike_min_history: ...
    spike_early_ratio: float = 10.0  # ... a value above this many times the largest so far is a spike
    # (an LR blow-up in the first steps is caught at once; 0 early_history turns the rule off)

    def spike_settings(self) -> dict[str, float | int]:
        """The keyword arguments of `SpikeDetector` (and of a backend's device mirror of it)."""
        return {"window": self.spike_window, "min_history": self.spike_min_history,
                "threshold": self.spike_threshold, "min_ratio": self.spike_min_ratio,
                "early_history": self.spike_early_history, "early_ratio": self.spike_early_ratio}
