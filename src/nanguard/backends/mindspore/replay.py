"""Replay one bad step on MindSpore, and localise what went wrong. Nothing here runs in normal training.

What a replay needs goes to `RUN_DIR/incidents/<step>/replay.ckpt` (MindSpore's checkpoint format,
read without executing code) when the incident is read (`replay_bytes`):
- the state the step ran with (every state Parameter of the guarded step: weights, BatchNorm
  statistics, optimizer moments and step, the spike windows; a masked step changed none of them), and
  the newest confirmed snapshot's (an older healthy state);
- the batch as the model received it (the static arrays: images after any injected input fault,
  padded target boxes after invalid ones were dropped) and the samplers' noise the step drew;
- the loss poison of an injected `loss_nan` (a fault of the step's code); a `grad_nan` (hardware) is not
  part of the replay, a bit flip or an LR blow-up lives in the state.

`MindSporeReplayer` runs the step with the run's own compiled `GuardedTrainStep` (the same graph, so a
run costs what a training step costs): the state loaded, the batch given, the step's own numbers read
(losses, gradient norm, flags, spikes against the kept windows), the live state put back afterwards.
An image alone is the batch made of that image in every slot (the graph's static shape). The first
non-finite value is found in PyNative: a forward hook on every Cell names the first one whose output
is non-finite while its inputs were finite (its class is the `first_op`), and, when the forward is
finite, a backward hook on every Cell names the first whose input gradient is non-finite while its
output gradient was finite. The framework-free `nanguard.explain.replaying.replay_facts` decides what
to run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from nanguard.errors import UserError
from nanguard.explain.replaying import Run, absurd_boxes, pixel_facts, replay_facts
from nanguard.explain.verdict import ImageFacts, OpSite, ReplayFacts
from nanguard.guard.observation import Observation

REPLAY_FORMAT = "nanguard-mindspore-replay-1"
_BATCH = ("images", "boxes", "labels", "valid", "noise", "poison")


def replay_bytes(*, step: int, state: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None,
                 reference_step: int | None, batch: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """The contents of replay.ckpt: `state` (what the step ran with), `reference` (an older healthy
    state), `batch` (the static arrays, the noise and the loss poison), `meta` (ids, class count, lr)."""
    from nanguard.backends.mindspore.checkpoint import checkpoint_bytes

    arrays = {f"state/{k}": v for k, v in state.items()}
    arrays.update({f"reference/{k}": v for k, v in (reference or {}).items()})
    arrays.update({f"batch/{k}": np.ascontiguousarray(batch[k]) for k in _BATCH})
    return checkpoint_bytes(arrays, {"format": REPLAY_FORMAT, "step": step, "reference_step": reference_step, **meta})


def load_replay(path: Path) -> dict[str, Any]:
    from nanguard.backends.mindspore.checkpoint import load_checkpoint

    try:
        arrays, meta = load_checkpoint(path)
    except UserError as err:  # its advice is a checkpoint's (resume from another one): not this file's
        raise UserError(f"{str(err).split('; resume')[0]}; it is damaged, so this incident cannot be replayed") from None
    if meta.get("format") != REPLAY_FORMAT:
        raise UserError(f"{path}: not a nanguard MindSpore replay file ({REPLAY_FORMAT})")
    parts = {"state": {}, "reference": {}, "batch": {}}
    for name, value in arrays.items():
        kind, _, key = name.partition("/")
        if kind in parts:
            parts[kind][key] = value
    missing = [k for k in _BATCH if k not in parts["batch"]]
    count = len(parts["batch"].get("images", ()))
    if missing or not parts["state"] or not isinstance(meta.get("num_classes"), int) or \
            not isinstance(meta.get("image_ids"), list) or len(meta["image_ids"]) != count:
        raise UserError(f"{path}: a replay file without a usable {', '.join(missing) or 'state, image ids or class count'}; "
                        "it is damaged")
    return {**parts, "meta": meta}


class MindSporeReplayer:
    """Runs a kept step again with the backend's compiled step (see the module docstring)."""

    can_change_amp = False  # MindSpore runs float32 here

    def __init__(self, backend, bundle: dict[str, Any]) -> None:
        self.backend, self.bundle = backend, bundle
        self.batch = bundle["batch"]
        self.count = len(self.batch["images"])
        self.meta = bundle["meta"]

    def _inputs(self, images: list[int] | None) -> list[Tensor]:
        b = self.batch
        index = list(range(self.count)) if images is None else [images[k % len(images)] for k in range(self.count)]
        return [Tensor(b["images"][index]), Tensor(b["boxes"][index]), Tensor(b["labels"][index]),
                Tensor(b["valid"][index]), Tensor(b["noise"][index])]

    def run(self, state: dict[str, np.ndarray], *, images: list[int] | None = None, amp: str | None = None,
            judge_spikes: bool = True) -> Run:
        """The step from `state` on the batch (or on the batch made of the samples at `images`, repeated
        to the batch's size). The update it may apply is undone by the replay's end."""
        from nanguard.backends.mindspore.backend import LOSS_NAMES
        from nanguard.backends.mindspore.step import send

        cell = self.backend.step_cell
        cell.load_state_arrays(state)
        if cell.fault_hooks:
            cell.loss_poison.set_data(Tensor(self.batch["poison"].astype(np.float32)))
        try:
            with self.backend._compile_cache(), self.backend._graph_run():  # `nanguard diagnose`: the train step's graph
                components, vector = cell(*self._inputs(images))
            values = send(components, vector)()
        except (RuntimeError, ValueError, TypeError) as exc:  # the model refused the batch again
            return Run({}, math.nan, False, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            if cell.fault_hooks:
                cell.loss_poison.set_data(Tensor(np.ones(cell.fault_hooks, np.float32)))
        obs = Observation.from_vector(int(self.meta["step"]), LOSS_NAMES, values)
        losses = {**obs.losses, "total_loss": obs.total_loss}
        spike = bool(obs.loss_spike or obs.grad_spike) if judge_spikes else False
        return Run(losses, obs.grad_norm, spike, buffers_finite=not obs.nonfinite_buffer)

    def sample(self, i: int, run: Run) -> ImageFacts:
        """Image `i` after its run alone: its ids, its pixels (the image's own area of the canvas), its
        boxes."""
        height, width = self.meta["sizes"][i]
        pixels = self.batch["images"][i][:, :height, :width]
        nonfinite, std = pixel_facts(pixels)
        valid = self.batch["valid"][i].astype(bool)
        annotation_ids = list(self.meta["annotation_ids"][i])
        return ImageFacts(image_id=self.meta["image_ids"][i], annotation_ids=tuple(annotation_ids),
                          fails_alone=run.nonfinite, loss_alone=run.losses.get("total_loss"),
                          nonfinite_pixels=nonfinite, pixel_std=std,
                          bad_boxes=absurd_boxes(height, width, self.batch["boxes"][i][valid], annotation_ids))

    def locate(self, state: dict[str, np.ndarray]) -> tuple[OpSite | None, OpSite | None]:
        """The first Cell whose output (forward) or input gradient (backward) is non-finite while what
        it received was finite, in PyNative."""
        model = self.backend.model
        graph = ms.get_context("mode") == ms.GRAPH_MODE
        ms.set_context(mode=ms.PYNATIVE_MODE)
        handles = []
        forward = _FirstNonFinite("forward")
        backward = _FirstNonFinite("backward")
        try:
            self.backend.step_cell.load_state_arrays(state)
            for name, cell in model.cells_and_names():
                if name:
                    handles.append(cell.register_forward_hook(forward.hook(name)))
            inputs = self._inputs(None)
            poison = [float(p) for p in self.batch["poison"]]  # an injected loss_nan: the step's own code
            losses = [loss * p for loss, p in zip(model(*inputs), poison)]
            for handle in handles:
                handle.remove()
            handles = []
            total_finite = all(bool(np.isfinite(loss.asnumpy()).all()) for loss in losses)
            if forward.site is None and not total_finite:  # made outside every sub-cell: the losses' own arithmetic
                forward.site = OpSite(op=f"{type(model).__name__}.construct", module="", phase="forward",
                                      inputs_finite=True)
            if total_finite:  # the forward is finite: where does the backward go bad?
                for name, cell in model.cells_and_names():
                    if name:
                        handles.append(cell.register_backward_hook(backward.hook(name)))
                weights = self.backend.step_cell.weights

                def total(*args):
                    return sum(ops.cast(loss, ms.float32) * p for loss, p in zip(model(*args), poison))

                ops.value_and_grad(total, None, weights)(*inputs)
        except (RuntimeError, ValueError, TypeError):
            pass  # what was found so far stands
        finally:
            for handle in handles:
                handle.remove()
            ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE)
        return forward.site, backward.site


class _FirstNonFinite:
    """Hooks recording the first Cell that made a non-finite value from finite ones (else the first
    that passed one on)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.made: OpSite | None = None
        self.passed: OpSite | None = None

    @property
    def site(self) -> OpSite | None:
        return self.made or self.passed

    @site.setter
    def site(self, value: OpSite | None) -> None:
        self.made = value

    def hook(self, name: str):
        def forward(cell, inputs, outputs):
            self._see(name, cell, inputs, outputs)

        def backward(cell, grad_input, grad_output):  # grad_input: towards the cell's inputs
            self._see(name, cell, grad_output, grad_input)

        return forward if self.phase == "forward" else backward

    def _see(self, name: str, cell, given, made) -> None:
        if self.made is not None or _finite(made):
            return
        site = OpSite(op=type(cell).__name__, module=name, phase=self.phase, inputs_finite=_finite(given))
        if self.passed is None:
            self.passed = site
        if site.inputs_finite:
            self.made = site


def _finite(values: Any) -> bool:
    if isinstance(values, Tensor):
        if not ms.dtype_to_nptype(values.dtype) in (np.float16, np.float32, np.float64):
            return True
        return bool(np.isfinite(values.asnumpy()).all())
    if isinstance(values, (tuple, list)):
        return all(_finite(v) for v in values)
    return True


def replay(backend, path: Path, cfg) -> ReplayFacts:
    """The facts of one replay file, on the backend's compiled step (built now for `nanguard diagnose`).
    The backend's live state is as it was afterwards."""
    bundle = load_replay(path)
    meta = bundle["meta"]
    started = time.perf_counter()
    if getattr(backend, "step_cell", None) is None:  # `nanguard diagnose`: the step is built (and compiled) here
        backend.setup(cfg, int(meta["num_classes"]))
    cell = backend.step_cell
    live = cell.state_arrays()
    try:
        cell.load_state_arrays(bundle["state"])  # refused here, in one line, when it does not fit
        weights = _model_arrays(backend, bundle["state"])
        reference = bundle["reference"] or None
        facts = replay_facts(MindSporeReplayer(backend, bundle), bundle["state"], weights=weights,
                             reference=reference, reference_weights=_model_arrays(backend, reference) if reference else None,
                             reference_step=meta.get("reference_step"), amp="off", replays=cfg.explain.replays,
                             param_abs_max=cfg.guard.param_abs_max)
    except ValueError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path}: its contents do not fit this run's model ({reason}); it is damaged or "
                        "from another run") from None
    finally:
        cell.load_state_arrays(live)
    facts.seconds = time.perf_counter() - started
    return facts


def _model_arrays(backend, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's own Parameters (weights, BatchNorm statistics) among a step's state arrays."""
    names = {name for name, _ in backend.model.parameters_and_names()}
    return {name: value for name, value in state.items() if name in names}

