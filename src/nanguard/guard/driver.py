"""Carrying out the policy's decisions, framework-free: the LR factor, snapshots staged and confirmed,
the rollback target, the stop. A backend gives it two callables — `capture()` (a host copy of the whole
training state) and `restore(copy)` — and calls `stage(step)` after each update and `decide(obs)` for
each observation it reads (one step late).

    driver = PolicyDriver(cfg.policy, incidents, capture=backend_capture, restore=backend_restore)
    ... run step s (its update applied or masked on the device) ...
    driver.stage(s)                        # a copy every policy.snapshot_every steps, kept once confirmed
    outcomes = driver.decide(observation_of_step_s_minus_1)

Snapshots are confirmed by the observations made with them (`policy.snapshot_confirm` healthy steps
after the one they were taken at); a rollback restores exactly the snapshot the decision names, and the
copies the policy no longer lists are dropped. Both backends' guards drive their policy with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from nanguard.guard.incidents import IncidentLog, NullIncidentLog
from nanguard.guard.observation import Observation
from nanguard.guard.policy import Decision, Outcome, PolicyConfig, PolicyState, decide


class PolicyDriver:
    def __init__(self, policy: PolicyConfig, incidents: IncidentLog | NullIncidentLog | None, *,
                 capture: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        self.config = policy
        self.incidents = incidents or NullIncidentLog()
        self.capture, self.restore = capture, restore
        self.policy_state = PolicyState()
        self.lr_factor = 1.0
        self.stopped = False
        self._staged: dict[int, Any] = {}  # copies waiting for confirmation, by step
        self._kept: dict[int, Any] = {-1: capture()}  # confirmed ones and the base

    def snapshot_due(self, step: int) -> bool:
        return step > 0 and step % self.config.snapshot_every == 0

    def weights_check_due(self, step: int, every: int) -> bool:
        """Are the weights checked after step `step`'s update? On the guard.param_check_every grid, and
        wherever a snapshot keeps the state (a rollback must never restore a corrupted copy)."""
        return step % every == 0 or self.snapshot_due(step)

    def stage(self, step: int) -> None:
        """After step `step`'s update: keep a copy of the state if a snapshot is due (a host copy every
        policy.snapshot_every steps, not every step)."""
        if self.snapshot_due(step):
            self._staged[step] = self.capture()

    def decide(self, obs: Observation | None) -> list[Outcome]:
        if obs is None:
            return []
        decision, self.policy_state = decide(self.policy_state, obs, self.config)
        self._carry_out(obs, decision)
        return [Outcome(obs, decision)]

    def _carry_out(self, obs: Observation, decision: Decision) -> None:
        self.lr_factor = decision.lr_factor
        self.incidents.record(obs, decision)  # writes a line only for an incident
        if decision.confirm_snapshot in self._staged:
            self._kept[decision.confirm_snapshot] = self._staged.pop(decision.confirm_snapshot)
        horizon = obs.step - self.config.snapshot_confirm  # a copy that can no longer be confirmed goes
        self._staged = {s: snap for s, snap in self._staged.items() if s > horizon}
        if decision.action == "rollback":
            self.restore(self._kept[decision.rollback_to_step])
            self._staged.clear()  # the step run last ran on the state thrown away: the policy ignores it
        wanted = set(self.policy_state.snapshots) | {self.policy_state.base_step}
        self._kept = {s: snap for s, snap in self._kept.items() if s in wanted}
        if decision.action == "stop":
            self.stopped = True

    def newest_kept(self) -> tuple[int, Any]:
        """(label, copy) of the newest state a rollback could restore (the reference a replay compares a
        bad state with)."""
        newest = max(self._kept)
        return newest, self._kept[newest]

    def rebase(self, label: int, snapshot: Any) -> None:
        """The state labelled `label` (after that step; a checkpoint just written) is the base now:
        older rollback targets go, as in a process that resumes from that checkpoint."""
        self.policy_state = replace(self.policy_state, base_step=label, last_restored=None,
                                    snapshots=tuple(s for s in self.policy_state.snapshots if s > label))
        self._staged = {s: snap for s, snap in self._staged.items() if s > label}
        self._kept = {s: snap for s, snap in self._kept.items() if s > label}
        self._kept[label] = snapshot

    def state_dict(self, steps_run: int) -> dict[str, Any]:
        """The policy's part of a checkpoint (the snapshots are not: a resumed run starts from the
        checkpoint, its base)."""
        return {"policy_state": self.policy_state.resumed_at(steps_run - 1).to_dict(), "lr_factor": self.lr_factor}

    def load_state_dict(self, state: dict[str, Any], steps_run: int) -> None:
        """After the backend has loaded the rest of the checkpoint: it is the base state."""
        self.policy_state = PolicyState.from_dict(state["policy_state"]).resumed_at(steps_run - 1)
        self.lr_factor = float(state["lr_factor"])
        self.stopped = self.policy_state.stopped
        self._kept = {steps_run - 1: self.capture()}
        self._staged = {}
