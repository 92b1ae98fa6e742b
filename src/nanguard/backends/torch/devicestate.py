"""Device-resident pieces of the guard: the spike detector, the LR schedule, state snapshots.

Everything here updates with tensor ops only (`torch.where`, `index_put_`), so none of it makes the host
wait for the device.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from nanguard.config import TrainConfig
from nanguard.guard.schedule import multipliers
from nanguard.guard.spikes import MAD_TO_STD


class DeviceSpikeDetector:
    """The device mirror of `nanguard.guard.spikes.SpikeDetector` (same algorithm, same defaults; the
    guard passes `GuardConfig`'s spike_* values to both).

    The window is a ring buffer of the last `window` accepted values; empty slots are NaN, so
    `torch.nanmedian` (the lower median, as the reference uses) sees only accepted values. float64, so
    the bounds agree with the pure-Python reference.
    """

    def __init__(self, window: int = 50, min_history: int = 20, threshold: float = 10.0,
                 min_ratio: float = 2.0, rel_eps: float = 1e-3, early_history: int = 3, early_ratio: float = 10.0,
                 device: torch.device | str = "cpu") -> None:
        self.window, self.min_history = int(window), int(min_history)
        self.threshold, self.min_ratio, self.rel_eps = float(threshold), float(min_ratio), float(rel_eps)
        self.early_history, self.early_ratio = int(early_history), float(early_ratio)
        self.values = torch.full((self.window,), math.nan, dtype=torch.float64, device=device)
        self.next = torch.zeros((1,), dtype=torch.long, device=device)  # slot the next value goes into
        self.count = torch.zeros((), dtype=torch.long, device=device)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Judge the scalar `x`; add it to the window unless it is non-finite or a spike.
        Returns a 0-dim bool tensor (no sync: the flag stays on the device)."""
        x = x.detach().to(torch.float64).reshape(())
        finite = torch.isfinite(x)
        median = torch.nanmedian(self.values)
        mad = torch.nanmedian((self.values - median).abs())
        scale = torch.maximum(mad, self.rel_eps * median.abs())
        bound = torch.maximum(median + self.threshold * MAD_TO_STD * scale, self.min_ratio * median)
        learning = self.count < self.min_history
        early_bound = self.early_ratio * torch.where(torch.isnan(self.values), -math.inf, self.values).max()
        early = learning & (self.count >= max(self.early_history, 1)) & (x > early_bound) if self.early_history \
            else torch.zeros_like(learning)
        spike = finite & ((~learning & (x > bound)) | early)
        accept = finite & ~spike
        current = self.values.index_select(0, self.next)
        self.values.index_put_((self.next,), torch.where(accept, x, current))
        self.next.copy_(torch.where(accept, (self.next + 1) % self.window, self.next))
        self.count.copy_(torch.where(accept, torch.clamp(self.count + 1, max=self.window), self.count))
        return spike

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.clone(), "next": self.next.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.values.copy_(state["values"])
        self.next.copy_(state["next"])
        self.count.copy_(state["count"])


class LRSchedule:
    """Learning rate as a function of the number of *applied* updates, counted on the device.

    A masked step does not advance the schedule, and nobody on the host needs to know which steps were
    masked: `lr()` is a device tensor that fused optimizers read directly. The formula is
    `nanguard.guard.schedule` (the same for every backend): a table on the device, indexed by the count.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu") -> None:
        self.base_lr = float(cfg.lr)
        self.table = torch.tensor(multipliers(cfg), dtype=torch.float64, device=device)
        self.applied = torch.zeros((), dtype=torch.float64, device=device)

    def lr(self) -> torch.Tensor:
        index = torch.clamp(self.applied, max=len(self.table) - 1).long().reshape(1)
        return (self.base_lr * self.table.index_select(0, index).reshape(())).to(torch.float32)

    def advance(self, applied: torch.Tensor) -> None:
        """Count one update if `applied` (a 0-dim bool tensor) is true."""
        self.applied.add_(applied.to(self.applied.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied.copy_(state["applied"])


def bn_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every buffer that a forward pass in train mode writes: BatchNorm's running stats and counters."""
    found = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
            found += [b for b in (module.running_mean, module.running_var, module.num_batches_tracked)
                      if b is not None]
    return found


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """Create the optimizer's per-parameter state now, exactly as its first step would.

    torch creates state lazily on the first step, so a masked first step would still leave state
    behind (and SGD's momentum buffer would hold garbage). Made up front, a masked step changes
    nothing. SGD's first step sets buf = grad; a zero buffer gives buf = 0 * m + grad = grad bit for bit
    when dampening is 0 (the default). Returns False where some state stays lazy (SGD with dampening,
    optimizers other than SGD/Adam/AdamW): the guard then checks the first step on the host.
    """
    exact = True
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if isinstance(optimizer, torch.optim.SGD):
                if group.get("momentum", 0) and not group.get("dampening", 0):
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif group.get("momentum", 0):
                    exact = False
            elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                fused_or_capturable = group.get("fused") or group.get("capturable")
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device)
                                 if fused_or_capturable else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                exact = False
    return exact


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def to_host(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU (a rollback snapshot must survive the device state)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return copy.deepcopy(obj)


class LossScaler:
    """The guard's view of fp16 loss scaling: the one place that knows `torch.amp.GradScaler`'s internals
    (`_per_optimizer_states`, `_scale`, `_growth_tracker`; tested against the pinned torch).

    An fp16 overflow is the scaler's business: it backs off and the step is masked. A guard incident is
    not: the scale and its growth tracker stay as they were, as if the step never ran.
    """

    def __init__(self, scaler, optimizer: torch.optim.Optimizer) -> None:
        self.scaler, self.optimizer = scaler, optimizer
        self.enabled = scaler is not None and scaler.is_enabled()

    def backward(self, total: torch.Tensor) -> None:
        (self.scaler.scale(total) if self.enabled else total).backward()
        if self.enabled:
            self.scaler.unscale_(self.optimizer)  # found_inf stays on the device

    def found_inf(self, device: torch.device) -> torch.Tensor:
        """0-dim bool: did unscaling find an inf/NaN gradient (an overflow, or a real NaN)?"""
        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        return (sum(v.to(device) for v in state["found_inf_per_device"].values()) > 0).reshape(())

    def update_unless(self, incident: torch.Tensor) -> torch.Tensor:
        """Let the scaler back off (or grow) as usual, except on a guard incident. Returns the scale."""
        scale, tracker = self.scaler._scale.clone(), self.scaler._growth_tracker.clone()
        self.scaler.update()
        self.scaler._scale.copy_(torch.where(incident, scale, self.scaler._scale))
        self.scaler._growth_tracker.copy_(torch.where(incident, tracker, self.scaler._growth_tracker))
        return self.scaler._scale.reshape(()).float()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
