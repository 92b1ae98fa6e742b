"""The recovery policy: one test per rule, JSON round-trip, determinism and termination."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanguard.errors import UserError
from nanguard.fileio import dumps
from nanguard.guard import OBSERVATION_LAG, Decision, Observation, PolicyConfig, PolicyState, decide, stop_verdict

NAN = float("nan")
INF = float("inf")
SRC = Path(__file__).resolve().parents[1] / "src"


def good(step: int, **kw) -> Observation:
    defaults = dict(nonfinite_param=False, losses={"loss_box_reg": 0.5}, total_loss=1.0,
                    grad_norm=2.0, lr=0.01, image_ids=(f"g{step}",))
    return Observation(step=step, **{**defaults, **kw})


def bad(step: int, **kw) -> Observation:
    defaults = dict(nonfinite_loss=True, losses={"loss_box_reg": NAN, "loss_classifier": 0.3},
                    image_ids=(f"b{step}",), total_loss=NAN, grad_norm=NAN, lr=0.01,
                    applied=False)
    return Observation(step=step, **{**defaults, **kw})


def run(observations, config=None, state=None):
    state = state or PolicyState()
    decisions = []
    for obs in observations:
        decision, state = decide(state, obs, config)
        decisions.append(decision)
    return decisions, state


def test_guard_imports_without_any_framework():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['mindspore'] = None; "
            "import nanguard.guard, nanguard.guard.policy, nanguard.guard.faults; "
            "assert 'numpy' not in sys.modules, 'the guard should not need numpy'")
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_healthy_step_is_none():
    decision, state = decide(PolicyState(), good(0))
    assert decision.action == "none" and decision.lr_factor == 1.0 and not decision.kinds
    assert state.last_good_step == 0 and state.good_streak == 1


def test_isolated_bad_step_is_skipped():
    decisions, state = run([good(0), bad(1), good(2)])
    assert [d.action for d in decisions] == ["none", "skip", "none"]
    assert decisions[1].kinds == ("nonfinite_loss",)
    assert "loss_box_reg=nan" in decisions[1].reason and "isolated" in decisions[1].reason
    assert state.consecutive_bad == 0 and state.lr_factor == 1.0


def test_backoff_after_consecutive_bad_steps():
    config = PolicyConfig(backoff_after=3, backoff_factor=0.5)
    decisions, state = run([good(0), bad(1), bad(2), bad(3)], config)
    assert [d.action for d in decisions] == ["none", "skip", "skip", "lr_backoff"]
    assert decisions[-1].lr_factor == 0.5 and state.backoffs == 1
    assert "3 bad steps in a row" in decisions[-1].reason


def test_lr_recovers_gradually_over_recover_steps():
    config = PolicyConfig(recover_steps=10)
    _, state = run([bad(0), bad(1), bad(2)], config)
    assert state.lr_factor == 0.5
    decisions, state = run([good(step) for step in range(3, 13)], config, state)
    factors = [d.lr_factor for d in decisions]
    assert all(a < b for a, b in zip(factors, factors[1:]))  # strictly rising
    assert 0.5 < factors[0] < 1.0 and factors[-1] == 1.0
    assert factors[4] == pytest.approx(0.5 ** 0.5)  # geometric: halfway in log space


def test_bad_step_restarts_the_recovery_ramp_from_where_it_is():
    config = PolicyConfig(recover_steps=10)
    _, state = run([bad(0), bad(1), bad(2)] + [good(s) for s in range(3, 8)], config)
    reached = state.lr_factor
    decision, state = decide(state, bad(8), config)
    assert decision.action == "skip" and decision.lr_factor == reached
    decisions, state = run([good(s) for s in range(9, 19)], config, state)
    assert decisions[-1].lr_factor == 1.0


def test_lr_factor_never_below_floor():
    config = PolicyConfig(min_lr_factor=0.25, backoff_after=1, rollback_after=100,
                          max_skip_fraction=1.0, skip_window=1000)
    decisions, _ = run([bad(s) if s % 2 else good(s) for s in range(20)], config)
    assert min(d.lr_factor for d in decisions) == 0.25


def test_rollback_when_still_bad_after_backoff():
    config = PolicyConfig(backoff_after=3, rollback_after=3)
    decisions, state = run([good(0), good(1)] + [bad(s) for s in range(2, 9)], config)
    # step 5 was already launched at the old LR when the backoff came (lag); 6, 7, 8 ran at half
    assert [d.action for d in decisions[2:]] == ["skip", "skip", "lr_backoff", "skip", "skip",
                                                 "skip", "rollback"]
    assert "rollback at 7" in decisions[-2].reason
    rollback = decisions[-1]
    assert rollback.rollback_to_step == -1  # no snapshot confirmed yet: the state the run started from
    assert rollback.ignore_through_step == 9  # step 9 was already launched (one-step lag)
    assert "roll back" in rollback.reason
    assert state.rollbacks == 1 and state.consecutive_bad == 0 and state.lr_factor == 0.5


@pytest.mark.parametrize("flags", [{"nonfinite_param": True}, {"wild_param": True}])
def test_corrupted_state_rolls_back_at_once(flags):
    observations = [good(0), good(1, nonfinite_param=None), good(2, nonfinite_param=None),
                    Observation(step=3, total_loss=1.0, grad_norm=1.0, applied=True, **flags)]
    decisions, state = run(observations)
    assert decisions[-1].action == "rollback"
    assert decisions[-1].rollback_to_step == -1  # no confirmed snapshot: the initial state
    assert state.corruptions == 1 and "corrupted" in decisions[-1].reason


def test_a_nonfinite_buffer_is_a_bad_batch_not_corruption():
    """The backend masks the BatchNorm write of a bad forward pass: skip, don't roll back."""
    decisions, state = run([good(0), Observation(step=1, nonfinite_buffer=True, nonfinite_loss=True,
                                                 applied=False, image_ids=(4,))])
    assert decisions[-1].action == "skip" and state.rollbacks == 0


def test_lagging_observations_after_a_rollback_are_ignored():
    decisions, state = run([good(0), Observation(step=1, wild_param=True, nonfinite_param=False)])
    assert decisions[-1].action == "rollback" and decisions[-1].ignore_through_step == 2
    lagging, after = decide(state, bad(2))
    assert lagging.ignored and lagging.action == "none" and after == state
    decision, state = decide(state, bad(3))
    assert not decision.ignored and decision.action == "skip" and state.consecutive_bad == 1


def test_observation_lag_is_not_a_setting():
    """The lag is the backends' (one step), not the user's: the old key is refused by name."""
    with pytest.raises(TypeError):
        PolicyConfig(observation_lag=2)


def test_quarantine_after_repeated_implication():
    config = PolicyConfig(quarantine_after=2)
    observations = [bad(0, image_ids=(7, 8)), good(1), good(2), bad(3, image_ids=(7, 9)), good(4),
                    bad(5, image_ids=(7,))]
    decisions, state = run(observations, config)
    assert decisions[3].action == "quarantine" and decisions[3].quarantine == (7,)
    assert "quarantined" in decisions[3].reason
    assert decisions[5].action == "skip" and decisions[5].quarantine == ()  # already quarantined
    assert state.quarantined == (7,)


def test_corruption_and_systemic_streaks_do_not_implicate_images():
    config = PolicyConfig(quarantine_after=1, backoff_after=3)
    decisions, _ = run([Observation(step=0, wild_param=True, image_ids=(1,))], config)
    assert decisions[0].quarantine == ()
    decisions, state = run([bad(s, image_ids=(s,)) for s in range(5)], config)
    assert state.quarantined == (0, 1)  # steps 2, 3, 4 are a streak: systemic, not data


def test_scale_overflow_alone_is_not_an_incident():
    obs = Observation(step=0, scale_overflow=True, applied=False, loss_scale=32768.0)
    assert not obs.bad() and obs.kinds(1.0) == []
    decision, state = decide(PolicyState(), obs)
    assert decision.action == "none" and state.consecutive_bad == 0


def test_loss_scale_below_floor_is_an_incident():
    obs = Observation(step=0, scale_overflow=True, applied=False, loss_scale=0.5)
    assert obs.kinds(1.0) == ["loss_scale_floor"] and obs.kinds() == []
    decision, _ = decide(PolicyState(), obs, PolicyConfig(min_loss_scale=1.0))
    assert decision.action == "skip" and decision.kinds == ("loss_scale_floor",)
    assert "loss scale 0.5" in decision.reason


def test_model_error_is_an_incident():
    obs = Observation(step=4, model_error="RuntimeError: boxes must be [N, 4]", applied=False)
    decision, _ = decide(PolicyState(), obs)
    assert decision.action == "skip" and decision.kinds == ("model_error",)
    assert "boxes must be" in decision.reason


def test_stop_on_skip_budget_with_a_verdict():
    config = PolicyConfig(skip_window=200, max_skip_fraction=0.25)
    # every other step bad, each from a different image: never 3 in a row, never quarantined
    observations = [bad(s, image_ids=(s,)) if s % 2 else good(s) for s in range(400)]
    decisions, state = run(observations, config)
    stops = [i for i, d in enumerate(decisions) if d.action == "stop"]
    assert stops and stops[0] == 2 * config.max_skipped + 1  # the 51st bad step
    first = decisions[stops[0]]
    assert "51 of the last 200 steps were bad" in first.reason
    assert "loss_box_reg non-finite" in first.verdict and "nanguard audit" in first.verdict
    assert all(d.action == "stop" for d in decisions[stops[0]:])  # stays stopped
    assert state.stopped and state.stop_verdict == first.verdict


def test_stop_on_rollback_budget_with_a_verdict():
    config = PolicyConfig(max_rollbacks=3)
    observations, step = [], 0
    for _ in range(4):
        observations += [good(step), Observation(step=step + 1, wild_param=True,
                                                 nonfinite_param=False)]
        step += 3  # step + 2 is the lagging one, never sent here
    decisions, state = run(observations, config)
    assert [d.action for d in decisions if d.action != "none"] == ["rollback"] * 3 + ["stop"]
    assert "max_rollbacks=3" in decisions[-1].reason
    assert "hardware" in decisions[-1].verdict and state.rollbacks == 3


def test_a_snapshot_is_confirmed_by_the_steps_run_with_it():
    """A copy staged after step s is kept only once s+1 ... s+snapshot_confirm were healthy: s's own
    observation was made before s's update and cannot vouch for it (an LR spike applied at s)."""
    config = PolicyConfig(snapshot_healthy=3, snapshot_every=5, snapshot_confirm=2)
    decisions, state = run([good(s) for s in range(13)], config)
    assert [(d.step, d.confirm_snapshot) for d in decisions if d.confirm_snapshot] == [(7, 5), (12, 10)]
    assert state.snapshots == (5, 10)
    # the step after 15 is bad (the update of 15 blew up): 15 is never confirmed
    decisions, state = run([good(13), good(14), good(15), bad(16), good(17), good(18)], config, state)
    assert not any(d.confirm_snapshot for d in decisions) and state.snapshots == (5, 10)
    # 20 needs 18, 19, 20 healthy before it and 21, 22 after it
    decisions, state = run([good(s) for s in range(19, 23)], config, state)
    assert decisions[-1].confirm_snapshot == 20 and state.snapshots == (10, 20)  # keep_snapshots=2


def test_a_snapshot_needs_its_own_step_healthy():
    config = PolicyConfig(snapshot_healthy=0, snapshot_every=5, snapshot_confirm=1)
    decisions, _ = run([good(4), bad(5), good(6)], config)
    assert not any(d.confirm_snapshot for d in decisions)


def test_rollback_to_the_newest_confirmed_snapshot_then_further_back():
    """A single fault must never end a run a rollback can save: a state that goes bad again after a
    rollback is not restored a second time; the next rollback goes one snapshot further back."""
    config = PolicyConfig(snapshot_healthy=1, snapshot_every=5, snapshot_confirm=1, keep_snapshots=3,
                          backoff_after=1, rollback_after=1, max_rollbacks=5)
    decisions, state = run([good(s) for s in range(17)], config)
    assert state.snapshots == (5, 10, 15)
    rollback_at = config.backoff_after + 1 + config.rollback_after  # bad steps in a row
    decisions, state = run([bad(s) for s in range(17, 17 + rollback_at)], config, state)
    assert decisions[-1].action == "rollback" and decisions[-1].rollback_to_step == 15
    step = 17 + rollback_at + 1  # the lagging step is skipped (never sent)
    decisions, state = run([bad(s) for s in range(step, step + rollback_at)], config, state)
    assert decisions[-1].action == "rollback" and decisions[-1].rollback_to_step == 10
    assert "went bad again" in decisions[-1].reason and state.snapshots == (5, 10)
    # healthy again: a new snapshot on top of 10, and the next rollback goes to it
    step += rollback_at + 1
    decisions, state = run([good(s) for s in range(step, 32)], config, state)
    assert state.snapshots == (10, 25, 30)
    decisions, state = run([bad(s) for s in range(32, 32 + rollback_at)], config, state)
    assert decisions[-1].rollback_to_step == 30 and "again" not in decisions[-1].reason


def test_a_resumed_state_rolls_back_to_its_checkpoint():
    config = PolicyConfig(snapshot_healthy=1, snapshot_every=5, snapshot_confirm=1)
    _, state = run([good(s) for s in range(8)], config)
    assert state.snapshots == (5,)
    state = PolicyState.from_dict(json.loads(dumps(state.to_dict()))).resumed_at(7)
    assert state.snapshots == () and state.base_step == 7
    decisions, _ = run([Observation(step=8, wild_param=True, nonfinite_param=False)], config, state)
    assert decisions[-1].rollback_to_step == 7 and "the state the run started from" in decisions[-1].reason


def test_invalid_targets_are_logged_but_the_step_counts_as_healthy():
    obs = good(3, invalid_targets=((7, 70, "zero or negative width or height"),))
    decision, state = decide(PolicyState(), obs)
    assert decision.action == "none" and decision.kinds == ("invalid_target",)
    assert "image 7 annotation 70" in decision.reason and state.consecutive_bad == 0 and state.good_streak == 1


def test_verdicts():
    config = PolicyConfig()
    spikes = [Observation(step=s, loss_spike=True, lr=0.02, applied=False) for s in range(3)]
    _, state = run([good(0, lr=0.02)] + [replace(o, step=o.step + 1) for o in spikes], config)
    assert "after LR warmup" in stop_verdict(state, config)
    assert "lower train.lr" in stop_verdict(state, config)
    _, state = run([good(0), Observation(step=1, nonfinite_grad=True, grad_norm=INF)])
    assert "transient" in stop_verdict(state)
    assert stop_verdict(PolicyState()) == "no incidents in the window"


def test_config_validation_and_round_trip():
    with pytest.raises(UserError, match="policy.backoff_factor"):
        PolicyConfig(backoff_factor=1.5)
    with pytest.raises(UserError, match="policy.skip_window"):
        PolicyConfig(skip_window=0)
    with pytest.raises(UserError, match="unknown policy setting.*bogus"):
        PolicyConfig.from_dict({"bogus": 1})
    config = PolicyConfig(recover_steps=7)
    assert PolicyConfig.from_dict(json.loads(dumps(config.to_dict()))) == config


def test_state_round_trips_through_strict_json():
    observations = [good(0), bad(1, image_ids=(1, "a")), bad(2, lr=INF), bad(3), good(4),
                    bad(5, image_ids=(1,)), Observation(step=6, wild_param=True), good(8)]
    _, state = run(observations)
    text = dumps(state.to_dict())  # allow_nan=False: raises on a stray NaN
    restored = PolicyState.from_dict(json.loads(text))
    assert restored.to_dict() == state.to_dict()
    assert math.isinf(restored.recent[1].lr) and restored.quarantined == (1,)
    # the restored state decides exactly like the original
    assert decide(restored, bad(9))[0] == decide(state, bad(9))[0]


def test_state_from_an_older_or_newer_checkpoint():
    assert PolicyState.from_dict({"rollbacks": 2}) == PolicyState(rollbacks=2)
    with pytest.raises(UserError, match="unknown keys future_field"):
        PolicyState.from_dict({"future_field": 1})


def test_describe_names_every_kind():
    obs = Observation(step=3, losses={"loss_box_reg": NAN}, grad_norm=INF, nonfinite_loss=True,
                      nonfinite_grad=True, loss_scale=0.5)
    assert obs.describe(min_loss_scale=1.0) == (
        "step 3: non-finite loss (loss_box_reg=nan), non-finite gradient (grad_norm=inf), "
        "fp16 loss scale 0.5 below min_loss_scale=1")
    assert good(4).describe() == "step 4: healthy"


def test_decision_to_dict_is_strict_json_with_every_field():
    """What the backend and the incident log read from a decision survives strict JSON: every field,
    with the tuples as lists, for each kind of action."""
    field_names = [f.name for f in dataclasses.fields(Decision)]

    def round_trip(decision: Decision) -> dict:
        data = json.loads(dumps(decision.to_dict()))  # dumps: allow_nan=False
        assert list(data) == field_names
        rebuilt = Decision(**{**data, "quarantine": tuple(data["quarantine"]), "kinds": tuple(data["kinds"])})
        assert rebuilt == decision
        return data

    skip, _ = decide(PolicyState(), bad(0))
    assert round_trip(skip) == {
        "step": 0, "action": "skip",
        "reason": "step 0: non-finite loss (loss_box_reg=nan); isolated bad step, update masked on the "
                  "device: skipped",
        "lr_factor": 1.0, "confirm_snapshot": None, "quarantine": [], "kinds": ["nonfinite_loss"],
        "verdict": None, "rollback_to_step": None, "ignore_through_step": None, "ignored": False}

    config = PolicyConfig(snapshot_every=5, snapshot_healthy=1, snapshot_confirm=1)
    decisions, _ = run([good(0), good(5, nonfinite_param=False), good(6), Observation(step=7, wild_param=True)],
                       config)
    rollback = round_trip(decisions[-1])
    assert (rollback["action"], rollback["kinds"], rollback["rollback_to_step"],
            rollback["ignore_through_step"]) == ("rollback", ["wild_param"], 5, 8)

    decisions, _ = run([bad(0, image_ids=(1,)), good(1), bad(2, image_ids=(1, "x"))])
    quarantine = round_trip(decisions[-1])
    assert (quarantine["action"], quarantine["quarantine"]) == ("quarantine", [1])

    decisions, _ = run([good(0), Observation(step=1, wild_param=True)], PolicyConfig(max_rollbacks=0))
    stop = round_trip(decisions[-1])
    assert stop["action"] == "stop" and isinstance(stop["verdict"], str) and stop["verdict"]

    decisions, _ = run([good(0, nonfinite_param=False), Observation(step=1, wild_param=True), bad(2)])
    ignored = round_trip(decisions[-1])
    assert ignored["ignored"] is True and ignored["action"] == "none"

    lr_inf, _ = decide(PolicyState(lr_factor=0.25), bad(3, lr=INF))
    assert round_trip(lr_inf)["lr_factor"] == 0.25


# ---------------------------------------------------------------- properties

KIND_FLAGS = ["nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_spike", "nonfinite_buffer",
              "wild_param", "nonfinite_param", "model_error", "loss_scale_floor"]


def make_obs(step: int, kind: str | None, image: int) -> Observation:
    if kind is None:
        return good(step, image_ids=(image,))
    if kind == "model_error":
        return Observation(step=step, model_error="boom", applied=False, image_ids=(image,))
    if kind == "loss_scale_floor":
        return Observation(step=step, loss_scale=0.25, applied=False, image_ids=(image,))
    return Observation(step=step, applied=False, image_ids=(image,), **{kind: True})


streams = st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(KIND_FLAGS)),
                             st.integers(0, 20)), max_size=300)


@settings(max_examples=60, deadline=None)
@given(streams)
def test_same_observations_same_decisions(stream):
    observations = [make_obs(step, kind, image) for step, (kind, image) in enumerate(stream)]
    first, state_a = run(observations)
    second, state_b = run(observations)
    assert first == second and state_a == state_b
    # checkpoint mid-way: restoring the state from JSON changes nothing
    half = len(observations) // 2
    _, mid = run(observations[:half])
    mid = PolicyState.from_dict(json.loads(dumps(mid.to_dict())))
    rest, _ = run(observations[half:], state=mid)
    assert [d.to_dict() for d in rest] == [d.to_dict() for d in first[half:]]


@settings(max_examples=60, deadline=None)
@given(streams)
def test_invariants_on_any_stream(stream):
    config = PolicyConfig()
    observations = [make_obs(step, kind, image) for step, (kind, image) in enumerate(stream)]
    decisions, state = run(observations, config)
    stopped = False
    bad_steps = []
    for obs, decision in zip(observations, decisions):
        assert decision.action in ("none", "skip", "quarantine", "lr_backoff", "rollback", "stop")
        assert config.min_lr_factor <= decision.lr_factor <= 1.0
        if stopped:
            assert decision.action == "stop"
        stopped = stopped or decision.action == "stop"
        if decision.kinds and not stopped:
            bad_steps.append(obs.step)
            in_window = [s for s in bad_steps if s > obs.step - config.skip_window]
            assert len(in_window) <= config.max_skipped
        if decision.action == "stop":
            assert decision.verdict
    assert state.rollbacks <= config.max_rollbacks


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(KIND_FLAGS), min_size=200, max_size=200))
def test_an_all_bad_stream_stops_within_a_bound(kinds):
    config = PolicyConfig()
    state = PolicyState()
    # each rollback needs at most backoff_after + rollback_after bad steps plus the lagging ones
    bound = (config.max_rollbacks + 1) * (config.backoff_after + config.rollback_after
                                          + 2 * OBSERVATION_LAG)
    for step, kind in enumerate(kinds):
        decision, state = decide(state, make_obs(step, kind, step), config)
        if decision.action == "stop":
            break
    assert decision.action == "stop" and step < bound


def test_verdicts_read_the_loss_profile_not_a_fixed_detector():
    """The Faster R-CNN names are a named profile: a classifier loop with two components gets the
    all-components verdict under the generic profile, and no box advice."""
    both = {"loss_a": NAN, "loss_b": NAN}
    config = PolicyConfig(loss_profile="generic", backoff_after=50, rollback_after=50)
    _, state = run([bad(s, losses=both, image_ids=(s,)) for s in range(6)], config)
    assert "every loss component non-finite" in stop_verdict(state, config)
    box_only = [bad(s, losses={"loss_box_reg": NAN, "loss_classifier": 0.3}, image_ids=(s,)) for s in range(6)]
    _, state = run(box_only, PolicyConfig(backoff_after=50, rollback_after=50))
    assert "degenerate or non-finite boxes" in stop_verdict(state)
    _, state = run(box_only, config)
    assert "boxes" not in stop_verdict(state, config)
    with pytest.raises(UserError, match="policy.loss_profile"):
        PolicyConfig(loss_profile="yolo")
