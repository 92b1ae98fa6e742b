"""The guard for PyTorch: detect on the device with no host sync, mask a bad update, recover by policy.

    guard = Guard(model, optimizer, config=GuardConfig(), policy=PolicyConfig())
    for images, targets in batches:
        losses = model(images, targets)          # a dict of scalar loss components
        for outcome in guard.step(losses):       # backward, check, agree, apply, send
            ...                                  # outcomes of the previous step (read one step late)
        if guard.stopped:
            break

`step` is `backward` then `update`; a caller that must act between the two (the trainer's fault
hooks) calls them itself. `update` reads as four parts, none of which makes the host wait:
  check  each loss component, the global grad norm, BatchNorm buffers, loss / grad-norm spikes
  agree  the one place where the step's skip flag becomes final (one all-reduce across ranks goes here)
  apply  clip (after the check: a NaN norm would turn every clipped gradient into NaN), masked update
         (fused optimizers take the flag as `found_inf`; others are put back with `torch.where`, never
         multiply-by-zero: NaN * 0 is NaN), BatchNorm stats written by this forward put back, the LR
         schedule counts applied updates only, the loss scale; then, every `param_check_every` steps
         and at snapshots, the parameters themselves (silent corruption)
  send   pack the step's numbers into one small tensor (`STEP_FIELDS`), copy it to the host without
         blocking, and read the previous step's: an `Observation` for the pure policy
         (`nanguard.guard.policy.decide`), whose decision is carried out here (LR factor, snapshots,
         rollback) or by the caller (quarantine, stop).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from nanguard.backends.torch.checkpoint import rng_state
from nanguard.backends.torch.distributed import RankAgreement
from nanguard.backends.torch.devicestate import (
    DeviceSpikeDetector,
    LossScaler,
    LRSchedule,
    bn_buffers,
    materialize_optimizer_state,
    optimizer_state_tensors,
    to_host,
)
from nanguard.guard import (
    STEP_FIELDS,
    step_vector,
    GuardConfig,
    IncidentLog,
    NullIncidentLog,
    Outcome,
    PolicyConfig,
    PolicyState,
)
from nanguard.config import ExplainConfig
from nanguard.fileio import json_safe
from nanguard.guard.driver import PolicyDriver
from nanguard.guard.host import GuardHost, StepContext
from nanguard.guard.incidents import incident_record
from nanguard.guard.observation import Observation, json_id
from nanguard.guard.policy import Decision


@dataclass
class Backward:
    """The result of `Guard.backward`: the loss components on the device, gradients in `.grad`."""

    names: tuple[str, ...]
    components: torch.Tensor  # [C] float32
    total: torch.Tensor  # 0-dim, detached


def pack(components: torch.Tensor, values: dict[str, torch.Tensor], rank_flags: torch.Tensor | None = None) -> torch.Tensor:
    """[C + len(STEP_FIELDS) (+ W)] float32: the components, then `STEP_FIELDS` (NaN where not given),
    then, across W ranks, 1.0 for each rank that saw a bad step itself."""
    unknown = set(values) - set(STEP_FIELDS)
    assert not unknown, f"not step fields: {sorted(unknown)}"
    nan = torch.full((), math.nan, device=components.device)
    parts = [components.float(), torch.stack([v.float().reshape(()) for v in step_vector(values, nan)])]
    return torch.cat(parts + ([rank_flags.float()] if rank_flags is not None else []))


def _copy(into: list[torch.Tensor], source: list[torch.Tensor]) -> None:
    """`into[i] = source[i]` for every tensor; a model without BatchNorm has none (torch's foreach ops
    refuse an empty list)."""
    if into:
        torch._foreach_copy_(into, source)


def send(vector: torch.Tensor) -> Callable[[], list[float]]:
    """Start the step vector's copy to the host without blocking; the returned callable (the
    `Mailbox`'s `read_values`) waits for that copy alone and gives the numbers as floats. On a GPU the
    copy goes into pinned memory behind a CUDA event: by the time it is read, the next step is queued."""
    if vector.device.type == "cuda":
        host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
        host.copy_(vector, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host, event = vector.detach().clone(), None

    def read_values() -> list[float]:
        if event is not None:
            event.synchronize()  # the step after it is already queued: the device stays busy
        return host.numpy().tolist()  # sync-ok: a host array already copied; no device op

    return read_values


class GuardedStep:
    """The device half of the guard: backward, check, agree, apply; the step's numbers as one small
    device vector (`pack`). No host sync anywhere. What to do with the numbers (read them one step
    late, decide, carry out) is the host half's, `nanguard.guard.host.GuardHost`: the run's, or the
    own-loop `Guard`'s."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scaler=None,
                 config: GuardConfig | None = None, schedule: LRSchedule | None = None,
                 ranks: RankAgreement | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.scaler = LossScaler(scaler, optimizer)
        self.config = config or GuardConfig()
        self.schedule = schedule
        self.ranks = ranks  # a distributed run's agreement (None: one process)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device = self.params[0].device
        self.fused = all(group.get("fused") for group in optimizer.param_groups)
        # a masked first step must leave no state behind: create it now, or (where torch's lazy state
        # cannot be reproduced exactly) check the steps until it exists on the host
        self._lazy_state = not materialize_optimizer_state(optimizer)
        self.buffers = bn_buffers(model)
        self._buffer_snapshot = [b.detach().clone() for b in self.buffers]
        spikes = self.config.spike_settings()
        self.loss_spikes = DeviceSpikeDetector(**spikes, device=self.device)
        self.grad_spikes = DeviceSpikeDetector(**spikes, device=self.device)
        self._weights_checked = True  # the previous update's weights were checked (the digest compares them)

    def backward(self, losses: dict[str, torch.Tensor]) -> Backward:
        """Sum the components and backpropagate (fp16: scaled, then unscaled; the scaler's found_inf
        stays on the device)."""
        names = tuple(sorted(losses))
        components = torch.stack([losses[n].detach().float().reshape(()) for n in names])
        total = sum(losses[n] for n in names)
        if self.ranks is not None:
            self.ranks.start_step()
        self.scaler.backward(total)
        return Backward(names, components, total.detach())

    def update(self, backward: Backward, *, lr_factor: float = 1.0, check_weights: bool = True) -> torch.Tensor:
        """Check, agree, apply (the LR times `lr_factor`; the weights checked after the update if
        `check_weights`). Returns the step's vector (`pack`), on the device."""
        checks = self._check(backward)
        skip = self._agree(checks, backward)
        values = self._apply(skip, checks, lr_factor, check_weights)
        self._weights_checked = check_weights
        return pack(checks.pop("components"), values, checks.pop("rank_flags", None))

    def discard(self) -> None:
        """The model raised on a batch: put back what its forward wrote and drop its gradients."""
        self.optimizer.zero_grad(set_to_none=True)
        _copy(self.buffers, self._buffer_snapshot)

    def _check(self, b: Backward) -> dict[str, torch.Tensor]:
        """This rank's flags, as 0-dim device tensors (nothing here is read on the host)."""
        false = torch.zeros((), dtype=torch.bool, device=self.device)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads \
            else torch.zeros((), device=self.device)
        floating = [buf for buf in self.buffers if buf.is_floating_point()]
        checks = {
            "components": b.components,
            "total_loss": b.total.float(),
            "grad_norm": grad_norm,
            "nonfinite_loss": ~torch.isfinite(b.components).all(),
            # across ranks the gradients are already averaged: this rank's own, as the all-reduce hook saw them
            "nonfinite_grad": ~torch.isfinite(grad_norm) if self.ranks is None else self.ranks.local_nonfinite_grad,
            "nonfinite_buffer": ~torch.isfinite(torch.stack(torch._foreach_norm(floating))).all() if floating
            else false,
            "scale_overflow": false,
        }
        if self.ranks is not None:  # and as this rank holds them after the all-reduce
            checks["nonfinite_grad_held"] = ~torch.isfinite(grad_norm)
            # the weights this step ran with: those the previous step's update left, compared where they
            # were checked (the param_check_every grid and a snapshot, which a divergence must keep from
            # being confirmed): the one weight-check rule
            if self._weights_checked:
                # L1 norms miss a flipped sign bit; the signed sums see it (float64: no cancellation)
                detached = [p.detach() for p in self.params]
                l1 = torch.stack(torch._foreach_norm(detached, 1)).double().sum()
                signed = torch.stack([p.sum(dtype=torch.float64) for p in detached]).sum()
                checks["param_digest"] = l1 + signed * torch.pi
        if self.scaler.enabled:  # an fp16 overflow is the scaler's business (it backs off): no incident
            overflow = self.scaler.found_inf(self.device)
            checks["overflow"] = overflow
            checks["scale_overflow"] = overflow & ~checks["nonfinite_loss"]
            checks["nonfinite_grad"] = checks["nonfinite_grad"] & ~overflow  # fp16 can't tell NaN from overflow
        return checks

    def _agree(self, checks: dict[str, torch.Tensor], b: Backward) -> torch.Tensor:
        """The step's skip flag, final from here on. Across ranks, one small all-reduce first: every
        rank's flags (which rank saw what) and the averaged loss components, so that every rank judges
        the same numbers and takes the same decision in the same step. Then the spikes, on those."""
        if self.ranks is not None:
            self.ranks.agree(checks)  # the flags become "any rank"; components and total the mean
        checks["loss_spike"] = self.loss_spikes.update(checks["total_loss"])
        checks["grad_spike"] = self.grad_spikes.update(checks["grad_norm"])
        if "overflow" in checks:
            checks["grad_spike"] = checks["grad_spike"] & ~checks.pop("overflow")
        incident = (checks["nonfinite_loss"] | checks["nonfinite_grad"] | checks["nonfinite_buffer"]
                    | checks["loss_spike"] | checks["grad_spike"])
        if "rank_divergence" in checks:
            incident = incident | checks["rank_divergence"]
        checks["incident"] = incident
        return incident | checks["scale_overflow"]

    def _apply(self, skip: torch.Tensor, checks: dict[str, torch.Tensor], lr_factor: float,
               check_weights: bool) -> dict[str, torch.Tensor]:
        """Clip, then update everything the step owns unless `skip`; check the parameters on their
        grid. Returns the step's numbers for the host (`STEP_FIELDS`)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.config.clip_norm > 0 and grads:  # a skipped step's coefficient is irrelevant: masked
            coef = torch.clamp(self.config.clip_norm / (checks["grad_norm"] + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        stateless = [p for p in self.params if not self.optimizer.state.get(p)] if self._lazy_state else []
        lr = self._masked_optimizer_step(skip, lr_factor)
        if stateless and bool(skip):  # sync-ok: only until a lazily-created optimizer state exists
            for p in stateless:
                self.optimizer.state.pop(p, None)  # created by a masked step: as if it never ran
        elif stateless:
            self._lazy_state = False
        self._restore_where(skip, self.buffers, self._buffer_snapshot)
        _copy(self._buffer_snapshot, self.buffers)  # the state the next forward starts from
        if self.schedule is not None:
            self.schedule.advance(~skip)
        values = {k: v for k, v in checks.items() if k not in ("incident", "components", "rank_flags")}
        values.update(lr=lr, applied=~skip)
        if self.scaler.enabled:
            values["loss_scale"] = self.scaler.update_unless(checks["incident"])
        if check_weights:
            peak = torch.stack(torch._foreach_norm([p.detach() for p in self.params], math.inf)).max()
            values.update(nonfinite_param=~torch.isfinite(peak), wild_param=peak > self.config.param_abs_max)
        return values

    def _masked_optimizer_step(self, skip: torch.Tensor, lr_factor: float) -> torch.Tensor:
        """Run the optimizer so that nothing changes when `skip` is set. Returns the lr used."""
        saved = [group["lr"] for group in self.optimizer.param_groups]
        if self.schedule is not None:
            lr = self.schedule.lr() * lr_factor
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * lr_factor
            lr = torch.as_tensor(self.optimizer.param_groups[0]["lr"], dtype=torch.float32, device=self.device)
        if self.fused:  # the fused kernels skip the whole update, step counters included
            self.optimizer.found_inf = skip.float()
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        else:  # copy, step, put back where skipped (the slower path: prefer fused optimizers)
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

    # ------------------------------------------------------------------------------------------
    # State

    def capture(self) -> dict[str, Any]:
        """A host copy of everything the step owns (a rollback snapshot)."""
        # sync-ok: a host copy every policy.snapshot_every steps, not every step
        return to_host({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "scaler": self.scaler.state_dict(),
            "loss_spikes": self.loss_spikes.state_dict(),
            "grad_spikes": self.grad_spikes.state_dict(),
        })

    def capture_before_forward(self) -> dict[str, Any]:
        """`capture()` with the BatchNorm statistics as they were before the forward pass in flight:
        between a bad step's backward and update, the state that step ran with."""
        state = self.capture()
        names = {id(buf): name for name, buf in self.model.named_buffers()}
        for buf, before in zip(self.buffers, self._buffer_snapshot):
            state["model"][names[id(buf)]] = to_host(before)
        return state

    def restore(self, snap: dict[str, Any]) -> None:
        """Put back a `capture()`."""
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.schedule is not None and snap["schedule"] is not None:
            self.schedule.load_state_dict(snap["schedule"])
        self.scaler.load_state_dict(snap["scaler"])
        self.loss_spikes.load_state_dict(snap["loss_spikes"])
        self.grad_spikes.load_state_dict(snap["grad_spikes"])
        _copy(self._buffer_snapshot, self.buffers)


class Guard:
    """Guards any PyTorch training loop (see the module docstring): the device half (`GuardedStep`)
    and the framework-free host half (`GuardHost`). `scaler`: a `torch.amp.GradScaler` for fp16;
    `schedule`: nanguard's device-side `LRSchedule` (without one, the optimizer's own lr is used, times
    the policy's LR factor). `explain`: when bad steps passed with `replay=` are diagnosed
    (`explain.auto`, `explain.ring`, `explain.replays`, `explain.keep`: the most states kept for a
    replay); see `step`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scaler=None,
                 config: GuardConfig | None = None, policy: PolicyConfig | None = None,
                 schedule: LRSchedule | None = None, incident_log: IncidentLog | NullIncidentLog | None = None,
                 rank: int = 0, ranks: RankAgreement | None = None, explain: ExplainConfig | None = None) -> None:
        self.device_step = GuardedStep(model, optimizer, scaler=scaler, config=config, schedule=schedule, ranks=ranks)
        self.config = self.device_step.config
        self.explain = explain or ExplainConfig()
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.params = self.device_step.params
        self.incidents = incident_log or NullIncidentLog()
        # the policy's decisions carried out: LR factor, snapshots staged and confirmed, rollback, stop
        self.driver = PolicyDriver(policy or PolicyConfig(), _Diagnosing(self),
                                   capture=self.device_step.capture, restore=self.device_step.restore)
        self.host = GuardHost(self.driver, self.config, rank=ranks.rank if ranks is not None else rank)
        self.host.keep = self._keep_replay
        self.steps_run = 0  # data positions consumed by this guard (the observation's `step`)
        # replay=: (step, fn, ids, torch's RNG before its forward) of the last explain.ring steps
        self._ring: deque[tuple[int, Callable, tuple, dict | None]] = deque(maxlen=max(2, self.explain.ring))
        self._rng: dict[str, Any] | None = None  # torch's RNG as the last step left it (replay= only)
        self._kept: dict[int, dict[str, Any]] = {}  # bad steps' states, until diagnosed
        self._states_kept = 0
        self._diagnosed_kinds: set[str] = set()
        self._diagnoses: dict[int, Any] = {}
        self._distributed = ranks is not None

    @property
    def policy_state(self) -> PolicyState:
        return self.driver.policy_state

    @property
    def stopped(self) -> bool:
        return self.host.stopped

    def step(self, losses: dict[str, torch.Tensor], *, image_ids: tuple = (), annotation_ids: tuple = (),
             batch: tuple[int, int] | None = None, invalid_targets: tuple = (),
             replay: Callable[[list[int]], dict[str, torch.Tensor]] | None = None, ids=None) -> list[Outcome]:
        """Backward, check, agree, apply, send; returns the outcome of the previous step.

        `replay=fn, ids=ids` make a bad step explainable: `ids` are the batch's sample ids (any hashable
        per sample; they also name the step's images when `image_ids` is not given) and `fn(index)`
        recomputes the loss dict for the samples at positions `index` (a list of ints) of this batch.
        The guard only holds references to them (`explain.ring` steps); on a bad step it replays from
        the state the step ran with and sets `outcome.diagnosis` (also in the incident line)."""
        if replay is not None:
            if ids is None or isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") or len(ids) == 0:
                raise ValueError("guard.step(replay=fn) needs ids=: the batch's sample ids, one per sample")
            self._ring.append((self.steps_run, replay, ids, self._rng))  # references only
            if len(image_ids) == 0:
                image_ids = _host_ids(ids)
        context = StepContext(tuple(image_ids), tuple(annotation_ids), batch, tuple(invalid_targets))
        outcomes = self.update(self.backward(losses), context)
        if self._ring:  # what the next step's forward draws from: a 5 kB host copy
            self._rng = rng_state()
        return outcomes

    def backward(self, losses: dict[str, torch.Tensor]) -> Backward:
        return self.device_step.backward(losses)

    def update(self, backward: Backward, context: StepContext = StepContext()) -> list[Outcome]:
        step = self.steps_run
        # the previous step's numbers are read before this step's update touches the state
        self.host.read_previous()
        vector = self.device_step.update(backward, lr_factor=self.host.lr_factor,
                                         check_weights=self.host.check_weights(step))
        self.steps_run += 1
        return self._with_diagnoses(self.host.sent(step, backward.names, send(vector), context))

    def skip_batch(self, error: BaseException, *, image_ids: tuple = (), annotation_ids: tuple = (),
                   batch: tuple[int, int] | None = None) -> list[Outcome]:
        """The model raised on a batch (or the batch could not be read): put back what its forward
        wrote, drop its gradients, and report a `model_error` incident for the policy."""
        self.device_step.discard()
        step, self.steps_run = self.steps_run, self.steps_run + 1
        return self._with_diagnoses(self.host.failed(step, error, StepContext(tuple(image_ids),
                                                                              tuple(annotation_ids), batch)))

    def flush(self) -> list[Outcome]:
        """Read the pending observation now (before a checkpoint, at the end of a run). A sync, but not
        on the per-step path."""
        return self._with_diagnoses(self.host.flush())

    def state_dict(self) -> dict[str, Any]:
        """Flush first (`flush()`): a pending observation is not part of the state. The snapshots are
        not either: a process that resumes from the checkpoint starts from it (its base state)."""
        return {**self.driver.state_dict(self.steps_run), "steps_run": self.steps_run,
                "loss_spikes": self.device_step.loss_spikes.state_dict(),
                "grad_spikes": self.device_step.grad_spikes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After the model, optimizer, schedule and scaler have loaded theirs."""
        self.steps_run = int(state["steps_run"])
        self.device_step.loss_spikes.load_state_dict(state["loss_spikes"])
        self.device_step.grad_spikes.load_state_dict(state["grad_spikes"])
        _copy(self.device_step._buffer_snapshot, self.device_step.buffers)
        self.driver.load_state_dict(state, self.steps_run)  # the checkpoint is the base state
        self.host.mailbox.take()

    # ------------------------------------------------------------------------------------------
    # Explaining bad steps passed with replay= (nanguard.backends.torch.loop_replay)

    def _replayable(self, step: int):
        return next((entry for entry in self._ring if entry[0] == step), None)

    def _keep_replay(self, obs: Observation) -> None:
        """A bad step was read, before the next update touches the state: keep the state it ran with
        (a host copy: only for a step that will be diagnosed)."""
        kinds = obs.kinds(self.driver.config.min_loss_scale)
        wanted = self.explain.auto == "all" or (self.explain.auto == "first" and kinds[0] not in self._diagnosed_kinds)
        if self._distributed or not wanted or self._states_kept >= self.explain.keep \
                or self._replayable(obs.step) is None:
            return
        label, reference = self.driver.newest_kept()
        self._kept[obs.step] = {**self.device_step.capture_before_forward(), "reference_step": label,
                                "reference_model": reference["model"],
                                "amp": "fp16" if self.device_step.scaler.enabled else "off"}

    def _diagnose(self, record: dict[str, Any]):
        """The verdict on an incident of a step kept for a replay (None: not kept, or not wanted).
        Never raises: a diagnosis must not cost the training (the step was skipped all the same)."""
        kept = self._kept.pop(int(record["step"]), None)
        entry = self._replayable(int(record["step"]))
        wanted = self.explain.auto == "all" or record.get("kind") not in self._diagnosed_kinds
        if kept is None or entry is None or not wanted:
            return None
        from nanguard.backends.torch.loop_replay import explain_loop_step
        from nanguard.explain.verdict import Diagnosis, judge

        started = time.perf_counter()
        _, fn, ids, rng = entry
        self._diagnosed_kinds.add(record.get("kind"))
        self._states_kept += 1
        try:
            facts = explain_loop_step(self.model, fn, [json_id(i) for i in _host_ids(ids, device_too=True)],
                                      rng=rng, kept=kept, spike_settings=self.config.spike_settings(),
                                      replays=self.explain.replays, param_abs_max=self.config.param_abs_max)
            facts.seconds = time.perf_counter() - started
            if facts.error and facts.reproduced and not (facts.state_nonfinite or facts.state_wild):
                return Diagnosis("unknown", reproduced=True, seconds=round(facts.seconds, 3),
                                 evidence=[f"replay=fn raised {facts.error} on the whole batch"],
                                 advice="replay=fn must return this batch's loss dict for the samples at the "
                                        "positions it is given (a list of ints), as the step computed it; fix it "
                                        "to diagnose")
            return judge(record, facts, param_abs_max=self.config.param_abs_max)
        except Exception as exc:
            print(f"nanguard: warning: step {record['step']} not diagnosed ({type(exc).__name__}: {exc})"[:400],
                  file=sys.stderr)
            return None

    def _with_diagnoses(self, outcomes: list[Outcome]) -> list[Outcome]:
        if not self._diagnoses:
            return outcomes
        return [replace(o, diagnosis=self._diagnoses.pop(o.observation.step, None)) for o in outcomes]


class _Diagnosing:
    """The own-loop guard's incident log as its `PolicyDriver` sees it: each incident line is diagnosed
    first (when its step was passed with `replay=`), then written to the user's log."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def record(self, obs: Observation, decision: Decision) -> dict[str, Any] | None:
        if decision.ignored or not decision.kinds:  # healthy, lagging, or a repeated stop
            self.guard._kept.pop(obs.step, None)
            return None
        record = incident_record(obs, decision)
        diagnosis = self.guard._diagnose(record)  # pops the kept state either way
        if diagnosis is not None:
            record["diagnosis"] = json_safe(diagnosis.to_dict())
            self.guard._diagnoses[obs.step] = diagnosis
        return self.guard.incidents.write(record)



def _host_ids(ids, *, device_too: bool = False) -> tuple:
    """`ids` as a tuple of host values: a list or tuple as it is, a numpy array or a CPU tensor as its
    values; a tensor on a device only with `device_too` (a sync: on a bad step, never a healthy one),
    else ()."""
    if isinstance(ids, torch.Tensor):
        return tuple(ids.tolist()) if ids.device.type == "cpu" or device_too else ()  # sync-ok: a host tensor, or a bad step
    if hasattr(ids, "tolist"):
        return tuple(ids.tolist())  # sync-ok: a numpy array
    return tuple(ids)
