"""Explaining a bad step of your own PyTorch loop: `Guard.step(losses, replay=fn, ids=ids)`.

`fn(index)` recomputes the step's loss dict for the samples at positions `index` (a list of ints) of its
batch, with your model; `ids` are the batch's sample ids. The guard keeps references to both for the
last `explain.ring` steps (no copy, no sync). When it reads a bad step (one step late), it keeps the state
that step ran with (a masked update changed nothing; BatchNorm statistics as before its forward), and
once the policy has decided, `LoopReplayer` runs the step again on your model from that state:
`explain.replays` times (not reproduced: transient), then the first non-finite op and module (forward
and backward), the batch on the newest confirmed snapshot, and each sample alone — what your model
received as its input (its first argument: non-finite or constant?) and beside it (targets). The same
framework-free `judge` as in a run turns that into the verdict. Your model's parameters, buffers,
gradients, modes and torch's RNG are as they were afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from nanguard.backends.torch.checkpoint import set_rng_state
from nanguard.backends.torch.replay import NonFiniteTracer, host_arrays, locate, measure, spike_seen, tensor_pixel_facts
from nanguard.explain.replaying import Run, absurd_boxes, replay_facts
from nanguard.explain.verdict import ImageFacts, OpSite, ReplayFacts

ReplayFn = Callable[[list[int]], dict[str, torch.Tensor]]


class LoopReplayer:
    """Runs a step of an own loop again through its `replay` function (the interface `replay_facts`
    drives: `run`, `sample`, `count`)."""

    can_change_amp = False  # the loss function owns its autocast

    def __init__(self, model: torch.nn.Module, fn: ReplayFn, ids: Sequence, *, rng: dict[str, Any] | None,
                 kept: dict[str, Any], spike_settings: dict[str, Any], loss_scale: float | None) -> None:
        self.model, self.fn, self.ids, self.rng, self.kept = model, fn, list(ids), rng, kept
        self.spike_settings, self.loss_scale = spike_settings, loss_scale
        self.count = len(self.ids)
        self._inputs: dict[int, tuple[Any, Any]] = {}  # sample -> (the model's input, the rest of its arguments)

    def run(self, state: dict[str, torch.Tensor], *, images: list[int] | None = None, amp: str | None = None,
            tracer: NonFiniteTracer | None = None, judge_spikes: bool = True) -> Run:
        self.model.load_state_dict(state)
        self.model.zero_grad(set_to_none=True)
        if self.rng is not None:
            set_rng_state(self.rng)
        else:  # the step's own RNG state is unknown: every run draws the same numbers
            torch.manual_seed(0)
        index = list(range(self.count)) if images is None else list(images)
        hooks = tracer.watch(self.model) if tracer is not None else []
        if len(index) == 1:
            hooks.append(self.model.register_forward_pre_hook(self._seen(index[0]), with_kwargs=True))
        try:
            try:
                with tracer if tracer is not None else nullcontext():
                    losses = dict(self.fn(index))
                    total = sum(losses[name] for name in sorted(losses))
                    if tracer is not None:
                        tracer.enter_backward()
                    (total * self.loss_scale if self.loss_scale else total).backward()
            except Exception as exc:  # the model or the loss refused these samples
                return Run({}, math.nan, False, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            for hook in hooks:
                hook.remove()
        spikes = None
        if judge_spikes:
            def spikes(loss: float, grad: float) -> bool:
                return spike_seen(self.spike_settings, self.kept["loss_spikes"], loss) \
                    or spike_seen(self.spike_settings, self.kept["grad_spikes"], grad)
        return measure(self.model, losses, total, self.loss_scale, spikes)

    def locate(self, state: dict[str, torch.Tensor]) -> tuple[OpSite | None, OpSite | None]:
        return locate(self.run, state)

    def _seen(self, sample: int):
        def hook(module, args, kwargs):
            if sample not in self._inputs and args:  # the first call: the sample as the model received it
                self._inputs[sample] = (args[0], (args[1:], kwargs))
        return hook

    def sample(self, i: int, run: Run) -> ImageFacts:
        """Sample `i` after its run alone: its id, its input's values, the values beside it (a detector's
        targets, with absurd boxes named as "box J" of the sample)."""
        # a sample the model cannot run alone (BatchNorm1d in training mode wants two) is judged by its input
        facts = ImageFacts(image_id=self.ids[i], fails_alone=None if run.error else run.nonfinite,
                           loss_alone=run.losses.get("total_loss"))
        if i not in self._inputs:  # the model was not called as module(...) on it
            return facts
        given, rest = self._inputs[i]
        floats = [t for t in tree_leaves(given) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if floats:
            facts.nonfinite_pixels, facts.pixel_std = tensor_pixel_facts(torch.cat([t.detach().reshape(-1) for t in floats]))
        facts.nonfinite_targets = sum(int((~torch.isfinite(t.detach())).sum()) for t in tree_leaves(rest)
                                      if isinstance(t, torch.Tensor) and t.is_floating_point())
        targets = rest[0][0] if rest[0] else None
        if len(floats) == 1 and floats[0].dim() == 3 and isinstance(targets, (list, tuple)) and len(targets) == 1 \
                and isinstance(targets[0], dict) and isinstance(targets[0].get("boxes"), torch.Tensor):
            boxes = targets[0]["boxes"].detach().float()
            if boxes.dim() == 2 and boxes.shape[-1] == 4 and bool(torch.isfinite(boxes).all()):
                height, width = floats[0].shape[-2:]
                facts.bad_boxes = absurd_boxes(height, width, boxes.cpu().numpy(), [f"box {j}" for j in range(len(boxes))])
        return facts


def explain_loop_step(model: torch.nn.Module, fn: ReplayFn, ids: Sequence, *, rng: dict[str, Any] | None,
                      kept: dict[str, Any], spike_settings: dict[str, Any], replays: int,
                      param_abs_max: float) -> ReplayFacts:
    """The facts of one bad step of an own loop, from `kept` (the guard's capture of the state it ran
    with, plus "reference_model"/"reference_step" and "amp"). Puts back everything it touches."""
    loss_scale = float((kept.get("scaler") or {}).get("scale", 0.0)) or None
    replayer = LoopReplayer(model, fn, ids, rng=rng, kept=kept, spike_settings=spike_settings, loss_scale=loss_scale)
    live = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    grads = [(p, p.grad) for p in model.parameters()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            return replay_facts(replayer, kept["model"], weights=host_arrays(kept["model"]),
                                reference=kept.get("reference_model"),
                                reference_weights=host_arrays(kept["reference_model"]) if kept.get("reference_model") else None,
                                reference_step=kept.get("reference_step"), amp=kept["amp"], replays=replays,
                                param_abs_max=param_abs_max)
    finally:
        model.load_state_dict(live)
        for p, grad in grads:
            p.grad = grad
