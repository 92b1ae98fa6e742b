"""The guard for MindSpore, inside one compiled train step: `GuardedTrainStep`.

    step = GuardedTrainStep(network_with_losses, optimizer, GuardConfig())
    for inputs in batches:
        components, vector = step(*inputs)            # one guarded step (graph mode or PyNative)
        for observation in reader.push(step_no, components, vector): ...   # the previous step's, read late

`network_with_losses(*inputs)` returns a tuple of scalar loss components; their sum is trained. In one
cell, compiled whole in graph mode, with nothing that waits for Python:

  save    the BatchNorm moving statistics the forward will write (with skip_with="select": every
          Parameter the step may write: weights, those statistics, the optimizer's moments and step)
          into a shadow copy
  check   each loss component, every gradient (unscaled), the global gradient norm, the BatchNorm
          statistics this forward wrote, loss and gradient-norm spikes (the rule of
          `nanguard.guard.spikes`, on the device), and after the update the weights themselves (in the
          step, or with `param_check_every=N` by `check_weights` every N steps: see the class)
  apply   clip by the global norm (after the check: a NaN norm would turn every clipped gradient into
          NaN), the optimizer's update unless the step is bad, then every saved Parameter selected back
          from its shadow where the step is bad: a skipped step leaves weights, moments, BatchNorm
          statistics and the optimizer's step counter (and so a dynamic learning rate) bit-identical,
          for any MindSpore optimizer
  send    the loss components and the step's numbers (`nanguard.guard.STEP_FIELDS`) as outputs, so that
          no event is lost in sink mode; the host reads them one step late (`StepReader`)

`TrainOneStepWithLossScaleCell` is the cell this replaces: it skips an overflowed step on Ascend and GPU
only, not on CPU; MindSpore's `clip_by_global_norm` passes NaN gradients through when the norm is NaN.
With `loss_scale=` (fp16), an overflow is the scaler's business: it halves the scale and the step is
skipped without an incident; a guard incident leaves the scale as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from nanguard.guard import STEP_FIELDS, GuardConfig, Observation, step_vector
from nanguard.guard.host import Mailbox
from nanguard.guard.spikes import MAD_TO_STD

_FIELD = {name: i for i, name in enumerate(STEP_FIELDS)}
_HYPER_MAP = ops.HyperMap()


class DeviceSpikes(nn.Cell):
    """The device mirror of `nanguard.guard.spikes.SpikeDetector` (same algorithm, same defaults).

    The window is a ring buffer of the last `window` accepted values; empty slots are NaN. The lower
    median of the accepted values is the ((count - 1) // 2)-th of them sorted, with empty slots sorted
    last (as +inf). float64, so the bounds agree with the pure-Python reference.
    """

    def __init__(self, name: str, window: int = 50, min_history: int = 20, threshold: float = 10.0,
                 min_ratio: float = 2.0, rel_eps: float = 1e-3, early_history: int = 3,
                 early_ratio: float = 10.0) -> None:
        super().__init__()
        if window < 1 or not 1 <= min_history <= window:
            raise ValueError(f"need 1 <= min_history <= window, got {min_history=} {window=}")
        self.window, self.min_history = int(window), int(min_history)
        self.threshold, self.min_ratio, self.rel_eps = float(threshold), float(min_ratio), float(rel_eps)
        self.early_history, self.early_ratio = int(early_history), float(early_ratio)
        self.values = Parameter(Tensor(np.full(self.window, np.nan), ms.float64), name=f"{name}.values",
                                requires_grad=False)
        self.next = Parameter(Tensor(0, ms.int32), name=f"{name}.next", requires_grad=False)
        self.count = Parameter(Tensor(0, ms.int32), name=f"{name}.count", requires_grad=False)
        self.slots = Tensor(np.arange(self.window), ms.int32)

    def construct(self, x: Tensor) -> Tensor:
        """Judge the scalar `x`; add it to the window unless it is non-finite or a spike. Returns a
        0-dim bool tensor."""
        x = ops.cast(x, ms.float64).reshape(())
        values, count = self.values, self.count
        finite = ops.isfinite(x)
        valid = ops.logical_not(ops.isnan(values))
        inf = ops.full_like(values, math.inf)
        middle = ops.maximum(count - 1, 0) // 2
        median = ops.sort(ops.select(valid, values, inf))[0][middle]
        mad = ops.sort(ops.select(valid, ops.abs(values - median), inf))[0][middle]
        scale = ops.maximum(mad, self.rel_eps * ops.abs(median))
        bound = ops.maximum(median + self.threshold * MAD_TO_STD * scale, self.min_ratio * median)
        learning = count < self.min_history
        spike = ops.logical_and(ops.logical_not(learning), x > bound)
        if self.early_history:  # a setting, not a tensor: decided when the cell is built
            early_bound = self.early_ratio * ops.select(valid, values, -inf).max()
            early = ops.logical_and(ops.logical_and(learning, count >= self.early_history), x > early_bound)
            spike = ops.logical_or(spike, early)
        spike = ops.logical_and(finite, spike)
        accept = ops.logical_and(finite, ops.logical_not(spike))
        slot = ops.logical_and(self.slots == self.next, accept)
        ops.assign(self.values, ops.select(slot, ops.full_like(values, 0) + x, values))
        ops.assign(self.next, ops.select(accept, (self.next + 1) % self.window, self.next))
        ops.assign(self.count, ops.select(accept, ops.minimum(count + 1, self.window), count))
        return spike


class _ScaledTotal(nn.Cell):
    """(sum of the loss components * scale, the components): the first is what is differentiated.
    `poison` (fault injection) multiplies the components."""

    def __init__(self, network: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, scale: Tensor, poison: Tensor, *inputs: Any) -> tuple[Tensor, Tensor]:
        losses = self.network(*inputs)
        if isinstance(losses, Tensor):  # one loss: one component
            losses = (losses,)
        components = ops.stack([ops.cast(loss, ms.float32).reshape(()) for loss in losses]) * poison
        return ops.cast(components.sum(), ms.float32) * scale, components


def _state_parameters(*cells: nn.Cell) -> list[Parameter]:
    """Every Parameter of the cells (weights, BatchNorm statistics, an optimizer's moments and step),
    each once."""
    seen: set[int] = set()
    found = []
    for cell in cells:
        for _, p in cell.parameters_and_names():
            if id(p) not in seen:
                seen.add(id(p))
                found.append(p)
    return found


class GuardedTrainStep(nn.Cell):
    """One guarded training step: the guarded counterpart of `TrainOneStepWithLossScaleCell`, on CPU
    too. See the module docstring.

    network:   a Cell whose construct(*inputs) returns a tuple (or list) of scalar loss components
    optimizer: any `nn.Optimizer` over the network's trainable parameters
    config:    `GuardConfig` (clip_norm, spike_*, param_abs_max); `GuardConfig()` by default
    loss_scale: None (fp32 / bf16) or the initial dynamic loss scale for fp16 (e.g. 2**16); the scale
               halves on an overflow and doubles after `scale_window` overflow-free steps

    fault_hooks: C > 0 adds what fault injection writes between steps (`loss_poison` [C], multiplied
               into the loss components; `grad_poison`, one scalar per weight, into its gradient)
    checks:    False builds the plain step (`guard.enabled=false`): value_and_grad, clip, the optimizer;
               no checks, no shadows, no masking; a NaN goes into the weights as in a plain loop. Its
               vector reports the loss, the gradient norm and the LR, no flags.
    param_check_every: 1 (default) checks the weights after every update, inside the step (sink mode
               included). N > 1 leaves that check out of the step (its flags read "not checked") and
               `check_weights(vector)`, a separate compiled cell, does it: call it on the steps you want
               checked, e.g. every N-th (the run does, and before a rollback snapshot). A bad weight is a
               corruption that no skip can undo, found within N steps; the step saves one reduction per
               weight tensor (the README's Numbers table has what that is worth).
    skip_with: how a bad step's update is left out. "branch" (the default in graph mode): the graph's
               own `if` around the optimizer, as `TrainOneStepWithLossScaleCell` does: compiled control
               flow, no Python; on a CPU the runtime reads the flag where it is. Only the BatchNorm
               statistics are saved and selected back. "select" (the default in PyNative, where an
               `if` on a tensor waits for it): the optimizer always runs and every state Parameter is
               saved before and selected back after, with no control flow at all. The same state
               either way; "branch" saves copying all state twice a step. Under a kernel-by-kernel runtime on GPU or Ascend the branch
               makes the launcher wait for the flag; "select" does not.

    Calling it returns (components: float32[C], vector: float64[len(STEP_FIELDS)]).
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, config: GuardConfig | None = None, *,
                 loss_scale: float | None = None, scale_window: int = 2000, fault_hooks: int = 0,
                 checks: bool = True, param_check_every: int = 1, skip_with: str | None = None) -> None:
        super().__init__(auto_prefix=False)
        if not isinstance(network, nn.Cell) or not isinstance(optimizer, nn.Optimizer):
            raise TypeError("GuardedTrainStep(network, optimizer): a mindspore.nn.Cell returning its loss "
                            f"components and a mindspore.nn.Optimizer, got {type(network).__name__} and "
                            f"{type(optimizer).__name__}")
        if loss_scale is not None and not (math.isfinite(loss_scale) and loss_scale >= 1) or scale_window < 1 \
                or param_check_every < 1:
            raise ValueError(f"need loss_scale >= 1 (or None), scale_window >= 1 and param_check_every >= 1, got "
                             f"{loss_scale=} {scale_window=} {param_check_every=}")
        if skip_with is None:
            skip_with = "branch" if ms.get_context("mode") == ms.GRAPH_MODE else "select"
        if skip_with not in ("branch", "select"):
            raise ValueError(f"skip_with: 'branch' or 'select', got {skip_with!r}")
        config = config or GuardConfig()
        self.network, self.optimizer = network, optimizer
        self.network.set_train()  # as TrainOneStepCell does: BatchNorm uses and updates batch statistics
        self.weights = optimizer.parameters
        self.clip_norm = float(config.clip_norm)
        self.param_abs_max = float(config.param_abs_max)
        self.scaled = _ScaledTotal(network)
        self.grad_fn = ops.value_and_grad(self.scaled, None, self.weights, has_aux=True)
        self.checks = bool(checks)
        self.weights_in_step = int(param_check_every) == 1
        # out of the step: its own small graph (auto_prefix=False: the weights keep their names)
        self.weight_check = _WeightCheck(self.weights, self.param_abs_max)
        # held by the plain step too: it gives the state Parameters the same names in both (a checkpoint
        # of an unguarded run loads into a guarded one and into `nanguard eval`)
        self.state = ms.ParameterTuple(_state_parameters(network, optimizer))
        in_network = {id(p) for p in network.get_parameters()}
        self.buffers = ms.ParameterTuple([p for p in self.state if not p.requires_grad and id(p) in in_network
                                          and p.dtype in (ms.float16, ms.float32, ms.float64, ms.bfloat16)])
        self.branch = skip_with == "branch"
        # what a skipped step must put back itself (with the branch, the optimizer never ran)
        self.saved = self.buffers if self.branch else self.state
        self.shadow = ms.ParameterTuple([Parameter(p.value().copy(), name=f"nanguard_shadow.{i}",
                                                   requires_grad=False) for i, p in enumerate(self.saved)
                                         if self.checks])
        self.loss_spikes = DeviceSpikes("nanguard_loss_spikes", **config.spike_settings())
        self.grad_spikes = DeviceSpikes("nanguard_grad_spikes", **config.spike_settings())
        self.scaling = loss_scale is not None
        self.scale = Parameter(Tensor(float(loss_scale or 1.0), ms.float32), name="nanguard_loss_scale",
                               requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="nanguard_good_steps", requires_grad=False)
        self.scale_window = int(scale_window)
        self.hyper_map = ops.HyperMap()
        self.fault_hooks = int(fault_hooks)
        self.loss_poison = Parameter(Tensor(np.ones(max(1, self.fault_hooks), np.float32)), name="nanguard_loss_poison",
                                     requires_grad=False)
        self.grad_poison = ms.ParameterTuple([
            Parameter(Tensor(1.0, ms.float32), name=f"nanguard_grad_poison.{i}", requires_grad=False)
            for i in range(len(self.weights) if self.fault_hooks else 0)])
        self.nan = Tensor(math.nan, ms.float64)
        self.false = Tensor(False, ms.bool_)
        self.one = Tensor(1.0, ms.float32)

    def construct(self, *inputs: Any) -> tuple[Tensor, Tensor]:
        if not self.checks:  # a setting, not a tensor: decided when the cell is built
            return self._plain(*inputs)
        saved = self.hyper_map(ops.assign, self.shadow, self.saved)
        scale = ops.depend(self.scale.value(), saved)
        poison = self.loss_poison.value() if self.fault_hooks else self.one
        # outputs[1], not `(_, components) = ...`: an unused tuple item of a call with side effects (the
        # BatchNorm statistics it writes) is an isolated node MindSpore drops with a warning ("Some side
        # effect nodes were eliminated by mistake"); only that item went, never the call
        outputs, grads = self.grad_fn(scale, poison, *inputs)
        components = outputs[1]
        if self.fault_hooks:
            grads = self.hyper_map(_scale_by, self.grad_poison, grads)
        if self.scaling:
            grads = self.hyper_map(ops.partial(_unscale, 1.0 / scale), grads)
        total = components.sum()
        # one number per gradient, then one check: a NaN or Inf anywhere makes the sum of squares
        # non-finite (so does a norm beyond float32's range, which no clip could rescue either)
        grad_norm = ops.sqrt(ops.stack(self.hyper_map(_square_sum, grads)).sum())
        nonfinite_loss = ops.logical_not(ops.isfinite(components).all())
        nonfinite_grad = ops.logical_not(ops.isfinite(grad_norm))
        nonfinite_buffer = ops.logical_not(_all_finite(self.buffers))
        overflow, scale_overflow = self.false, self.false
        if self.scaling:  # fp16 cannot tell an overflow from a NaN: the scaler's business, no incident
            overflow = nonfinite_grad
            scale_overflow = ops.logical_and(overflow, ops.logical_not(nonfinite_loss))
            nonfinite_grad = self.false
        loss_spike = self.loss_spikes(total)
        grad_spike = ops.logical_and(self.grad_spikes(grad_norm), ops.logical_not(overflow))
        incident = ops.logical_or(ops.logical_or(nonfinite_loss, nonfinite_grad),
                                  ops.logical_or(nonfinite_buffer, ops.logical_or(loss_spike, grad_spike)))
        skip = ops.logical_or(incident, scale_overflow)
        grads = self._clip(grads, grad_norm)  # a skipped step's coefficient does not matter
        lr = self._lr()
        if self.branch:  # a setting, not a tensor: which of the two graphs is built
            updated = self._update_unless(skip, grads)
        else:
            updated = self.optimizer(grads)  # put back below where the step is bad
        kept = self.hyper_map(ops.partial(_keep_unless, ops.depend(skip, updated)), self.saved, self.shadow)
        nan = self.nan
        nonfinite_param, wild_param = nan, nan  # "not checked"
        if self.weights_in_step:  # a setting, not a tensor
            nonfinite_param, wild_param = _weight_flags(self.weights, self.param_abs_max, kept)
        loss_scale = nan
        if self.scaling:
            loss_scale = ops.cast(self._update_scale(incident, overflow), ms.float64)
        vector = ops.stack(step_vector({
            "total_loss": ops.cast(total, ms.float64), "grad_norm": ops.cast(grad_norm, ms.float64), "lr": lr,
            "loss_scale": loss_scale, "nonfinite_loss": _flag(nonfinite_loss), "nonfinite_grad": _flag(nonfinite_grad),
            "nonfinite_buffer": _flag(nonfinite_buffer), "loss_spike": _flag(loss_spike),
            "grad_spike": _flag(grad_spike), "nonfinite_param": nonfinite_param, "wild_param": wild_param,
            "scale_overflow": _flag(scale_overflow), "applied": _flag(ops.logical_not(skip))}, ops.depend(nan, kept)))
        return components, vector

    def check_weights(self, vector: Tensor) -> Tensor:
        """`vector` (a step's output) with its nonfinite_param / wild_param flags set from the weights as
        they are now: after that step's update. For `param_check_every` > 1; runs on the device, no
        wait for the host."""
        return self.weight_check(vector)

    def _update_unless(self, skip: Tensor, grads: tuple) -> Tensor:
        """The optimizer's update in the graph's own branch: compiled control flow, taken only when
        `skip` is False (graph mode; in PyNative this `if` would wait for the device)."""
        applied = ops.logical_not(skip)
        if applied:
            applied = ops.depend(applied, self.optimizer(grads))
        return applied

    def _plain(self, *inputs: Any) -> tuple[Tensor, Tensor]:
        poison = self.loss_poison.value() if self.fault_hooks else self.one
        outputs, grads = self.grad_fn(self.one, poison, *inputs)
        components = outputs[1]
        if self.fault_hooks:
            grads = self.hyper_map(_scale_by, self.grad_poison, grads)
        grad_norm = ops.sqrt(ops.stack(self.hyper_map(_square_sum, grads)).sum())
        lr = self._lr()
        updated = self.optimizer(self._clip(grads, grad_norm))
        nan = ops.depend(self.nan, updated)  # a plain step computes no flag: NaN, as the torch plain step's
        vector = ops.stack(step_vector({"total_loss": ops.cast(components.sum(), ms.float64),
                                        "grad_norm": ops.cast(grad_norm, ms.float64), "lr": lr,
                                        "applied": ops.depend(ops.ones((), ms.float64), updated)}, nan))
        return components, vector

    def _clip(self, grads: tuple, grad_norm: Tensor) -> tuple:
        if self.clip_norm <= 0:
            return grads
        return self.hyper_map(ops.partial(_scale_by, ops.minimum(self.clip_norm / (grad_norm + 1e-6), 1.0)), grads)

    def _lr(self) -> Tensor:
        lr = self.optimizer.get_lr()
        if isinstance(lr, (tuple, list)):  # group learning rates: report the first
            lr = lr[0]
        return ops.cast(lr, ms.float64).reshape(())

    def _state_parameters(self) -> dict[str, Parameter]:
        """Everything a continuation needs, by Parameter name: the network's weights and BatchNorm
        statistics, the optimizer's moments and step, the spike windows, the loss scale (not the
        shadows and the fault poisons: scratch space that every step overwrites)."""
        scratch = {id(p) for p in self.shadow} | {id(p) for p in self.grad_poison} | {id(self.loss_poison)}
        return {name: p for name, p in self.parameters_and_names() if id(p) not in scratch}

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {name: p.asnumpy().copy() for name, p in self._state_parameters().items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """The inverse of `state_arrays` (a ValueError names a missing, extra or misshapen entry)."""
        from nanguard.backends.mindspore.convert import set_parameters

        set_parameters(self._state_parameters(), arrays, "state tensors")

    def _update_scale(self, incident: Tensor, overflow: Tensor) -> Tensor:
        """Halve on an overflow, double after scale_window good steps; unchanged on a guard incident."""
        grown = self.good_steps + 1 >= self.scale_window
        new_scale = ops.select(overflow, ops.maximum(self.scale * 0.5, 1.0),
                               ops.select(grown, self.scale * 2.0, self.scale))
        new_good = ops.select(ops.logical_or(overflow, grown), ops.zeros_like(self.good_steps),
                              self.good_steps + 1)
        ops.assign(self.scale, ops.select(incident, self.scale, new_scale))
        ops.assign(self.good_steps, ops.select(incident, self.good_steps, new_good))
        return self.scale.value()


def _unscale(factor: Tensor, grad: Tensor) -> Tensor:
    return grad * ops.cast(factor, grad.dtype)


def _scale_by(coef: Tensor, grad: Tensor) -> Tensor:
    return grad * ops.cast(coef.value() if isinstance(coef, Parameter) else coef, grad.dtype)


def _square_sum(x: Tensor) -> Tensor:
    x = ops.cast(x, ms.float32)
    return (x * x).sum()


def _flat(tensors: tuple) -> Tensor:
    """The tensors as one float32 vector: one kernel for a check instead of one or two per tensor (a
    kernel launch costs more than the bytes here: hundreds of small tensors)."""
    return ops.concat([ops.cast(t, ms.float32).reshape(-1) for t in tensors])


def _all_finite(tensors: tuple) -> Tensor:
    return ops.isfinite(_flat(tensors)).all() if len(tensors) else ops.ones((), ms.bool_)


def _weight_flags(weights: tuple, bound: float, after: Any, *, end_to_end: bool = True) -> tuple[Tensor, Tensor]:
    """(nonfinite_param, wild_param) as float64 flags: the largest |weight| after `after` ran.

    end_to_end: one reduction over the weights laid end to end (inside the train step, where one
    reduction per weight tensor, ordered after the update, costs more to compile and to run than one
    copy of the weights); otherwise one reduction per tensor (the separate check cell, which compiles
    faster that way). README, Numbers, has both measured."""
    if end_to_end:
        peak = ops.abs(_flat(weights)).max()
    else:
        peak = ops.stack(_HYPER_MAP(_abs_max, weights)).max()
    peak = ops.depend(peak, after)
    return _flag(ops.logical_not(ops.isfinite(peak))), _flag(peak > bound)


def _abs_max(x: Tensor) -> Tensor:
    return ops.cast(ops.abs(x).max(), ms.float32)


class _WeightCheck(nn.Cell):
    """`GuardedTrainStep.check_weights`: a step's vector with the weight flags set."""

    def __init__(self, weights: ms.ParameterTuple, bound: float) -> None:
        super().__init__(auto_prefix=False)
        self.weights, self.bound = weights, bound
        self.fields = Tensor([[_FIELD["nonfinite_param"]], [_FIELD["wild_param"]]], ms.int32)

    def construct(self, vector: Tensor) -> Tensor:
        flags = _weight_flags(self.weights, self.bound, vector, end_to_end=False)
        return ops.tensor_scatter_update(vector, self.fields, ops.stack(flags))


def _keep_unless(skip: Tensor, param: Parameter, shadow: Parameter) -> Tensor:
    # where with the flag broadcast first: ops.select with a 0-dim condition is MindSpore's slow path
    # on the CPU (a large share of the tiny detector's step over its state tensors; nothing this way)
    return ops.assign(param, ops.where(ops.broadcast_to(skip, param.shape), shadow, param))


def _flag(x: Tensor) -> Tensor:
    return ops.cast(x, ms.float64)


def send(components: Tensor, vector: Tensor) -> Callable[[], list[float]]:
    """The `Mailbox`'s `read_values` for a `GuardedTrainStep`'s two outputs: called one step late, it
    waits for them and gives the components, then the step's numbers, as floats."""
    return lambda: components.asnumpy().reshape(-1).tolist() + vector.asnumpy().tolist()


class StepReader:
    """The host side of a `GuardedTrainStep` in a user's own loop: a step's outputs become an
    `Observation` one step late (reading step s's outputs while step s+1 runs keeps the host from
    waiting on the device): the framework-free `nanguard.guard.host.Mailbox`.

        reader = StepReader(("loss_a", "loss_b"))
        for step, inputs in enumerate(batches):
            for observation in reader.push(step, *guarded(*inputs)):
                if observation.bad(): print(observation.kinds())
        for observation in reader.flush(): ...
    """

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.names = tuple(names)  # the loss components' names, in the network's order (default loss_0, ...)
        self.mailbox = Mailbox()

    def push(self, step: int, components: Tensor, vector: Tensor) -> list[Observation]:
        """Keep step `step`'s outputs; return the previous step's observation (if any)."""
        count = int(np.prod(components.shape))  # the static shape: no wait for the device
        names = self.names or tuple(f"loss_{i}" for i in range(count))
        if len(names) != count:
            raise ValueError(f"StepReader names {len(names)} loss components {names}, the network returned {count}")
        return self._observations(self.mailbox.post(step, names, send(components, vector)))

    def flush(self) -> list[Observation]:
        """The pending step's observation, now (waits for the device)."""
        return self._observations(self.mailbox.take())

    def _observations(self, posted) -> list[Observation]:
        obs = self.mailbox.read(posted)
        return [] if obs is None else [obs]
