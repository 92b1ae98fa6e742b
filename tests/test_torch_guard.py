"""The torch Guard's promise: a bad step changes nothing.

After a step with a NaN in the loss, in one gradient or in the input pixels, every tensor of the model's
and the optimizer's state_dict is bit for bit what it was before (BatchNorm running stats and counters,
optimizer moments and step counters included), for fused and non-fused SGD, Adam and AdamW, also when the
bad step is the very first one. Plus: the fp16 GradScaler's overflow is not an incident, and a batch the
model refused (`skip_batch`) leaves BatchNorm as it was.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from nanguard.backends.torch.devicestate import LRSchedule, materialize_optimizer_state
from nanguard.backends.torch.guard import Guard, StepContext
from nanguard.config import TrainConfig
from nanguard.guard import IncidentLog, read_incidents
from torch_helpers import NAN, batch, small_net, two_losses


OPTIMIZERS = {
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True),
    "sgd_foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-4, fused=True),
    # a tensor lr (the guard's LRSchedule) needs foreach=False in the non-fused Adam/AdamW
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-4, foreach=False),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, foreach=False),
}


def bad_step(guard: Guard, model: nn.Module, fault: str, seed: int = 99) -> list:
    """nan_input: NaN pixels (the forward writes NaN into BatchNorm's running stats); loss_nan: one
    component times NaN (so the NaN reaches every gradient too); grad_nan: one NaN in one element of
    one parameter's gradient, after backward (a transient fault)."""
    images, labels = batch(seed)
    if fault == "nan_input":
        images[0, :, :2] = NAN
    losses = two_losses(model, images, labels)
    if fault == "loss_nan":
        losses["loss_box_reg"] = losses["loss_box_reg"] * NAN
    backward = guard.backward(losses)  # between backward and the update: where a grad fault lands
    if fault == "grad_nan":
        guard.params[0].grad.view(-1)[1] = NAN
    return guard.update(backward, StepContext(image_ids=(seed,)))


def healthy_step(guard: Guard, model: nn.Module, seed: int) -> list:
    images, labels = batch(seed)
    return guard.step(two_losses(model, images, labels), image_ids=(seed,))


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def tensors_of(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) state_dict, by a readable path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    found: dict[str, torch.Tensor] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            found.update(tensors_of(value, f"{prefix}/{key}"))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found.update(tensors_of(value, f"{prefix}/{i}"))
    return found


def changed(before: tuple[dict, dict], after: tuple[dict, dict]) -> list[str]:
    """Paths of the tensors that differ (bit for bit), plus any added or missing ones."""
    old, new = tensors_of(before), tensors_of(after)
    assert old, "nothing to compare"
    differ = [path for path in old.keys() & new.keys() if not torch.equal(old[path], new[path])]
    return sorted(differ + list(old.keys() ^ new.keys()))


def non_tensor_groups(optimizer_state: dict) -> list[dict]:
    """The param_groups without tensors (lr, betas...): a tensor lr must not leak into them."""
    return [{k: v for k, v in group.items() if not isinstance(v, torch.Tensor)}
            for group in optimizer_state["param_groups"]]


# ---------------------------------------------------------------------------------------------------
# 1. A skipped step changes nothing


@pytest.mark.parametrize("fault", ["loss_nan", "grad_nan", "nan_input"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_a_bad_step_leaves_model_and_optimizer_state_bit_for_bit(optimizer_name, fault):
    torch.manual_seed(0)
    model = small_net().train()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    schedule = LRSchedule(TrainConfig(lr=0.05, steps=20, warmup_steps=3))
    guard = Guard(model, optimizer, schedule=schedule)
    healthy_step(guard, model, 1)
    first = snapshot(model, optimizer)
    healthy_step(guard, model, 2)
    assert schedule.applied.item() == 2
    before = snapshot(model, optimizer)
    # the test can fail: a healthy step changes the weights, BatchNorm and the optimizer state
    moved = changed(first, before)
    assert any(path.startswith("/0/0.weight") for path in moved)
    assert any(path.endswith("running_mean") for path in moved)
    assert any(path.startswith("/1/state") for path in moved)
    assert any(key.endswith("num_batches_tracked") for key in before[0])
    assert before[1]["state"], "the optimizer has per-parameter state to protect"

    bad_step(guard, model, fault)

    after = snapshot(model, optimizer)
    assert changed(before, after) == []
    assert non_tensor_groups(after[1]) == non_tensor_groups(before[1])
    assert schedule.applied.item() == 2  # the schedule counts applied updates only
    [outcome] = guard.flush()
    assert outcome.observation.step == 2 and not outcome.observation.applied
    assert outcome.observation.nonfinite_loss == (fault != "grad_nan")
    assert outcome.observation.nonfinite_grad


@pytest.mark.parametrize("fault", ["loss_nan", "grad_nan", "nan_input"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_a_bad_very_first_step_leaves_the_materialized_state(optimizer_name, fault):
    torch.manual_seed(0)
    model = small_net().train()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    materialize_optimizer_state(optimizer)  # the guard does it too; done here to snapshot it first
    before = snapshot(model, optimizer)
    assert before[1]["state"]
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    guard = Guard(model, optimizer)

    bad_step(guard, model, fault)

    assert changed(before, snapshot(model, optimizer)) == []
    # the test can fail: the same first step on a healthy batch changes weights, BN and moments
    healthy_step(Guard(twin_model, twin_optimizer), twin_model, 99)
    moved = changed(before, snapshot(twin_model, twin_optimizer))
    assert any(path.startswith("/0/0.weight") for path in moved)
    assert any(path.endswith("num_batches_tracked") for path in moved)
    assert any(path.startswith("/1/state") for path in moved)


@pytest.mark.parametrize("make", [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, foreach=True),
                 id="sgd_dampening"),
    pytest.param(lambda p: torch.optim.RMSprop(p, lr=0.01, foreach=False), id="rmsprop"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1), id="sgd_plain"),
])
def test_a_bad_first_step_with_other_optimizers_leaves_no_state(make):
    torch.manual_seed(0)
    model = small_net().train()
    optimizer = make(model.parameters())
    guard = Guard(model, optimizer)
    before = snapshot(model, optimizer)
    bad_step(guard, model, "grad_nan")
    assert changed(before, snapshot(model, optimizer)) == []


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("fault_at", [0, 2])
def test_a_run_with_a_skipped_grad_nan_batch_equals_the_run_without_it(optimizer_name, fault_at):
    """What "skip" promises a user: the same weights as if the bad batch had never been there."""

    def run(with_fault: bool) -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = small_net().train()
        optimizer = OPTIMIZERS[optimizer_name](model.parameters())
        guard = Guard(model, optimizer, schedule=LRSchedule(TrainConfig(lr=0.05, steps=20, warmup_steps=3)))
        for seed in range(1, 5):
            if with_fault and seed - 1 == fault_at:
                bad_step(guard, model, "grad_nan")
            healthy_step(guard, model, seed)
        actions = [o.decision.action for o in guard.flush()]
        assert actions == ["none"]
        return snapshot(model, optimizer)

    assert changed(run(False), run(True)) == []


@pytest.mark.parametrize("fault", [
    "loss_nan", "grad_nan",
    "nan_input",
])
def test_an_isolated_bad_step_is_skipped_and_training_goes_on(fault):
    torch.manual_seed(0)
    model = small_net().train()
    optimizer = OPTIMIZERS["sgd_fused"](model.parameters())
    schedule = LRSchedule(TrainConfig(lr=0.05, steps=20, warmup_steps=3))
    guard = Guard(model, optimizer, schedule=schedule)
    for seed in (1, 2):
        healthy_step(guard, model, seed)
    bad_step(guard, model, fault)
    before = snapshot(model, optimizer)
    outcomes = healthy_step(guard, model, 3) + guard.flush()

    assert [o.decision.action for o in outcomes] == ["skip", "none"]
    assert schedule.applied.item() == 3  # nothing rolled back: the two healthy steps and this one
    moved = changed(before, snapshot(model, optimizer))
    assert any(path.startswith("/0/0.weight") for path in moved)


def test_the_loss_and_grad_nan_faults_are_seen_as_such():
    torch.manual_seed(0)
    model = small_net().train()
    guard = Guard(model, OPTIMIZERS["sgd_fused"](model.parameters()))
    healthy_step(guard, model, 1)
    bad_step(guard, model, "loss_nan")
    [loss_outcome] = bad_step(guard, model, "grad_nan")  # outcomes arrive one step late
    [grad_outcome] = healthy_step(guard, model, 2)
    assert loss_outcome.observation.nonfinite_components() == ["loss_box_reg"]
    assert math.isfinite(loss_outcome.observation.losses["loss_classifier"])
    assert grad_outcome.observation.kinds() == ["nonfinite_grad"]
    assert math.isfinite(grad_outcome.observation.total_loss)


# ---------------------------------------------------------------------------------------------------
# 6. fp16 semantics: the GradScaler's overflow is the scaler's business, a NaN loss is an incident


def cpu_grad_scaler():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    except Exception as exc:  # an older torch has no CPU GradScaler
        pytest.skip(f"torch.amp.GradScaler('cpu') is unavailable: {exc}")
    if not scaler.is_enabled():
        pytest.skip("torch.amp.GradScaler('cpu') is disabled in this build")
    return scaler


@pytest.mark.parametrize("optimizer_name", ["sgd_fused", "adam"])
def test_grad_scaler_overflow_backs_off_and_is_not_an_incident(optimizer_name):
    torch.manual_seed(0)
    model = small_net().train()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    scaler = cpu_grad_scaler()
    guard = Guard(model, optimizer, scaler=scaler)
    healthy_step(guard, model, 1)
    scale = scaler.get_scale()
    before = snapshot(model, optimizer)

    images, labels = batch(2)  # a finite loss whose scaled gradients overflow float32
    guard.step({name: value * 1e36 for name, value in two_losses(model, images, labels).items()})

    assert scaler.get_scale() == scale * scaler.get_backoff_factor()
    assert changed(before, snapshot(model, optimizer)) == []
    [overflow] = guard.flush()
    obs = overflow.observation
    assert obs.scale_overflow and not obs.applied
    assert not obs.nonfinite_loss and not obs.nonfinite_grad and obs.kinds() == []
    assert overflow.decision.action == "none"
    assert obs.loss_scale == scale * scaler.get_backoff_factor()
    assert guard.incidents.summary()["incidents"] == 0

    # a NaN loss is an incident, and the scaler is left as it was (it did not overflow)
    scale = scaler.get_scale()
    tracker = scaler._growth_tracker.clone()
    bad_step(guard, model, "loss_nan")
    assert scaler.get_scale() == scale
    assert torch.equal(scaler._growth_tracker, tracker)
    [nan] = guard.flush()
    assert nan.observation.nonfinite_loss and not nan.observation.scale_overflow
    assert nan.decision.action == "skip"
    assert guard.incidents.summary()["incidents_by_kind"] == {"nonfinite_loss": 1}

    # and training goes on: the next healthy step is applied
    healthy_step(guard, model, 3)
    [healthy] = guard.flush()
    assert healthy.observation.applied and healthy.decision.action == "none"


# ---------------------------------------------------------------------------------------------------
# 7. A batch the model refused


def test_skip_batch_puts_batchnorm_back_and_logs_a_model_error(tmp_path):
    torch.manual_seed(0)
    model = small_net().train()
    optimizer = OPTIMIZERS["sgd_fused"](model.parameters())
    guard = Guard(model, optimizer, incident_log=IncidentLog(tmp_path / "incidents.jsonl"))
    healthy_step(guard, model, 1)
    before = snapshot(model, optimizer)

    images, labels = batch(2)
    two_losses(model, images, labels)["loss_classifier"].backward()  # the forward wrote BN, then it raised
    assert changed(before, snapshot(model, optimizer)), "the forward should have moved BatchNorm"
    outcomes = guard.skip_batch(ValueError("degenerate box\nsecond line"), image_ids=(5,), annotation_ids=(50,))

    assert changed(before, snapshot(model, optimizer)) == []
    assert all(p.grad is None for p in model.parameters())
    assert [o.decision.action for o in outcomes] == ["none"]  # the step before, read one step late
    [refused] = guard.flush()
    assert refused.observation.model_error == "ValueError: degenerate box"
    assert refused.observation.image_ids == (5,) and not refused.observation.applied
    assert refused.decision.kinds == ("model_error",) and refused.decision.action == "skip"
    [line] = read_incidents(tmp_path)
    assert line["kind"] == "model_error" and line["image_ids"] == [5] and line["annotation_ids"] == [50]

    healthy_step(guard, model, 3)  # the next batch trains normally
    [next_outcome] = guard.flush()
    assert next_outcome.observation.applied and next_outcome.observation.step == 2


def test_the_loss_scaler_adapter_reads_the_pinned_grad_scaler_right():
    """`LossScaler` is the one place that touches GradScaler's private state; this pins what it reads
    and writes against the installed torch: found_inf after unscale_, back-off on an overflow, and
    nothing moved on a guard incident."""
    from nanguard.backends.torch.devicestate import LossScaler

    torch.manual_seed(0)
    model = small_net().train()
    optimizer = OPTIMIZERS["sgd_fused"](model.parameters())
    scaler = cpu_grad_scaler()
    adapter = LossScaler(scaler, optimizer)
    images, labels = batch(1)
    adapter.backward(two_losses(model, images, labels)["loss_classifier"])
    assert not bool(adapter.found_inf(torch.device("cpu")))
    scale = scaler.get_scale()
    adapter.update_unless(torch.tensor(True))  # a guard incident: the scale and its tracker stay
    assert scaler.get_scale() == scale and scaler._growth_tracker.item() == 0
    optimizer.zero_grad()
    adapter.backward(two_losses(model, images, labels)["loss_classifier"] * 1e36)  # overflows float32
    assert bool(adapter.found_inf(torch.device("cpu")))
    assert adapter.update_unless(torch.tensor(False)).item() == scale * scaler.get_backoff_factor()


def test_a_model_without_batchnorm_is_guarded_too():
    """No BatchNorm: no buffers to save and put back (torch's foreach ops refuse an empty list)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = Guard(model, optimizer)
    images, labels = batch(0)
    guard.step({"loss": nn.functional.cross_entropy(model(images), labels)})
    before = snapshot(model, optimizer)
    guard.step({"loss": nn.functional.cross_entropy(model(images * float("nan")), labels)})
    [bad] = guard.flush()
    assert bad.decision.action == "skip" and not bad.observation.applied
    assert changed(before, snapshot(model, optimizer)) == []


def test_the_ranks_apart_are_those_off_the_majority_digest():
    """A drifted rank 0 is named alone (not every other rank); a NaN digest is always apart; a tie takes
    the lowest rank's camp as the reference. The same rule for the end-of-run SHA-256 digests."""
    from nanguard.backends.torch.distributed import apart_from_majority
    from nanguard.run.backend import ranks_apart

    def apart(*digests: float) -> list[int]:
        return torch.nonzero(apart_from_majority(torch.tensor(digests, dtype=torch.float64))).flatten().tolist()

    assert apart(1.0, 1.0, 1.0) == []
    assert apart(7.0, 1.0, 1.0, 1.0) == [0]
    assert apart(1.0, 1.0, 7.0, 1.0) == [2]
    assert apart(1.0, NAN, 1.0) == [1]
    assert apart(NAN, NAN) == [0, 1]
    assert apart(1.0, 7.0) == [1] and apart(1.0, 1.0, 7.0, 7.0) == [2, 3]
    assert ranks_apart(["b", "a", "a", "a"]) == [0] and ranks_apart(["a", "b"]) == [1]
    assert ranks_apart(["a", "a"]) == [] and ranks_apart(["a", "b", "b", "c"]) == [0, 3]
