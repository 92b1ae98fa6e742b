"""The guard adds no host synchronisation, and its device spike detector is the reference's twin.

On the CPU a sync shows up as an aten op that must hand a value to the host: `_local_scalar_dense`
(`.item()`, `float(t)`, `if t:`), `nonzero` (boolean indexing), `is_nonzero`, `equal`. A dispatch mode
counts them over N guarded steps and over the same N steps unguarded; the model and the optimizer may
have some of their own, the guard must add none. On CUDA, `torch.cuda.set_sync_debug_mode("error")`
raises on any sync inside `guard.step`.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from nanguard.backends.torch.devicestate import DeviceSpikeDetector, LRSchedule
from nanguard.backends.torch.guard import Guard
from nanguard.backends.torch.step import PlainStep
from nanguard.config import GuardConfig, TrainConfig
from nanguard.guard.spikes import SpikeDetector
from torch_helpers import small_net, two_losses

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select"})
# indexing with a boolean mask has a data-dependent shape: on CUDA it runs nonzero (a sync) inside
MASK_INDEXED_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


class CountSyncs(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device (by overload packet name)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name in MASK_INDEXED_OPS and len(args) > 1 and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1]
                if index is not None):
            self.counts[f"{name}[bool mask]"] += 1
        return func(*args, **(kwargs or {}))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator))
            for _ in range(n)]


OPTIMIZERS = {
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True),
    "sgd_foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
}

STEPS = 5
# the spike detectors judge from the third step on; parameters are checked every other step
GUARD_CONFIG = GuardConfig(spike_window=4, spike_min_history=2, param_check_every=2)


def nan_losses(losses):
    return {name: value * float("nan") for name, value in losses.items()}


def plain_step(model, optimizer, *, config, schedule, scaler):
    """What users run today (backward, clip, step), with the same clipping as the guard."""
    return PlainStep(model, optimizer, clip_norm=config.clip_norm, schedule=schedule, scaler=scaler)


def count_syncs(step_class, optimizer_name: str, *, bad_at: int | None = None, with_schedule: bool,
                extra=None, steps: int = STEPS, scaler: bool = False, replay: bool = False) -> Counter[str]:
    """Sync ops seen over `steps` steps (every step but the first reads the previous observation),
    then a flush."""
    torch.manual_seed(0)
    model = small_net().train()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    schedule = LRSchedule(TrainConfig(lr=0.05, steps=20, warmup_steps=2)) if with_schedule else None
    grad_scaler = torch.amp.GradScaler("cpu") if scaler else None
    guard = step_class(model, optimizer, config=GUARD_CONFIG, schedule=schedule, scaler=grad_scaler)
    data = batches(steps)
    outcomes = []
    with CountSyncs() as mode:
        for i, (images, labels) in enumerate(data):
            losses = two_losses(model, images, labels)
            explain = dict(replay=lambda index, x=images, y=labels: two_losses(model, x[index], y[index]),
                           ids=[f"{i}/{j}" for j in range(len(images))]) if replay else {}
            outcomes += guard.step(nan_losses(losses) if i == bad_at else losses, **explain)
            if extra is not None:
                extra(losses)
        outcomes += guard.flush()
    if step_class is plain_step:
        return mode.counts
    assert [o.observation.step for o in outcomes] == list(range(steps))
    if bad_at is not None:  # the masked path ran
        assert not outcomes[bad_at].observation.applied and outcomes[bad_at].observation.nonfinite_loss
    return mode.counts


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_guarded_steps_add_no_host_sync(optimizer_name):
    unguarded = {s: count_syncs(plain_step, optimizer_name, with_schedule=s) for s in (True, False)}
    assert count_syncs(Guard, optimizer_name, with_schedule=True) == unguarded[True]
    for with_schedule in (True, False):  # with a masked step among them
        guarded = count_syncs(Guard, optimizer_name, with_schedule=with_schedule, bad_at=3)
        assert guarded == unguarded[with_schedule], f"schedule={with_schedule}"


def test_fused_sgd_guarded_steps_make_no_sync_at_all():
    """With a fused optimizer nothing in the step needs the host: zero, not merely "no more"."""
    assert count_syncs(Guard, "sgd_fused", with_schedule=True) == Counter()
    assert count_syncs(Guard, "sgd_fused", with_schedule=False, bad_at=2) == Counter()


def test_passing_replay_to_explain_costs_no_sync_on_healthy_steps():
    """guard.step(losses, replay=fn, ids=ids) only keeps references: no sync, no copy of the batch."""
    assert count_syncs(Guard, "sgd_fused", with_schedule=True, replay=True) == Counter()


def test_the_sync_counter_sees_a_syncing_loop():
    """The test above can fail: a loop that reads the loss on the host every step is counted."""
    quiet = count_syncs(Guard, "sgd_fused", with_schedule=True)
    item = count_syncs(Guard, "sgd_fused", with_schedule=True,
                       extra=lambda losses: losses["loss_classifier"].item())
    branch = count_syncs(Guard, "sgd_fused", with_schedule=True,
                         extra=lambda losses: bool(torch.isfinite(losses["loss_classifier"])))
    mask = count_syncs(Guard, "sgd_fused", with_schedule=True,
                       extra=lambda losses: losses["loss_classifier"].reshape(1)[
                           torch.isfinite(losses["loss_classifier"]).reshape(1)])
    assert item["_local_scalar_dense"] == quiet["_local_scalar_dense"] + STEPS
    assert sum(branch.values()) >= sum(quiet.values()) + STEPS
    assert mask["index[bool mask]"] == quiet["index[bool mask]"] + STEPS


@pytest.mark.parametrize("optimizer_name", ["sgd_fused", "adam"])
def test_guarded_steps_with_a_grad_scaler_add_no_host_sync(optimizer_name):
    try:
        torch.amp.GradScaler("cpu")
    except Exception as exc:
        pytest.skip(f"torch.amp.GradScaler('cpu') is unavailable: {exc}")
    without = count_syncs(Guard, optimizer_name, with_schedule=True)
    assert count_syncs(Guard, optimizer_name, with_schedule=True, scaler=True) == without
    assert count_syncs(Guard, optimizer_name, with_schedule=True, scaler=True, bad_at=2) == without


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer_name", ["sgd_fused", "adamw_fused"])
def test_guarded_steps_on_cuda_never_sync(optimizer_name):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = small_net().to(device).train()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    config = GuardConfig(spike_window=4, spike_min_history=2, spike_threshold=1e6, param_check_every=2)
    guard = Guard(model, optimizer, config=config,
                  schedule=LRSchedule(TrainConfig(lr=0.05, steps=20, warmup_steps=2), device=device))
    data = [(images.to(device), labels.to(device)) for images, labels in batches(8)]
    for images, labels in data[:2]:  # warm up: lazy init, the first observation's pinned buffer
        guard.step(two_losses(model, images, labels))
    torch.cuda.synchronize()
    outcomes = []
    for i, (images, labels) in enumerate(data[2:]):
        losses = two_losses(model, images, labels)
        torch.cuda.set_sync_debug_mode("error")
        try:
            outcomes += guard.step(nan_losses(losses) if i == 2 else losses)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    outcomes += guard.flush()
    actions = {o.observation.step: o.decision.action for o in outcomes}
    assert actions == {1: "none", 2: "none", 3: "none", 4: "skip", 5: "none", 6: "none", 7: "none"}


# ---------------------------------------------------------------------------------------------------
# 3. DeviceSpikeDetector == SpikeDetector


def series():
    normal = st.floats(min_value=0.5, max_value=2.0)
    spike = st.floats(min_value=5.0, max_value=1e6)
    special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1.0, 1e30])
    value = st.one_of(normal, normal, normal, normal, spike, special)
    flat = st.lists(st.sampled_from([1.0, 1.0, 1.0 + 1e-6, 2.0, 4.1, math.nan]), min_size=1, max_size=40)
    return st.one_of(st.lists(value, min_size=1, max_size=80), flat)


@settings(max_examples=60, deadline=None)
@given(values=series(),
       window=st.integers(min_value=1, max_value=12),
       min_history_fraction=st.floats(min_value=0.0, max_value=1.0),
       threshold=st.sampled_from([1.0, 3.0, 10.0]),
       min_ratio=st.sampled_from([0.0, 1.5, 2.0]),
       early=st.sampled_from([(0, 10.0), (1, 10.0), (3, 10.0), (2, 3.0)]))
def test_device_spike_detector_flags_exactly_as_the_reference(values, window, min_history_fraction,
                                                              threshold, min_ratio, early):
    min_history = max(1, round(min_history_fraction * window))
    settings_ = dict(window=window, min_history=min_history, threshold=threshold, min_ratio=min_ratio,
                     early_history=early[0], early_ratio=early[1])
    reference = SpikeDetector(**settings_)
    device = DeviceSpikeDetector(**settings_)
    for i, value in enumerate(values):
        as_float32 = torch.tensor(value, dtype=torch.float32)  # a loss or a grad norm, as the guard has it
        expected = reference.update(as_float32.item())
        got = device.update(as_float32)
        assert got.dtype == torch.bool and got.shape == ()
        assert bool(got) == expected, f"value {i} ({value}) of {values}"
    accepted = [v for v in device.values.tolist() if not math.isnan(v)]
    assert sorted(accepted) == sorted(reference.history)


def test_device_spike_detector_state_round_trips():
    device = DeviceSpikeDetector(window=5, min_history=3)
    for value in (1.0, 1.1, 0.9, 1.0):
        device.update(torch.tensor(value))
    state = device.state_dict()
    twin = DeviceSpikeDetector(window=5, min_history=3)
    twin.load_state_dict(state)
    assert bool(twin.update(torch.tensor(50.0))) and bool(device.update(torch.tensor(50.0)))
    assert not bool(twin.update(torch.tensor(1.05)))
