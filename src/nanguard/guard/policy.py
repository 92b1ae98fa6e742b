"""The recovery policy: a pure function from (state, observation) to (decision, new state).

No I/O, no clock, no tensors: the same observations always give the same decisions, and the state is
plain data that goes into a checkpoint (`PolicyState.to_dict` / `from_dict`).

Rules, in the order they are checked for a bad step (one with at least one incident kind):
1. budgets: more than `max_skip_fraction * skip_window` bad steps among the last `skip_window` steps
   -> stop; a rollback needed after `max_rollbacks` rollbacks -> stop. Both come with a verdict.
2. a non-finite or wild parameter (the model state is already wrong; masking the
   update cannot help) -> rollback at once.
3. `rollback_after` more bad steps in a row that ran with the lowered LR (so
   `backoff_after + OBSERVATION_LAG + rollback_after` in a row) -> rollback.
4. `backoff_after` bad steps in a row -> LR factor x `backoff_factor` (floored at `min_lr_factor`); it
   comes back to 1.0 geometrically over `recover_steps` good steps (a bad step restarts the ramp from
   the factor it has reached).
5. an image implicated in `quarantine_after` bad steps -> quarantine. A bad step of a data kind
   implicates the images of its batch, unless it is the `backoff_after`-th or later in a row.
6. otherwise -> skip (the device already masked the update).
A healthy step -> none; it counts towards LR recovery and may confirm a staged snapshot.

The one-step lag: observations arrive in step order, one step late. When the policy decides a rollback
on step s, the backend has already launched step s + 1 (`OBSERVATION_LAG`); it ran on the state that
is thrown away, so `Decision.ignore_through_step` is s + 1 and the policy ignores (action none,
`ignored=True`, state unchanged) every observation with `step <= ignore_through_step`. Steps are data
positions and only go up: after the restore the backend goes on with the next unseen batch, so the
batches between the snapshot and the rollback are skipped, not replayed.

Snapshots sit on a fixed grid so the backend knows ahead of time when to copy: when it runs a step s
with s % snapshot_every == 0 (s > 0) it stages a host copy of the state right after s's update (and
checks the parameters that step). The observation of step s cannot vouch for that copy: it was made
before s's update (an LR spike applied at s only shows in the loss of s + 1). So a staged copy is
confirmed by the observations made *with* it: `Decision.confirm_snapshot` is s once steps
s - snapshot_healthy + 1 ... s + snapshot_confirm were all healthy (s's own parameter check
included). `PolicyState.snapshots` lists the confirmed ones the backend keeps (the newest
`keep_snapshots`), and `base_step` labels the state the run started from (-1, or the checkpoint it
resumed from), which is always there. A rollback restores the newest confirmed snapshot
(`rollback_to_step`, exactly the label restored); if that state goes bad again before a newer
snapshot is confirmed, the next rollback goes one snapshot further back, never to the same one.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from nanguard.errors import UserError
from nanguard.fileio import json_safe
from nanguard.config import PROFILES, PolicyConfig
from nanguard.guard.observation import CORRUPTION_KINDS, DATA_KINDS, Observation, is_bad

# Weakest first: a decision's action is the strongest thing it asks for; its other fields
# (lr_factor, quarantine, confirm_snapshot) must be applied whatever the action.
ACTIONS: tuple[str, ...] = ("none", "skip", "quarantine", "lr_backoff", "rollback", "stop")

# Steps between running a step and reading its observation: every backend copies the step's flags to
# the host without blocking and reads them while the next step runs.
OBSERVATION_LAG = 1


@dataclass(frozen=True)
class BadStep:
    """One bad step kept in the skip window (for the budget and the verdict)."""

    step: int
    kinds: tuple[str, ...]
    components: tuple[str, ...]
    image_ids: tuple
    lr: float
    model_error: str | None = None


@dataclass(frozen=True)
class PolicyState:
    consecutive_bad: int = 0
    good_streak: int = 0
    lr_factor: float = 1.0
    recovery_from: float = 1.0  # the LR factor the current recovery ramp started at
    recovery_good: int = 0  # good steps into the current ramp
    backoffs: int = 0
    rollbacks: int = 0
    corruptions: int = 0  # rollbacks caused by a corrupted parameter (nonfinite_param, wild_param)
    last_good_step: int = -1
    base_step: int = -1  # label of the state the run started from (always restorable)
    snapshots: tuple[int, ...] = ()  # confirmed snapshots the backend keeps, oldest first
    last_restored: int | None = None  # the snapshot the last rollback restored
    ignore_through_step: int = -1
    max_lr_seen: float = 0.0
    recent: tuple[BadStep, ...] = ()  # bad steps within the last skip_window steps
    implicated: tuple[tuple[Any, int], ...] = ()  # (image id, bad steps it was in), not quarantined
    quarantined: tuple = ()
    stopped: bool = False
    stop_reason: str | None = None
    stop_verdict: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (for checkpoints); non-finite lr values become "nan"/"inf"."""
        data = asdict(self)
        data["recent"] = [
            {"step": bad.step, "kinds": list(bad.kinds), "components": list(bad.components),
             "image_ids": list(bad.image_ids), "lr": json_safe(bad.lr),
             "model_error": bad.model_error}
            for bad in self.recent
        ]
        data["implicated"] = [[image_id, count] for image_id, count in self.implicated]
        data["quarantined"] = list(self.quarantined)
        data["snapshots"] = list(self.snapshots)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyState:
        """The inverse of `to_dict`; missing keys take their defaults (an older checkpoint)."""
        data = {k: v for k, v in data.items() if k not in _RETIRED_STATE_KEYS}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"policy state has unknown keys {', '.join(unknown)}: the checkpoint "
                            f"comes from a newer nanguard; resume it with that version")
        data = dict(data)
        data["recent"] = tuple(
            BadStep(step=int(bad["step"]), kinds=tuple(bad["kinds"]),
                    components=tuple(bad["components"]), image_ids=tuple(bad["image_ids"]),
                    lr=float(bad["lr"]), model_error=bad.get("model_error"))
            for bad in data.get("recent", ())
        )
        data["implicated"] = tuple((image_id, int(count))
                                   for image_id, count in data.get("implicated", ()))
        data["quarantined"] = tuple(data.get("quarantined", ()))
        data["snapshots"] = tuple(int(s) for s in data.get("snapshots", ()))
        return cls(**data)

    def resumed_at(self, base_step: int) -> PolicyState:
        """This state in a process that starts from a checkpoint labelled `base_step` (the state after
        that step): the snapshots of the process that wrote it are gone; the checkpoint is the base."""
        return replace(self, base_step=base_step, snapshots=(), last_restored=None)


# PolicyState keys of older versions, dropped on load
_RETIRED_STATE_KEYS = frozenset({"last_verified_step"})


@dataclass(frozen=True)
class Decision:
    """What the backend must do after reading the observation of `step`.

    `action` is the strongest thing asked for (see `ACTIONS`); `lr_factor` (multiplier of the scheduled
    LR from the next launched step on), `quarantine` (image ids newly quarantined) and
    `confirm_snapshot` (keep the copy staged after that step; drop kept ones not in the state's
    `snapshots`) hold whatever the action. `rollback_to_step`: with rollback, the label of the snapshot
    to restore, exactly (the state right after that step; the base state when it equals
    `PolicyState.base_step`). `ignore_through_step`: with rollback, observations up to this step are
    ignored. `verdict`: with stop, what most likely went wrong and what to change.
    """

    step: int
    action: str
    reason: str
    lr_factor: float
    confirm_snapshot: int | None = None
    quarantine: tuple = ()
    kinds: tuple[str, ...] = ()
    verdict: str | None = None
    rollback_to_step: int | None = None
    ignore_through_step: int | None = None
    ignored: bool = False

    @classmethod
    def unguarded(cls, step: int) -> Decision:
        """guard.enabled=false: the step was observed, nothing was decided."""
        return cls(step=step, action="none", reason="unguarded", lr_factor=1.0)

    @property
    def bad(self) -> bool:
        """Is the step this decision is about a bad one (or ignored, run on a state thrown away)? A
        checkpoint waiting for confirmation is dropped by such a step."""
        return self.ignored or is_bad(self.kinds)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quarantine"] = list(self.quarantine)
        data["kinds"] = list(self.kinds)
        return data


@dataclass(frozen=True)
class Outcome:
    """One step's observation and the policy's decision about it (what a backend's step returns), and
    the own-loop guard's `nanguard.explain.verdict.Diagnosis` of a bad step it could replay (else None)."""

    observation: Observation
    decision: Decision
    diagnosis: Any = None


def decide(state: PolicyState, obs: Observation,
           config: PolicyConfig | None = None) -> tuple[Decision, PolicyState]:
    """The decision for one observation and the state after it. Deterministic; never raises for any
    observation; once it has said stop it keeps saying stop."""
    config = config or PolicyConfig()
    if state.stopped:
        return Decision(step=obs.step, action="stop", reason=state.stop_reason or "stopped",
                        lr_factor=state.lr_factor, verdict=state.stop_verdict), state
    if obs.step <= state.ignore_through_step:
        reason = (f"step {obs.step} ran before the rollback took effect "
                  f"(ignoring through step {state.ignore_through_step}): observation ignored")
        return Decision(step=obs.step, action="none", reason=reason, lr_factor=state.lr_factor,
                        ignored=True), state
    kinds = obs.kinds(config.min_loss_scale)
    if not is_bad(kinds):
        decision, state = _healthy(state, obs, config)
        if kinds:  # a note (dropped target boxes): logged as an incident, the step was applied
            decision = replace(decision, kinds=tuple(kinds),
                               reason=f"{obs.describe(kinds)}; the rest of the step was applied")
        return decision, state
    return _bad(state, obs, config, kinds)


def _healthy(state: PolicyState, obs: Observation,
             config: PolicyConfig) -> tuple[Decision, PolicyState]:
    lr_factor, recovery_good = state.lr_factor, state.recovery_good
    if lr_factor < 1.0:
        recovery_good += 1
        if recovery_good >= config.recover_steps:
            lr_factor = 1.0
        else:  # geometric ramp from recovery_from back to 1.0
            lr_factor = state.recovery_from ** (1.0 - recovery_good / config.recover_steps)
    good_streak = state.good_streak + 1
    staged = obs.step - config.snapshot_confirm  # the snapshot these healthy steps ran with
    confirmed = (staged if staged > 0 and staged % config.snapshot_every == 0
                 and good_streak >= config.snapshot_confirm + max(1, config.snapshot_healthy)
                 and staged > max(state.ignore_through_step, state.base_step) else None)
    snapshots = state.snapshots if confirmed is None else (state.snapshots + (confirmed,))[-config.keep_snapshots:]
    new_state = replace(
        state,
        consecutive_bad=0,
        good_streak=good_streak,
        lr_factor=lr_factor,
        recovery_good=recovery_good,
        last_good_step=obs.step,
        snapshots=snapshots,
        max_lr_seen=_max_lr(state.max_lr_seen, obs.lr),
        recent=_in_window(state.recent, obs.step, config),
    )
    return Decision(step=obs.step, action="none", reason=f"step {obs.step}: healthy",
                    lr_factor=lr_factor, confirm_snapshot=confirmed), new_state


def _bad(state: PolicyState, obs: Observation, config: PolicyConfig,
         kinds: list[str]) -> tuple[Decision, PolicyState]:
    seen = obs.describe(kinds, config.min_loss_scale)
    consecutive = state.consecutive_bad + 1
    recent = _in_window(state.recent, obs.step, config) + (BadStep(
        step=obs.step, kinds=tuple(kinds), components=tuple(obs.nonfinite_components()),
        image_ids=tuple(obs.image_ids), lr=float(obs.lr), model_error=obs.model_error),)
    implicated, newly = _implicate(state, obs, config, kinds, consecutive)
    new_state = replace(
        state,
        consecutive_bad=consecutive,
        good_streak=0,
        recovery_from=state.lr_factor,  # a bad step restarts the recovery ramp from here
        recovery_good=0,
        recent=recent,
        implicated=tuple(implicated.items()),
        quarantined=state.quarantined + tuple(newly),
    )
    common = dict(step=obs.step, quarantine=tuple(newly), kinds=tuple(kinds))
    note = (f"; images {', '.join(map(str, newly))} implicated in "
            f"{config.quarantine_after} bad steps: quarantined" if newly else "")

    if len(recent) > config.max_skipped:
        reason = (f"{seen}; {len(recent)} of the last {config.skip_window} steps were bad "
                  f"(budget {config.max_skipped}, max_skip_fraction={config.max_skip_fraction:g}): "
                  f"stop")
        return _stop(new_state, config, reason, common)
    corrupted = bool(CORRUPTION_KINDS.intersection(kinds))
    if corrupted or consecutive >= _rollback_at(config):
        return _rollback(state, new_state, obs, config, seen, corrupted, consecutive, note, common)
    if consecutive == config.backoff_after and state.lr_factor > config.min_lr_factor:
        lr_factor = max(config.min_lr_factor, state.lr_factor * config.backoff_factor)
        reason = (f"{seen}; {consecutive} bad steps in a row (backoff_after="
                  f"{config.backoff_after}): LR factor {state.lr_factor:g} -> {lr_factor:g}, "
                  f"restored over {config.recover_steps} good steps{note}")
        new_state = replace(new_state, lr_factor=lr_factor, recovery_from=lr_factor,
                            backoffs=state.backoffs + 1)
        return Decision(action="lr_backoff", reason=reason, lr_factor=lr_factor,
                        **common), new_state

    masked = "update masked on the device" if not obs.applied else "update was applied"
    if consecutive == 1:
        what = f"isolated bad step, {masked}: skipped"
    elif consecutive == config.backoff_after:  # no backoff above: the factor is at its floor
        what = (f"{consecutive} bad steps in a row but the LR factor is already at its floor "
                f"{state.lr_factor:g}, {masked}: skipped")
    else:
        what = (f"{consecutive} bad steps in a row (rollback at {_rollback_at(config)}), "
                f"{masked}: skipped")
    action = "quarantine" if newly else "skip"
    return Decision(action=action, reason=f"{seen}; {what}{note}",
                    lr_factor=new_state.lr_factor, **common), new_state


def _implicate(state: PolicyState, obs: Observation, config: PolicyConfig, kinds: list[str],
               consecutive: int) -> tuple[dict[Any, int], list[Any]]:
    """Quarantine bookkeeping: (images implicated so far and their counts, images quarantined now).
    Only kinds that point at the batch implicate its images, and a long run of bad steps looks
    systemic (LR, numerics), not like bad data: from the backoff_after-th bad step in a row on, the
    batch's images are no longer implicated."""
    implicated = dict(state.implicated)
    newly: list[Any] = []
    if DATA_KINDS.intersection(kinds) and consecutive < config.backoff_after:
        for image_id in dict.fromkeys(obs.image_ids):  # unique, in order
            if image_id in state.quarantined:
                continue
            implicated[image_id] = implicated.get(image_id, 0) + 1
            if implicated[image_id] >= config.quarantine_after:
                newly.append(image_id)
                del implicated[image_id]
    return implicated, newly


def _rollback(state: PolicyState, new_state: PolicyState, obs: Observation, config: PolicyConfig, seen: str,
              corrupted: bool, consecutive: int, note: str, common: dict[str, Any]) -> tuple[Decision, PolicyState]:
    if state.rollbacks >= config.max_rollbacks:
        reason = (f"{seen}; a rollback is needed but {state.rollbacks} rollbacks were already "
                  f"done (max_rollbacks={config.max_rollbacks}): stop")
        return _stop(new_state, config, reason, common)
    rollback_to, further = _rollback_target(state)
    ignore_through = obs.step + OBSERVATION_LAG
    why = ("the model state itself is corrupted (a parameter changed outside any update):"
           " masking cannot undo it" if corrupted else
           f"still bad {consecutive} steps in a row, after an LR backoff")
    target = ("the state the run started from" if rollback_to == state.base_step
              else f"the snapshot taken after step {rollback_to}")
    if further:
        target += f" (the one restored last, after step {state.last_restored}, went bad again)"
    reason = (f"{seen}; {why}: roll back to {target} and skip the batches since (rollback "
              f"{state.rollbacks + 1} of at most {config.max_rollbacks}){note}")
    new_state = replace(
        new_state, consecutive_bad=0, rollbacks=state.rollbacks + 1,
        corruptions=state.corruptions + int(corrupted), ignore_through_step=ignore_through,
        snapshots=tuple(s for s in state.snapshots if s <= rollback_to), last_restored=rollback_to)
    return Decision(action="rollback", reason=reason, lr_factor=new_state.lr_factor,
                    rollback_to_step=rollback_to, ignore_through_step=ignore_through,
                    **common), new_state


def _stop(state: PolicyState, config: PolicyConfig, reason: str,
          common: dict[str, Any]) -> tuple[Decision, PolicyState]:
    verdict = stop_verdict(state, config)
    state = replace(state, stopped=True, stop_reason=reason, stop_verdict=verdict)
    return Decision(action="stop", reason=reason, lr_factor=state.lr_factor, verdict=verdict,
                    **common), state


def _rollback_at(config: PolicyConfig) -> int:
    """Bad steps in a row that mean "still bad after the backoff": the steps already launched when
    the backoff was decided (OBSERVATION_LAG) ran at the old LR and do not count as after it."""
    return config.backoff_after + OBSERVATION_LAG + config.rollback_after


def _rollback_target(state: PolicyState) -> tuple[int, bool]:
    """(label to restore, whether it goes past the last restored one). The newest confirmed snapshot;
    if the last rollback restored that very snapshot and no newer one was confirmed since, the state
    went bad again: one further back (the base state at the end)."""
    candidates = list(state.snapshots)
    further = (state.last_restored is not None
               and not any(s > state.last_restored for s in candidates))
    if further:
        candidates = [s for s in candidates if s < state.last_restored]
    return (candidates[-1] if candidates else state.base_step), further


def _in_window(recent: tuple[BadStep, ...], step: int, config: PolicyConfig) -> tuple[BadStep, ...]:
    return tuple(bad for bad in recent if bad.step > step - config.skip_window)


def _max_lr(current: float, lr: float) -> float:
    return max(current, lr) if math.isfinite(lr) else current


def stop_verdict(state: PolicyState, config: PolicyConfig | None = None) -> str:
    """The most likely cause of the bad steps in the window and what to change (a stop's verdict; also
    usable at the end of any run)."""
    config = config or PolicyConfig()
    recent = state.recent
    window = f"{len(recent)} of the last {config.skip_window} steps"
    if state.corruptions and state.corruptions * 2 >= max(state.rollbacks, 1):
        return (f"model parameters were corrupted {state.corruptions} time(s) after healthy "
                f"steps: most likely hardware (GPU memory bit flips) or a faulty kernel — check the "
                f"GPU (nvidia-smi -q -d ECC), see the incidents in incidents.jsonl, and resume from "
                f"the last checkpoint on another device")
    if not recent:
        return "no incidents in the window" if not state.rollbacks else (
            f"{state.rollbacks} rollback(s) did not make the run healthy: lower train.lr")
    kind_counts = Counter(kind for bad in recent for kind in bad.kinds)
    half = (len(recent) + 1) // 2
    images = {image_id for bad in recent for image_id in bad.image_ids}
    if len(recent) == 1 and not state.rollbacks:
        only = recent[0]
        return (f"{', '.join(only.kinds)} in a single step ({only.step}) that did not repeat: "
                f"transient (hardware or non-determinism); nothing to change")
    if kind_counts["loss_scale_floor"] >= half:
        return (f"the fp16 loss scale fell below {config.min_loss_scale:g} in "
                f"{kind_counts['loss_scale_floor']} of the last {config.skip_window} steps: "
                f"gradients overflow fp16 even unscaled — train with train.amp=bf16 (or off), or "
                f"lower train.lr")
    component_counts = Counter(comp for bad in recent for comp in bad.components)
    if component_counts and kind_counts["nonfinite_loss"] >= half:
        component, count = component_counts.most_common(1)[0]
        where = (f"across {len(images)} images" if len(images) > 5 else
                 f"in only {len(images)} image(s) ({', '.join(map(str, sorted(images, key=str)))})")
        profile = PROFILES[config.loss_profile]
        every = set(profile.components) or set(component_counts)
        if len(every) > 1 and every <= set(component_counts) and all(c >= half for c in component_counts.values()):
            return (f"every loss component non-finite in {window} {where}: the input images "
                    f"probably contain NaN/Inf pixels or the normalisation divides by zero — run "
                    f"`nanguard audit` on the dataset")
        if component in profile.box_components:
            return (f"{component} non-finite in {count} of the last {config.skip_window} steps "
                    f"{where}: the data probably has degenerate or non-finite boxes — run "
                    f"`nanguard audit` on the dataset (with --fix) and train on the cleaned "
                    f"annotations")
        return (f"{component} non-finite in {count} of the last {config.skip_window} steps "
                f"{where}: the logits overflow — lower train.lr, and run `nanguard audit` for "
                f"broken images")
    if kind_counts["nonfinite_grad"] >= half:
        return (f"non-finite gradients with a finite loss in {kind_counts['nonfinite_grad']} of "
                f"the last {config.skip_window} steps: the backward pass overflows — lower "
                f"train.lr, keep guard.clip_norm > 0, or train with train.amp=bf16 or off")
    if kind_counts["model_error"] >= half:
        last = next(bad.model_error for bad in reversed(recent) if bad.model_error)
        return (f"the model raised an error on {kind_counts['model_error']} batches (last: "
                f"{last}): run `nanguard audit` on the dataset; the batches are in "
                f"incidents.jsonl")
    spikes = [bad for bad in recent if {"loss_spike", "grad_spike"}.intersection(bad.kinds)]
    if len(spikes) >= half:
        at_peak = state.max_lr_seen > 0 and all(
            bad.lr >= 0.9 * state.max_lr_seen for bad in spikes if math.isfinite(bad.lr))
        if at_peak:
            return (f"loss spikes at the peak learning rate, after LR warmup, in {len(spikes)} of "
                    f"the last {config.skip_window} steps: lower train.lr or raise train.warmup_steps")
        return (f"loss or gradient-norm spikes in {len(spikes)} of the last "
                f"{config.skip_window} steps: lower train.lr or lower guard.clip_norm")
    mixed = ", ".join(f"{kind} x{count}" for kind, count in kind_counts.most_common())
    return (f"mixed incidents ({mixed}) in {window}: see incidents.jsonl, starting with the "
            f"first one")
