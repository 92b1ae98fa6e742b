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
    images, labels = batch(step)
    loss = nn.functional.cross_entropy(model(images), labels)
    return guard.step({"loss": loss * NAN if nan else loss}, image_ids=(step,), faults=faults)


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
def test_a_run_of_nan_losses_backs_off_then_rolls_back_then_stops(snapshot_every):
    policy = PolicyConfig(snapshot_every=snapshot_every, snapshot_healthy=2)
    model, optimizer, guard = guarded(policy)
    kept = {-1: snapshot(model, optimizer)}
    snapshots_kept = []
    guard.on_snapshot = snapshots_kept.append
    outcomes = []
    for step in range(6):  # healthy: the weights move
        outcomes += run_step(guard, model, step)
        if step == 4:
            kept[4] = snapshot(model, optimizer)
    target = kept[4] if snapshot_every == 4 else kept[-1]
    assert differences(target, snapshot(model, optimizer))

    restored_after = []
    for step in range(6, 60):  # every loss NaN from here on
        new = run_step(guard, model, step, nan=True)
        outcomes += new
        if any(o.decision.action == "rollback" for o in new):
            restored_after.append(differences(target, snapshot(model, optimizer)))
        if guard.stopped:
            break

    actions = [o.decision.action for o in outcomes]
    assert actions[:6] == ["none"] * 6
    one_cycle = ["skip", "skip", "lr_backoff", "skip", "skip", "skip", "rollback", "none"]
    assert actions[6:6 + 3 * len(one_cycle)] == one_cycle * 3
    assert actions[-1] == "stop" and actions.count("stop") == 1 and guard.stopped
    assert "max_rollbacks=3" in outcomes[-1].decision.reason and outcomes[-1].decision.verdict
    assert snapshots_kept == ([4] if snapshot_every == 4 else [])

    # every rollback put the model, BatchNorm and the optimizer back at the snapshot
    assert restored_after == [[], [], []]
    rollbacks = [o.decision for o in outcomes if o.decision.action == "rollback"]
    assert all(d.rollback_to_step == 5 for d in rollbacks)  # the last healthy step
    # the observations that ran on the state thrown away are ignored
    assert all(o.decision.ignored for o in outcomes if o.observation.step in (13, 21, 29))

    # the LR backoff reaches the optimizer from the step launched after the decision on
    lr = {o.observation.step: o.observation.lr for o in outcomes}
    assert lr[9] == pytest.approx(0.1) and lr[10] == pytest.approx(0.05)
    assert lr[18] == pytest.approx(0.025) and optimizer.param_groups[0]["lr"] == 0.1


def test_weight_bitflip_leads_to_a_rollback_to_finite_weights():
    model, optimizer, guard = guarded(PolicyConfig(snapshot_every=2, snapshot_healthy=1))
    guard.config.param_check_every = 1
    plan = FaultPlan(["weight_bitflip@3"])
    states, outcomes = {}, []
    for step in range(8):
        outcomes += run_step(guard, model, step, faults=TorchFaults(plan, step, NullInjectionLog()))
        states[step] = snapshot(model, optimizer)
        peak = torch.stack([p.detach().abs().max() for p in model.parameters()]).max().item()  # NaN wins
        if step == 3:  # the flip happened after the update: the weights are wild now
            assert not math.isfinite(peak) or peak > guard.config.param_abs_max
        else:
            assert math.isfinite(peak) and peak < guard.config.param_abs_max
    outcomes += guard.flush()

    flipped = next(o for o in outcomes if o.observation.step == 3)
    assert flipped.decision.action == "rollback"
    assert {"nonfinite_param", "wild_param"} & set(flipped.decision.kinds)
    assert flipped.decision.rollback_to_step == 2  # the last step whose weights were checked clean
    assert "corrupted" in flipped.decision.reason
    # the state right after the rollback (inside step 4's call) is the snapshot of step 2
    assert differences(states[2], states[4]) == []
    actions = [o.decision.action for o in outcomes]
    assert actions == ["none", "none", "none", "rollback", "none", "none", "none", "none"]
    assert outcomes[4].decision.ignored and outcomes[5].observation.applied  # then it trains again


def test_weight_bitflip_without_a_snapshot_rolls_back_to_the_initial_weights():
    model, optimizer, guard = guarded()
    guard.config.param_check_every = 1
    initial = snapshot(model, optimizer)
    plan = FaultPlan(["weight_bitflip@3"])
    for step in range(5):
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
