"""The guard for PyTorch: detect on the device with no host sync, mask a bad update, recover by policy.

    guard = Guard(model, optimizer, config=GuardConfig(), policy=PolicyConfig())
    for images, targets in batches:
        losses = model(images, targets)          # a dict of scalar loss components
        for outcome in guard.step(losses):       # backward, check, clip, masked update, policy
            ...                                  # outcomes of the previous step (read one step late)
        if guard.stopped:
            break

What one `step` does, on the device, without the host ever waiting for it:
  backward -> check (each loss component, the global grad norm, BatchNorm buffers, spikes)
  -> clip (after the check: a NaN norm would turn every clipped gradient into NaN)
  -> masked update: fused optimizers take the flag as `found_inf`; others are restored with
     `torch.where` (never multiply-by-zero: NaN * 0 is NaN); BatchNorm running stats written by this
     forward are put back; the LR schedule counts applied updates only
  -> every `param_check_every` steps, check the parameters themselves (silent corruption)
  -> pack the step's numbers into one small tensor and copy it to the host without blocking.
The host reads that copy one step later, turns it into an `Observation`, and the pure policy
(`nanguard.guard.policy.decide`) answers skip / LR backoff / rollback / quarantine / stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanguard.config import GuardConfig
from nanguard.guard import (
    Decision,
    IncidentLog,
    NullIncidentLog,
    Observation,
    PolicyConfig,
    PolicyState,
    decide,
)
from nanguard.backends.torch.devicestate import (
    DeviceSpikeDetector,
    LRSchedule,
    bn_buffers,
    materialize_optimizer_state,
    optimizer_state_tensors,
    to_host,
)

# Layout of the per-step observation vector that travels to the host (after the loss components).
_FIELDS = ("total_loss", "grad_norm", "lr", "loss_scale", "nonfinite_loss", "nonfinite_grad",
           "nonfinite_buffer", "loss_spike", "grad_spike", "params_checked", "nonfinite_param",
           "wild_param", "scale_overflow", "applied")


@dataclass(frozen=True)
class Outcome:
    """One step's observation and the policy's decision about it."""

    observation: Observation
    decision: Decision


class NoFaults:
    """The null fault injector (a user's loop and clean runs): every hook leaves things as they are."""

    lr_factor = 1.0

    def on_batch(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], image_ids: tuple) -> None:
        """When: the batch is on the device, before the forward pass (the trainer calls it)."""

    def on_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """When: after the forward pass, before the losses are summed."""
        return losses

    def after_backward(self, params: list[torch.nn.Parameter]) -> None:
        """When: after backward, before the check."""

    def after_update(self, params: list[torch.nn.Parameter]) -> None:
        """When: after the (masked) optimizer update, before the parameter check."""


@dataclass
class _Pending:
    step: int
    host: torch.Tensor | None  # the observation vector on the host (None: a host-known model error)
    event: Any  # torch.cuda.Event or None
    names: tuple[str, ...]
    image_ids: tuple
    annotation_ids: tuple
    model_error: str | None = None


class Guard:
    """Guards any PyTorch training loop (see the module docstring). `scaler`: a `torch.amp.GradScaler`
    for fp16; `schedule`: nanguard's device-side `LRSchedule` (without one, the optimizer's own lr is
    used, times the policy's LR factor)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scaler=None,
                 config: GuardConfig | None = None, policy: PolicyConfig | None = None,
                 schedule: LRSchedule | None = None, incident_log: IncidentLog | NullIncidentLog | None = None,
                 on_snapshot: Callable[[int], None] | None = None, rank: int = 0) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.config = config or GuardConfig()
        self.policy_config = policy or PolicyConfig()
        self.schedule = schedule
        self.incidents = incident_log or NullIncidentLog()
        self.rank = rank
        self.policy_state = PolicyState()
        self.lr_factor = 1.0
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device = self.params[0].device
        self.fused = all(group.get("fused") for group in optimizer.param_groups)
        # a masked first step must leave no state behind: create it now, or (where torch's lazy state
        # cannot be reproduced exactly) check the steps until it exists on the host
        self._lazy_state = not materialize_optimizer_state(optimizer)
        self.buffers = bn_buffers(model)
        self._buffer_snapshot = [b.detach().clone() for b in self.buffers]
        c = self.config
        self.loss_spikes = DeviceSpikeDetector(c.spike_window, c.spike_min_history, c.spike_threshold,
                                               c.spike_min_ratio, device=self.device)
        self.grad_spikes = DeviceSpikeDetector(c.spike_window, c.spike_min_history, c.spike_threshold,
                                               c.spike_min_ratio, device=self.device)
        self.steps_run = 0  # data positions consumed by this guard (the observation's `step`)
        self._pending: _Pending | None = None
        self._staged: tuple[int, dict[str, Any]] | None = None  # snapshot waiting for its verdict
        self._snapshots: list[tuple[int, dict[str, Any]]] = [(-1, self._capture())]
        self.stopped = False
        self.on_snapshot = on_snapshot

    # ------------------------------------------------------------------------------------------
    # The step

    def step(self, losses: dict[str, torch.Tensor], *, image_ids: tuple = (), annotation_ids: tuple = (),
             faults: NoFaults | None = None) -> list[Outcome]:
        """Backward, check, clip, masked update, then the policy on the previous step's observation."""
        faults = faults or NoFaults()
        step = self.steps_run
        names, components, total, scaler_on = self._backward(losses, faults)
        if scaler_on:
            overflow = self._scaler_found_inf()
        grads = [p.grad for p in self.params if p.grad is not None]

        # check: all flags are 0-dim device tensors (no sync: nothing here is read on the host)
        nonfinite_loss = ~torch.isfinite(components).all()
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads \
            else torch.zeros((), device=self.device)
        nonfinite_grad = ~torch.isfinite(grad_norm)
        nonfinite_buffer = ~torch.isfinite(torch.stack(torch._foreach_norm(
            [b for b in self.buffers if b.is_floating_point()]))).all() if self.buffers \
            else torch.zeros((), dtype=torch.bool, device=self.device)
        loss_spike = self.loss_spikes.update(total.detach())
        grad_spike = self.grad_spikes.update(grad_norm)
        if scaler_on:  # an fp16 overflow is the scaler's business (it backs off); not an incident
            scale_overflow = overflow & ~nonfinite_loss
            reported_nonfinite_grad = nonfinite_grad & ~overflow  # fp16 cannot tell NaN from overflow
            incident = nonfinite_loss | nonfinite_buffer | loss_spike | (grad_spike & ~overflow)
            skip = incident | overflow
        else:
            scale_overflow = torch.zeros((), dtype=torch.bool, device=self.device)
            reported_nonfinite_grad = nonfinite_grad
            incident = nonfinite_loss | nonfinite_grad | nonfinite_buffer | loss_spike | grad_spike
            skip = incident

        # clip, after the check; a skipped step's coefficient is irrelevant (its update is masked)
        if self.config.clip_norm > 0 and grads:
            coef = torch.clamp(self.config.clip_norm / (grad_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))

        # masked update: optimizer, BatchNorm buffers, schedule, loss scale
        stateless = [p for p in self.params if not self.optimizer.state.get(p)] if self._lazy_state else []
        lr = self._masked_optimizer_step(skip, faults.lr_factor)
        if stateless and bool(skip):  # sync-ok: only until a lazily-created optimizer state exists
            for p in stateless:
                self.optimizer.state.pop(p, None)  # created by a masked step: as if it never ran
        elif stateless:
            self._lazy_state = False
        self._restore_where(skip, self.buffers, self._buffer_snapshot)
        if self.schedule is not None:
            self.schedule.advance(~skip)
        loss_scale = self._update_scaler(incident) if scaler_on else torch.full((), math.nan, device=self.device)
        faults.after_update(self.params)
        torch._foreach_copy_(self._buffer_snapshot, self.buffers)  # the state the next forward starts from

        # every param_check_every steps (and at snapshots): are the weights themselves still sane?
        checked = step % self.config.param_check_every == 0 or self._snapshot_due(step)
        nan = torch.full((), math.nan, device=self.device)
        if checked:
            peak = torch.stack(torch._foreach_norm([p.detach() for p in self.params], math.inf)).max()
            nonfinite_param, wild_param = ~torch.isfinite(peak), peak > self.config.param_abs_max
        else:
            nonfinite_param = wild_param = nan

        vector = torch.cat([components, torch.stack([
            total.detach().float(), grad_norm.float(), lr.float(), loss_scale.float(),
            *(flag.float() for flag in (nonfinite_loss, reported_nonfinite_grad, nonfinite_buffer,
                                        loss_spike, grad_spike)),
            torch.full((), float(checked), device=self.device), nonfinite_param.float(), wild_param.float(),
            scale_overflow.float(), (~skip).float(),
        ])])
        if self._snapshot_due(step):
            self._staged = (step, self._capture())  # kept only if this step turns out healthy
        outcomes = self._take_pending()
        self._pending = self._send(step, vector, names, image_ids, annotation_ids)
        self.steps_run += 1
        return outcomes

    def _backward(self, losses: dict[str, torch.Tensor], faults: NoFaults):
        """Sum the components and backpropagate (fp16: scaled, then unscaled; GradScaler's found_inf
        stays on the device). Returns (names, components [C] float32, total, scaler_on)."""
        losses = faults.on_losses(dict(losses))
        names = tuple(sorted(losses))
        components = torch.stack([losses[n].detach().float().reshape(()) for n in names])
        total = sum(losses[n] for n in names)
        scaler_on = self.scaler is not None and self.scaler.is_enabled()
        (self.scaler.scale(total) if scaler_on else total).backward()
        faults.after_backward(self.params)
        if scaler_on:
            self.scaler.unscale_(self.optimizer)
        return names, components, total, scaler_on

    def skip_batch(self, error: BaseException, *, image_ids: tuple = (), annotation_ids: tuple = ()) -> list[Outcome]:
        """The model raised on a batch (torchvision's degenerate-box check, say): put back what its
        forward wrote, drop its gradients, and report a `model_error` incident for the policy."""
        self.optimizer.zero_grad(set_to_none=True)
        torch._foreach_copy_(self.buffers, self._buffer_snapshot)
        step = self.steps_run
        outcomes = self._take_pending()
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()
        self._pending = _Pending(step, None, None, (), tuple(image_ids), tuple(annotation_ids), message[:300])
        self.steps_run += 1
        return outcomes

    def flush(self) -> list[Outcome]:
        """Read the pending observation now (before a checkpoint, at the end of a run). A sync, but not
        on the per-step path."""
        return self._take_pending()

    # ------------------------------------------------------------------------------------------
    # Masking

    def _masked_optimizer_step(self, skip: torch.Tensor, fault_lr_factor: float) -> torch.Tensor:
        """Run the optimizer so that nothing changes when `skip` is set. Returns the lr used."""
        saved = [group["lr"] for group in self.optimizer.param_groups]
        factor = self.lr_factor * fault_lr_factor
        if self.schedule is not None:
            lr = self.schedule.lr() * factor
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * factor
            lr = torch.as_tensor(self.optimizer.param_groups[0]["lr"], dtype=torch.float32, device=self.device)
        if self.fused:  # the fused kernels skip the whole update, step counters included
            self.optimizer.found_inf = skip.float()
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        else:  # copy, step, put back where skipped (the +6.7% path; prefer fused optimizers)
            state = optimizer_state_tensors(self.optimizer)
            before = [t.detach().clone() for t in self.params + state]
            self.optimizer.step()
            self._restore_where(skip, self.params + state, before)
        self.optimizer.zero_grad(set_to_none=True)
        for group, value in zip(self.optimizer.param_groups, saved):
            group["lr"] = value  # the schedule owns the lr; a tensor left here would leak into a state_dict
        return lr

    @staticmethod
    def _restore_where(skip: torch.Tensor, tensors: list[torch.Tensor], before: list[torch.Tensor]) -> None:
        for tensor, old in zip(tensors, before):
            tensor.data.copy_(torch.where(skip, old, tensor.data))  # where, not *0: NaN * 0 is NaN

    def _scaler_found_inf(self) -> torch.Tensor:
        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        return (sum(v.to(self.device) for v in state["found_inf_per_device"].values()) > 0).reshape(())

    def _update_scaler(self, incident: torch.Tensor) -> torch.Tensor:
        """Let the scaler back off on an overflow, but leave it untouched on a guard incident."""
        scale, tracker = self.scaler._scale.clone(), self.scaler._growth_tracker.clone()
        self.scaler.update()
        self.scaler._scale.copy_(torch.where(incident, scale, self.scaler._scale))
        self.scaler._growth_tracker.copy_(torch.where(incident, tracker, self.scaler._growth_tracker))
        return self.scaler._scale.reshape(()).float()

    # ------------------------------------------------------------------------------------------
    # One step late: observation, policy, actions

    def _send(self, step, vector, names, image_ids, annotation_ids) -> _Pending:
        event = None
        if vector.device.type == "cuda":  # no sync: a non-blocking copy into pinned memory
            host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
            host.copy_(vector, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = vector.detach().clone()
        return _Pending(step, host, event, names, tuple(image_ids), tuple(annotation_ids))

    def _take_pending(self) -> list[Outcome]:
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        obs = self._observation(pending)
        decision, self.policy_state = decide(self.policy_state, obs, self.policy_config)
        self._apply(obs, decision)
        return [Outcome(obs, decision)]

    def _observation(self, p: _Pending) -> Observation:
        if p.host is None:
            return Observation(step=p.step, model_error=p.model_error, applied=False, image_ids=p.image_ids,
                               annotation_ids=p.annotation_ids, rank=self.rank, lr=math.nan,
                               total_loss=math.nan, grad_norm=math.nan)
        if p.event is not None:
            p.event.synchronize()  # the step after it is already queued: the device stays busy
        values = p.host.numpy().tolist()  # sync-ok: a host array already copied; no device op
        losses = dict(zip(p.names, values[:len(p.names)]))
        f = dict(zip(_FIELDS, values[len(p.names):]))
        checked = f["params_checked"] > 0.5
        return Observation(
            step=p.step, losses=losses, total_loss=f["total_loss"], grad_norm=f["grad_norm"], lr=f["lr"],
            loss_scale=None if math.isnan(f["loss_scale"]) else f["loss_scale"],
            nonfinite_loss=f["nonfinite_loss"] > 0.5, nonfinite_grad=f["nonfinite_grad"] > 0.5,
            nonfinite_buffer=f["nonfinite_buffer"] > 0.5, loss_spike=f["loss_spike"] > 0.5,
            grad_spike=f["grad_spike"] > 0.5,
            nonfinite_param=(f["nonfinite_param"] > 0.5) if checked else None,
            wild_param=(f["wild_param"] > 0.5) if checked else None,
            scale_overflow=f["scale_overflow"] > 0.5, applied=f["applied"] > 0.5,
            image_ids=p.image_ids, annotation_ids=p.annotation_ids, rank=self.rank)

    def _apply(self, obs: Observation, decision: Decision) -> None:
        """Carry out the decision's tensor work; the caller handles the data (quarantine, stop)."""
        self.lr_factor = decision.lr_factor
        self.incidents.record(obs, decision)  # writes a line only for an incident
        if self._staged is not None and self._staged[0] == obs.step:
            if decision.snapshot_ok and not obs.kinds(self.policy_config.min_loss_scale):
                self._snapshots = (self._snapshots + [self._staged])[-2:]
                if self.on_snapshot:
                    self.on_snapshot(obs.step)
            self._staged = None
        if decision.action == "rollback":
            self._rollback(decision.rollback_to_step)
        if decision.action == "stop":
            self.stopped = True

    def _snapshot_due(self, step: int) -> bool:
        return step > 0 and step % self.policy_config.snapshot_every == 0

    def _capture(self) -> dict[str, Any]:
        # sync-ok: a host copy every policy.snapshot_every steps, not every step
        return to_host({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loss_spikes": self.loss_spikes.state_dict(),
            "grad_spikes": self.grad_spikes.state_dict(),
        })

    def _rollback(self, to_step: int | None) -> None:
        usable = [s for s in self._snapshots if to_step is None or s[0] <= to_step] or self._snapshots[:1]
        _, snap = usable[-1]
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.schedule is not None and snap["schedule"] is not None:
            self.schedule.load_state_dict(snap["schedule"])
        if self.scaler is not None and snap["scaler"]:
            self.scaler.load_state_dict(snap["scaler"])
        self.loss_spikes.load_state_dict(snap["loss_spikes"])
        self.grad_spikes.load_state_dict(snap["grad_spikes"])
        torch._foreach_copy_(self._buffer_snapshot, self.buffers)
        self._pending = None  # it ran on the state just thrown away (the policy ignores it too)
        self._staged = None

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Flush first (`flush()`): a pending observation is not part of the state."""
        return {
            "policy_state": self.policy_state.to_dict(),
            "lr_factor": self.lr_factor,
            "steps_run": self.steps_run,
            "loss_spikes": self.loss_spikes.state_dict(),
            "grad_spikes": self.grad_spikes.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy_state = PolicyState.from_dict(state["policy_state"])
        self.lr_factor = float(state["lr_factor"])
        self.steps_run = int(state["steps_run"])
        self.loss_spikes.load_state_dict(state["loss_spikes"])
        self.grad_spikes.load_state_dict(state["grad_spikes"])
        self.stopped = self.policy_state.stopped
        torch._foreach_copy_(self._buffer_snapshot, self.buffers)
        self._snapshots = [(self.steps_run - 1, self._capture())]  # the checkpoint is the rollback target
        self._pending, self._staged = None, None

    def summary(self) -> dict[str, Any]:
        return self.incidents.summary() if hasattr(self.incidents, "summary") else {}

