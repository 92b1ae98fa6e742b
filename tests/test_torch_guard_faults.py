"""The policy's actions carried out by the torch Guard, and the Guard in a user's own training loop.

A run of NaN losses: skip, LR backoff, rollback (the model and optimizer are back at the snapshot),
and at last stop. A flipped weight bit (silent corruption): a rollback to finite weights. Outcomes come
one step late: `guard.step` returns the previous step's, `guard.flush()` the pending one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nanguard.backends.torch.faults import TorchFaults
from nanguard.backends.torch.guard import Guard
from nanguard.config import GuardConfig
from nanguard.guard import FaultPlan, IncidentLog, NullInjectionLog, PolicyConfig, read_incidents
from torch_helpers import NAN, batch, small_net


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model's and the optimizer's state, by a readable path."""
    found = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        found.update({f"optimizer/{index}/{k}": v.clone() for k, v in state.items()
                      if isinstance(v, torch.Tensor)})
    return found


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return sorted([k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])] + list(a.keys() ^ b.keys()))


def guarded(policy: PolicyConfig | None = None, config: GuardConfig | None = None):
    torch.manual_seed(0)
    model = small_net().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    return model, optimizer, Guard(model, optimizer, policy=policy, config=config)


def run_step(guard: Guard, model: nn.Module, step: int, *, nan: bool = False, faults=None) -> list:
    """One step of a user's loop; `faults` (TorchFaults) act where the trainer's step applies them."""
    images, labels = batch(step)
    loss = nn.functional.cross_entropy(model(images), labels)
    outcomes = guard.step({"loss": loss * NAN if nan else loss}, image_ids=(step,))
    if faults is not None:
        faults.after_update(guard.params)
    return outcomes


# ---------------------------------------------------------------------------------------------------
# 4. Policy actions through the Guard


def test_outcomes_arrive_one_step_late_and_flush_returns_the_pending_one():
    model, _, guard = guarded()
    assert run_step(guard, model, 0) == []
    [first] = run_step(guard, model, 1, nan=True)
    assert first.observation.step == 0 and first.decision.action == "none"
    [second] = run_step(guard, model, 2)
    assert second.observation.step == 1 and second.decision.action == "skip"  # an isolated bad step
    assert second.observation.image_ids == (1,) and not second.observation.applied
    [third] = guard.flush()
    assert third.observation.step == 2 and third.observation.applied
    assert guard.flush() == []


@pytest.mark.parametrize("snapshot_every", [4, 50])
def test_a_run_of_nan_losses_backs_off_then_rolls_back_further_then_stops(snapshot_every):
    """Healthy steps 0-9, then every loss NaN. The snapshot after step 4 is confirmed by steps 5 and 6;
    the one after step 8 never is (step 10 went bad). Rollback 1 restores 4; the state goes bad again,
    so rollback 2 goes further back, to the initial state, and so does 3; then the budget stops it."""
    policy = PolicyConfig(snapshot_every=snapshot_every, snapshot_healthy=2, snapshot_confirm=2)
    model, optimizer, guard = guarded(policy)
    kept = {-1: snapshot(model, optimizer)}
    outcomes = []
    for step in range(10):  # healthy: the weights move
        outcomes += run_step(guard, model, step)
        if step == 4:
            kept[4] = snapshot(model, optimizer)
    assert differences(kept[-1], snapshot(model, optimizer))
    assert guard.policy_state.snapshots == ((4,) if snapshot_every == 4 else ())

    restored = []
    for step in range(10, 80):  # every loss NaN from here on
        new = run_step(guard, model, step, nan=True)
        outcomes += new
        for o in new:
            if o.decision.action == "rollback":
                target = o.decision.rollback_to_step
                restored.append((target, differences(kept[target], snapshot(model, optimizer))))
        if guard.stopped:
            break

    actions = [o.decision.action for o in outcomes]
    assert actions[:10] == ["none"] * 10
    one_cycle = ["skip", "skip", "lr_backoff", "skip", "skip", "skip", "rollback", "none"]
    assert actions[10:10 + 3 * len(one_cycle)] == one_cycle * 3
    assert actions[-1] == "stop" and actions.count("stop") == 1 and guard.stopped
    assert "max_rollbacks=3" in outcomes[-1].decision.reason and outcomes[-1].decision.verdict
    expected = [4, -1, -1] if snapshot_every == 4 else [-1, -1, -1]
    assert restored == [(target, []) for target in expected]  # exactly the state named, every time
    # the observations that ran on the state thrown away are ignored
    assert all(o.decision.ignored for o in outcomes if o.observation.step in (17, 25, 33))

    # the LR backoff reaches the optimizer from the step launched after the decision on
    lr = {o.observation.step: o.observation.lr for o in outcomes}
    assert lr[13] == pytest.approx(0.1) and lr[14] == pytest.approx(0.05)
    assert lr[22] == pytest.approx(0.025) and optimizer.param_groups[0]["lr"] == 0.1


def test_an_lr_spike_at_a_snapshot_step_never_becomes_the_rollback_target():
    """Defect: the snapshot after step s was kept on s's own observation, made before s's update; an
    LR spike applied at s then rolled back to the ruined state again and again. Now the steps run with
    the snapshot must confirm it: a blow-up rolls back to the snapshot before, once, and training goes on."""
    policy = PolicyConfig(snapshot_every=5, snapshot_healthy=1, snapshot_confirm=2)
    config = GuardConfig(spike_window=8, spike_min_history=4)
    model, optimizer, guard = guarded(policy, config)
    outcomes, kept = [], {}
    for step in range(30):
        images, labels = batch(step)
        loss = nn.functional.cross_entropy(model(images), labels)
        backward = guard.backward({"loss": loss})
        for group in optimizer.param_groups:  # the update of step 10 with an LR 1000x too large
            group["lr"] = 100.0 if step == 10 else 0.1
        outcomes += guard.update(backward)
        if step == 5:
            kept[5] = snapshot(model, optimizer)
    outcomes += guard.flush()
    rollbacks = [o.decision for o in outcomes if o.decision.action == "rollback"]
    assert [d.rollback_to_step for d in rollbacks] == [5]
    assert 10 not in guard.policy_state.snapshots and not guard.stopped
    assert all(math.isfinite(o.observation.total_loss) for o in outcomes[-5:])


def test_weight_bitflip_leads_to_a_rollback_to_finite_weights():
    """A bit flips after step 3 (its parameter check already passed): step 4 runs on the corrupted
    weights and its check sees them; the rollback restores the snapshot after step 2 (confirmed by
    step 3) while step 5 runs."""
    model, optimizer, guard = guarded(PolicyConfig(snapshot_every=2, snapshot_healthy=1, snapshot_confirm=1))
    guard.config.param_check_every = 1
    plan = FaultPlan(["weight_bitflip@3"])
    states, outcomes = {}, []
    for step in range(8):
        outcomes += run_step(guard, model, step, faults=TorchFaults(plan, step, NullInjectionLog()))
        states[step] = snapshot(model, optimizer)
        peak = torch.stack([p.detach().abs().max() for p in model.parameters()]).max().item()  # NaN wins
        if step in (3, 4):  # flipped after step 3's update; step 4 ran on it
            assert not math.isfinite(peak) or peak > guard.config.param_abs_max
        else:
            assert math.isfinite(peak) and peak < guard.config.param_abs_max
    outcomes += guard.flush()

    seen = next(o for o in outcomes if o.observation.step == 4)
    assert seen.decision.action == "rollback"
    assert {"nonfinite_param", "wild_param"} & set(seen.decision.kinds)
    assert seen.decision.rollback_to_step == 2  # the newest confirmed snapshot
    assert "corrupted" in seen.decision.reason
    # the state right after the rollback (inside step 5's call) is the snapshot of step 2
    assert differences(states[2], states[5]) == []
    actions = [o.decision.action for o in outcomes]
    assert actions == ["none", "none", "none", "none", "rollback", "none", "none", "none"]
    assert outcomes[5].decision.ignored and outcomes[6].observation.applied  # then it trains again


def test_weight_bitflip_without_a_snapshot_rolls_back_to_the_initial_weights():
    model, optimizer, guard = guarded()
    guard.config.param_check_every = 1
    initial = snapshot(model, optimizer)
    plan = FaultPlan(["weight_bitflip@3"])
    for step in range(6):
        run_step(guard, model, step, faults=TorchFaults(plan, step, NullInjectionLog()))
    assert differences(initial, snapshot(model, optimizer)) == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# 5. The Guard in a user's own loop (not a detector)


def test_guard_in_a_plain_classifier_loop_skips_and_logs_the_one_nan(tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 3, generator=generator)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    guard = Guard(model, optimizer, incident_log=IncidentLog(tmp_path / "incidents.jsonl"))
    nan_step, outcomes = 12, []
    for step in range(30):
        features = torch.randn(64, 8, generator=generator)  # [64, 8] float32
        labels = (features @ teacher).argmax(dim=1)  # [64] int64: a learnable rule
        loss = nn.functional.cross_entropy(model(features), labels)
        if step == nan_step:
            loss = loss * NAN
        outcomes += guard.step({"loss": loss}, image_ids=(1000 + step,))
    outcomes += guard.flush()

    assert [o.observation.step for o in outcomes] == list(range(30))
    assert [o.decision.action for o in outcomes] == ["none"] * nan_step + ["skip"] + ["none"] * (29 - nan_step)
    losses = [o.observation.losses["loss"] for o in outcomes if o.observation.step != nan_step]
    assert all(math.isfinite(value) for value in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3  # it trains, across the skipped step

    [line] = read_incidents(tmp_path)
    assert line["step"] == nan_step and line["kind"] == "nonfinite_loss" and line["action"] == "skip"
    assert line["components"] == ["loss"] and line["image_ids"] == [1000 + nan_step]
    assert line["values"]["loss"] == "nan" and line["values"]["total_loss"] == "nan"
    assert line["values"]["grad_norm"] == "nan" and line["applied"] is False
    assert guard.incidents.summary()["skipped_steps"] == 1


def test_a_loss_spike_is_skipped_and_leaves_the_state():
    config = GuardConfig(spike_window=8, spike_min_history=4)
    model, optimizer, guard = guarded(config=config)
    for step in range(6):
        run_step(guard, model, step)
    before = snapshot(model, optimizer)
    images, labels = batch(6)
    loss = nn.functional.cross_entropy(model(images), labels)
    guard.step({"loss": loss * 1000.0}, image_ids=(6,))  # finite, but far above the recent losses
    assert differences(before, snapshot(model, optimizer)) == []
    [spike] = guard.flush()
    assert spike.observation.loss_spike and not spike.observation.applied
    assert "loss_spike" in spike.decision.kinds and spike.decision.action == "skip"
