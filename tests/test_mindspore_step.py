"""`GuardedTrainStep`: the guard inside one MindSpore train step, in graph mode and PyNative, on a user's
own (non-detection) network. A skipped step must leave every Parameter bit-identical: weights, the
optimizer's moments and step counter, BatchNorm's moving statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="mindspore is not installed (make install installs it)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mindspore import Tensor, nn, ops  # noqa: E402

from nanguard.backends.mindspore import DeviceSpikes, GuardedTrainStep, StepReader  # noqa: E402
from nanguard.guard import GuardConfig, SpikeDetector  # noqa: E402

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


@pytest.fixture(params=sorted(MODES))
def mode(request):
    ms.set_context(mode=MODES[request.param], device_target="CPU")
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


class TwoLosses(nn.Cell):
    """A small regression network with BatchNorm; returns (mse, 0.1 * mean |output| * poison): a NaN
    `poison` makes only the second loss component non-finite."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.SequentialCell([nn.Dense(4, 8), nn.BatchNorm1d(8), nn.ReLU()])
        self.head = nn.Dense(8, 2)

    def construct(self, x, y, poison):
        out = self.head(self.body(x))
        return ((out - y) ** 2).mean(), ops.abs(out).mean() * 0.1 * poison


OPTIMIZERS = {
    "momentum": lambda params: nn.Momentum(params, learning_rate=0.05, momentum=0.9),
    "adamw": lambda params: nn.AdamWeightDecay(params, learning_rate=1e-2, weight_decay=0.01),
    "adam": lambda params: nn.Adam(params, learning_rate=1e-2),
}


def build(optimizer: str, config: GuardConfig | None = None, **kwargs):
    ms.set_seed(0)
    net = TwoLosses()
    opt = OPTIMIZERS[optimizer](net.trainable_params())
    return net, opt, GuardedTrainStep(net, opt, config, **kwargs)


def batch(rng, *, nan_input=False, poison=1.0, target_scale=1.0):
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32) * np.float32(target_scale)
    if nan_input:
        x[3, 1] = np.nan
    return Tensor(x), Tensor(y), Tensor(np.float32(poison))


def state(net, opt) -> dict[str, np.ndarray]:
    """Every Parameter of the network and the optimizer (moments, global step, BatchNorm statistics)."""
    found = {f"net.{n}": p.asnumpy().copy() for n, p in net.parameters_and_names()}
    found.update({f"opt.{n}": p.asnumpy().copy() for n, p in opt.parameters_and_names()})
    return found


def changed(before, after) -> list[str]:
    return sorted(k for k in before if not np.array_equal(before[k], after[k], equal_nan=True))


@pytest.mark.parametrize("skip_with", ["branch", "select"])
@pytest.mark.parametrize("optimizer", ["momentum", "adamw"])
@pytest.mark.parametrize("fault", ["nan_input", "nan_loss_component"])
def test_a_skipped_step_leaves_every_parameter_bit_identical(mode, optimizer, fault, skip_with):
    net, opt, step = build(optimizer, skip_with=skip_with)
    rng = np.random.default_rng(0)
    reader = StepReader(("mse", "size"))
    seen = []
    for _ in range(4):  # healthy steps: moments, BatchNorm statistics and the step counter move
        seen += reader.push(len(seen), *step(*batch(rng)))
    before = state(net, opt)
    bad = batch(rng, nan_input=True) if fault == "nan_input" else batch(rng, poison=math.nan)
    components, vector = step(*bad)
    assert changed(before, state(net, opt)) == []
    seen += reader.push(4, components, vector)
    seen += reader.push(5, *step(*batch(rng)))  # and the next healthy step trains on
    after = state(net, opt)
    assert "opt.global_step" in changed(before, after) and "net.head.weight" in changed(before, after)
    assert "net.body.1.moving_mean" in changed(before, after)
    seen += reader.flush()
    assert [o.applied for o in seen] == [True] * 4 + [False, True]
    bad_step = seen[4]
    if fault == "nan_input":  # the NaN reaches the gradients and BatchNorm's statistics (ReLU maps NaN to 0)
        assert bad_step.nonfinite_grad and bad_step.nonfinite_buffer
    else:
        assert bad_step.nonfinite_loss and math.isnan(bad_step.losses["size"]) and math.isfinite(bad_step.losses["mse"])
    assert all(np.isfinite(v).all() for v in state(net, opt).values())


def test_without_the_guard_the_same_nan_input_poisons_the_network():
    """The counterpart: MindSpore's plain step (value_and_grad + optimizer) on the same NaN batch."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net, opt, _ = build("momentum")
    grad_fn = ms.value_and_grad(lambda *a: sum(net(*a)), None, opt.parameters)
    _, grads = grad_fn(*batch(np.random.default_rng(0), nan_input=True))
    opt(grads)
    poisoned = [k for k, v in state(net, opt).items() if not np.isfinite(v).all()]
    assert "net.body.1.moving_mean" in poisoned and "net.body.0.weight" in poisoned


def test_checks_false_is_the_plain_step_it_reports_but_never_stops_a_nan(mode):
    """`checks=False` (guard.enabled=false): the same numbers as the guarded step on a healthy batch,
    then the NaN batch goes into the weights, every flag 0, `applied` 1."""
    guarded_net, guarded_opt, guarded = build("momentum", GuardConfig(clip_norm=1.0))
    net, opt, plain = build("momentum", GuardConfig(clip_norm=1.0), checks=False)
    assert len(plain.shadow) == 0
    assert sorted(plain._state_parameters()) == sorted(guarded._state_parameters())  # one checkpoint layout
    rng = np.random.default_rng(0)
    healthy = batch(rng)
    (ga, gv), (pa, pv) = guarded(*healthy), plain(*healthy)
    np.testing.assert_array_equal(pa.asnumpy(), ga.asnumpy())
    np.testing.assert_allclose(pv.asnumpy()[:3], gv.asnumpy()[:3], rtol=1e-6)  # loss, gradient norm, lr
    np.testing.assert_array_equal(state(net, opt)["net.head.weight"], state(guarded_net, guarded_opt)["net.head.weight"])
    reader = StepReader(("mse", "l1"))
    reader.push(1, *plain(*batch(rng, nan_input=True)))
    [observation] = reader.flush()
    assert math.isnan(observation.grad_norm) and observation.applied and observation.kinds() == []
    assert not np.isfinite(state(net, opt)["net.body.0.weight"]).all()


def test_param_check_every_moves_the_weight_check_out_of_the_step(mode):
    """`param_check_every=N`: the step's weight flags read "not checked"; `check_weights(vector)` sets
    them from the weights after that step's update, and finds a weight corrupted between steps (the
    same numbers otherwise as the step that checks every time)."""
    config = GuardConfig(param_abs_max=100.0)
    _, _, every = build("momentum", config)
    net, _, grid = build("momentum", config, param_check_every=5)
    rng = np.random.default_rng(0)
    healthy = batch(rng)
    (ea, ev), (ga, gv) = every(*healthy), grid(*healthy)
    np.testing.assert_array_equal(ga.asnumpy(), ea.asnumpy())
    reader = StepReader(("mse", "l1"))
    reader.push(0, ga, gv)
    [unchecked] = reader.flush()
    assert unchecked.nonfinite_param is None and unchecked.wild_param is None and unchecked.applied
    reader.push(0, ga, grid.check_weights(gv))
    [checked] = reader.flush()
    assert checked.nonfinite_param is False and checked.wild_param is False
    np.testing.assert_array_equal(grid.check_weights(gv).asnumpy(), ev.asnumpy())  # the in-step flags
    weight = net.head.weight.asnumpy().copy()
    weight[0, 0] = 1e6  # a flipped exponent bit, say
    net.head.weight.set_data(Tensor(weight))
    reader.push(1, *grid(*batch(rng)))
    [missed] = reader.flush()
    assert missed.wild_param is None and missed.kinds() == []
    components, vector = grid(*batch(rng))
    reader.push(2, components, grid.check_weights(vector))
    [found] = reader.flush()
    assert found.wild_param and found.kinds() == ["wild_param"]
    with pytest.raises(ValueError, match="param_check_every"):
        build("momentum", config, param_check_every=0)


def test_graph_mode_branches_pynative_selects_and_both_train_the_same(mode):
    """skip_with's default: the graph's own branch in graph mode, select in PyNative (where an `if` on a
    tensor would wait). Healthy steps give the same numbers and weights either way."""
    net_a, _, default = build("adamw")
    net_b, _, other = build("adamw", skip_with="select" if mode == "graph" else "branch")
    assert default.branch == (mode == "graph") and other.branch != default.branch
    assert len(default.shadow) < len(other.shadow) if default.branch else len(default.shadow) > len(other.shadow)
    rng = np.random.default_rng(1)
    for _ in range(3):
        inputs = batch(rng)
        (ca, va), (cb, vb) = default(*inputs), other(*inputs)
        np.testing.assert_array_equal(ca.asnumpy(), cb.asnumpy())
        np.testing.assert_array_equal(va.asnumpy(), vb.asnumpy())
    for (name, a), (_, b) in zip(net_a.parameters_and_names(), net_b.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)
    with pytest.raises(ValueError, match="skip_with"):
        build("adamw", skip_with="mask")


def test_graph_mode_and_pynative_train_the_same_numbers():
    runs = {}
    for name in ("graph", "pynative"):
        ms.set_context(mode=MODES[name])
        net, opt, step = build("adam")
        rng = np.random.default_rng(1)
        vectors = [step(*batch(rng, nan_input=i == 3))[1].asnumpy() for i in range(6)]
        runs[name] = (vectors, state(net, opt))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    (gv, gs), (pv, ps) = runs["graph"], runs["pynative"]
    np.testing.assert_allclose(np.array(gv), np.array(pv), rtol=1e-5, equal_nan=True)
    for key in gs:
        np.testing.assert_allclose(gs[key], ps[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_a_gradient_blow_up_after_three_steps_is_a_spike_and_not_applied(mode):
    net, opt, step = build("momentum", GuardConfig(clip_norm=0.0))
    rng = np.random.default_rng(2)
    reader = StepReader(("mse", "size"))
    seen = []
    for i in range(4):
        seen += reader.push(i, *step(*batch(rng)))
    before = state(net, opt)
    seen += reader.push(4, *step(*batch(rng, target_scale=1e4)))  # the loss x1e8
    assert changed(before, state(net, opt)) == []
    seen += reader.flush()
    assert seen[4].loss_spike and seen[4].grad_spike and not seen[4].applied


def test_the_clip_runs_after_the_check_and_bounds_the_update(mode):
    net, opt, step = build("momentum", GuardConfig(clip_norm=0.5))
    before = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
    reader = StepReader(("mse", "size"))
    reader.push(0, *step(*batch(np.random.default_rng(3), target_scale=30.0)))
    [observation] = reader.flush()
    assert observation.grad_norm > 5.0  # the norm reported is the one checked, before the clip
    moved = math.sqrt(sum(float(((p.asnumpy() - before[p.name]) ** 2).sum()) for p in net.trainable_params()))
    assert moved == pytest.approx(0.05 * 0.5, rel=1e-3)  # momentum's first update: lr * the clipped gradient


def test_fp16_style_overflow_halves_the_scale_without_an_incident(mode):
    net, opt, step = build("momentum", loss_scale=2.0 ** 16, scale_window=2)
    rng = np.random.default_rng(4)
    reader = StepReader(("mse", "size"))
    seen = []
    seen += reader.push(0, *step(*batch(rng)))
    seen += reader.push(1, *step(*batch(rng)))  # two good steps: the scale doubles
    before = state(net, opt)
    # a finite loss whose scaled value (x 2**17) overflows float32: the overflow of fp16 training
    seen += reader.push(2, *step(*batch(rng, poison=1e35)))
    assert changed(before, state(net, opt)) == []
    seen += reader.push(3, *step(*batch(rng, poison=math.nan)))  # a NaN loss: a guard incident
    seen += reader.flush()
    assert [o.loss_scale for o in seen] == [2.0 ** 16, 2.0 ** 17, 2.0 ** 16, 2.0 ** 16]
    overflow, incident = seen[2], seen[3]
    assert overflow.scale_overflow and not overflow.applied and not overflow.nonfinite_grad
    assert incident.nonfinite_loss and not incident.applied


def test_the_step_reader_is_one_step_late():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    _, _, step = build("momentum")
    reader = StepReader(("mse", "size"))
    rng = np.random.default_rng(5)
    assert reader.push(0, *step(*batch(rng))) == []
    [first] = reader.push(1, *step(*batch(rng)))
    assert first.step == 0 and first.lr == pytest.approx(0.05) and set(first.losses) == {"mse", "size"}
    [second] = reader.flush()
    assert second.step == 1 and reader.flush() == []


@settings(max_examples=15, deadline=None)
@given(values=st.lists(st.one_of(st.floats(0.5, 2.0), st.floats(0.5, 2.0), st.floats(5.0, 1e6),
                                 st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0])),
                       min_size=1, max_size=30),
       window=st.integers(1, 8), min_history_fraction=st.floats(0.0, 1.0),
       early=st.sampled_from([(0, 10.0), (3, 10.0), (2, 3.0)]))
def test_device_spikes_flag_exactly_as_the_reference(values, window, min_history_fraction, early):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    settings_ = dict(window=window, min_history=max(1, round(min_history_fraction * window)), threshold=3.0,
                     min_ratio=1.5, early_history=early[0], early_ratio=early[1])
    reference, device = SpikeDetector(**settings_), DeviceSpikes("test", **settings_)
    for i, value in enumerate(values):
        as_float32 = float(np.float32(value))
        assert bool(device(Tensor(np.float32(value)))) == reference.update(as_float32), f"value {i} of {values}"
    accepted = [v for v in device.values.asnumpy().tolist() if not math.isnan(v)]
    assert sorted(accepted) == sorted(reference.history)


class OneLoss(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Dense(4, 1)

    def construct(self, x):
        return (self.dense(x) ** 2).mean()


def test_a_single_loss_tensor_is_one_component_and_names_are_checked():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = OneLoss()
    step = GuardedTrainStep(net, nn.Momentum(net.trainable_params(), 0.01, 0.9))
    x = Tensor(np.ones((4, 4), np.float32))
    reader = StepReader()
    reader.push(0, *step(x))
    [observation] = reader.flush()
    assert list(observation.losses) == ["loss_0"] and observation.applied
    wrong = StepReader(("a", "b"))
    with pytest.raises(ValueError, match="names 2 loss components"):  # at once, not one step late
        wrong.push(1, *step(x))
    with pytest.raises(TypeError, match="mindspore.nn.Optimizer"):
        GuardedTrainStep(net, "sgd")
    with pytest.raises(ValueError, match="loss_scale"):
        GuardedTrainStep(net, nn.Momentum(net.trainable_params(), 0.01, 0.9), loss_scale=0.0)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_state_loaded_after_the_compile_is_the_state_the_next_step_runs_from(mode, optimizer):
    """A rollback (or a replay) loads a state into a compiled step: the next step must run from exactly
    it, optimizer moments included (Parameter.set_data left the graph on the old moments' memory)."""
    rng = np.random.default_rng(0)
    _, _, step = build(optimizer)
    for _ in range(3):
        step(*batch(rng))
    inputs = batch(rng)
    saved = step.state_arrays()
    step(*inputs)
    first = step.state_arrays()
    step(*batch(rng))  # the state moves on; then back
    step.load_state_arrays(saved)
    assert all(np.array_equal(saved[k], v, equal_nan=True) for k, v in step.state_arrays().items())
    step(*inputs)
    again = step.state_arrays()
    assert [k for k in first if not np.array_equal(first[k], again[k], equal_nan=True)] == []


def test_the_readme_example_loop_runs_as_written_and_prints_no_mindspore_warning():
    """examples/mindspore_guarded_loop.py, as a user runs it: step 5 skipped, and nothing on stderr from
    the guarded step's compile (an unused tuple item made MindSpore print "Some side effect nodes were
    eliminated by mistake")."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "mindspore_guarded_loop.py"), "--steps", "7"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 5: skipped" in done.stdout and "1 step(s) skipped; weights finite: True" in done.stdout
    assert "side effect" not in done.stderr and "eliminated" not in done.stderr, done.stderr[-2000:]
