"""Replay one bad step on PyTorch, and localise what went wrong. Nothing here runs in normal training.

What a replay needs is written to `RUN_DIR/incidents/<step>/replay.pt` when the incident is read
(`replay_bytes`; the run writes them, on a distributed run those of the rank whose batch went bad), so the same replay runs in training (`explain.auto`) and later, on another machine
(`nanguard diagnose`):
- the state the step ran with (the guard keeps it when it reads a bad observation: a masked step
  changed nothing, so it is the state before the step; BatchNorm statistics as before its forward),
  and the newest confirmed snapshot's weights (an older healthy state);
- torch's RNG state before the step (the RPN and RoI samplers draw from it);
- the batch as the model received it: float images after any injected input fault, the target boxes
  after invalid ones were dropped, the image and annotation ids;
- the injected faults that model the code of the step (`loss_nan`, `fp16_overflow`); a transient
  hardware fault (`grad_nan`) is not part of the replay, and a corrupted weight or an LR blow-up lives
  in the state.

`replay` runs the step `explain.replays` times from that state (same RNG, same batch): not reproduced
-> transient. Reproduced -> it localises: the first op whose output is non-finite while its inputs
were finite (a `TorchDispatchMode`) and the module it ran in, forward and backward; the images that
fail alone, with their pixels and boxes; the state's non-finite or absurd elements; the same batch on
the older state; the step in float32. The facts go to `nanguard.explain.verdict.judge`.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanguard.backends.torch.checkpoint import set_rng_state
from nanguard.backends.torch.devicestate import DeviceSpikeDetector
from nanguard.backends.torch.faults import TorchFaults
from nanguard.backends.torch.checkpoint import tensor_file_problem
from nanguard.backends.torch.step import autocast, to_tensors
from nanguard.config import Config
from nanguard.data.loader import Batch
from nanguard.data.targets import drop_invalid_targets
from nanguard.errors import UserError
from nanguard.explain.replaying import Run, absurd_boxes, pixel_facts, replay_facts
from nanguard.explain.verdict import ImageFacts, OpSite, ReplayFacts
from nanguard.guard import FaultPlan, NullInjectionLog

REPLAY_FILE = "replay.pt"
REPLAY_FORMAT = "nanguard-replay-1"
CODE_FAULTS = ("loss_nan", "fp16_overflow")  # injected faults that model the step's code: replayed

# Ops that allocate without initialising: garbage in their output is not a non-finite value made.
_UNINITIALISED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_"}


def replay_bytes(*, step: int, kept: dict[str, Any], rng: dict[str, Any], batch: Batch, plan: FaultPlan,
                 num_classes: int, amp: str, lr: float, rank: int = 0) -> bytes:
    """The contents of replay.pt for `step`: `kept` is the guard's replay state for it, `rng` torch's RNG
    state before it, `batch` the host batch it trained on (host-side faults already in it). Bytes, so
    that the rank that trained on the batch hands them to the rank that writes the run folder."""
    batch, _ = drop_invalid_targets(batch)
    images, targets = to_tensors(batch, torch.device("cpu"))
    if plan:  # an injected input fault is part of the batch, as a bad image file would be
        TorchFaults(plan, step, NullInjectionLog(), rank).on_batch(images, targets, batch.image_ids)
    code_faults = [f"{spec.kind}@{step}" + "".join(f":{key}={value}" for key, value in spec.params)
                   for spec in (plan.faults_at(step, rank) if plan else []) if spec.kind in CODE_FAULTS]
    bundle = {
        "format": REPLAY_FORMAT, "step": step, "rank": rank, "num_classes": num_classes, "amp": amp, "lr": float(lr),
        "model": kept["model"], "optimizer": kept["optimizer"],
        "loss_spikes": kept["loss_spikes"], "grad_spikes": kept["grad_spikes"],
        "reference_step": kept["reference_step"], "reference_model": kept["reference_model"],
        "rng": rng, "images": images, "targets": targets,
        "image_ids": list(batch.image_ids), "annotation_ids": [list(ids) for ids in batch.annotation_ids],
        "code_faults": code_faults,
        # fp16: the scale its backward ran with (an overflow is in the scaled gradients)
        "loss_scale": float((kept.get("scaler") or {}).get("scale", 0.0)) or None,
    }
    buffer = io.BytesIO()
    torch.save(bundle, buffer)
    return buffer.getvalue()


def load_replay(path: Path) -> dict[str, Any]:
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"{path}: cannot read it ({tensor_file_problem(exc)}); it is damaged") from None
    if not isinstance(bundle, dict) or bundle.get("format") != REPLAY_FORMAT:
        raise UserError(f"{path}: not a nanguard replay file ({REPLAY_FORMAT})")
    wrong = [key for key, kind in _BUNDLE_PARTS.items() if not isinstance(bundle.get(key), kind)]
    if wrong or isinstance(bundle["num_classes"], bool) or bundle["num_classes"] < 1:
        raise UserError(f"{path}: a replay file without a usable {', '.join(wrong) or 'num_classes'}; it is damaged")
    return bundle


# what a replay needs from the bundle, and of what type
_BUNDLE_PARTS = {"model": dict, "num_classes": int, "images": list, "targets": list, "rng": dict,
                 "image_ids": list, "annotation_ids": list, "code_faults": list}


# -------------------------------------------------------------------------------------------------
# One run of the step


class Replayer:
    def __init__(self, bundle: dict[str, Any], cfg: Config, device: torch.device) -> None:
        self.bundle, self.cfg, self.device = bundle, cfg, device
        from nanguard.backends.torch.model import build_model  # torchvision: only once a replay runs

        self.model = build_model(cfg.model, int(bundle["num_classes"])).to(device)
        self.images = [image.to(device) for image in bundle["images"]]
        self.targets = [{k: v.to(device) for k, v in target.items()} for target in bundle["targets"]]
        self.plan = FaultPlan(bundle["code_faults"]) if bundle["code_faults"] else None
        self.count = len(self.images)

    can_change_amp = True  # the step's autocast is the replayer's own

    def sample(self, i: int, run: Run) -> ImageFacts:
        """Image `i` of the batch after its run alone: its ids, pixels, and its boxes when it fails."""
        nonfinite, std = tensor_pixel_facts(self.images[i])
        height, width = self.images[i].shape[-2:]
        return ImageFacts(image_id=self.bundle["image_ids"][i], annotation_ids=tuple(self.bundle["annotation_ids"][i]),
                          fails_alone=run.nonfinite, loss_alone=run.losses.get("total_loss"), nonfinite_pixels=nonfinite,
                          pixel_std=std, bad_boxes=absurd_boxes(height, width, self.targets[i]["boxes"].cpu().numpy(),
                                                                self.bundle["annotation_ids"][i]))

    def locate(self, state: dict[str, torch.Tensor]) -> tuple[OpSite | None, OpSite | None]:
        return locate(self.run, state)

    def run(self, state: dict[str, torch.Tensor], *, images: list[int] | None = None, amp: str | None = None,
            tracer: NonFiniteTracer | None = None, judge_spikes: bool = True) -> Run:
        """The step from `state` (the model's state dict), on all images or the `images` given."""
        self.model.load_state_dict(state)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        set_rng_state(self.bundle["rng"], self.device)
        chosen = range(len(self.images)) if images is None else images
        batch_images = [self.images[i] for i in chosen]
        batch_targets = [self.targets[i] for i in chosen]
        amp = self.bundle["amp"] if amp is None else amp
        hooks = tracer.watch(self.model) if tracer is not None else []
        try:
            try:
                with tracer if tracer is not None else _nothing(), autocast(self.device, amp):
                    losses = dict(self.model(batch_images, batch_targets))
                    if self.plan:
                        losses = TorchFaults(self.plan, int(self.bundle["step"]), NullInjectionLog()).on_losses(losses)
                    total = sum(losses[name] for name in sorted(losses))
                    if tracer is not None:
                        tracer.enter_backward()
                    scale = self.bundle.get("loss_scale") if amp == "fp16" else None
                    (total * scale if scale else total).backward()
            except Exception as exc:  # the model refused the batch again
                return Run({}, math.nan, False, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            for hook in hooks:
                hook.remove()
        spikes = (lambda loss, grad: self._spike("loss_spikes", loss) or self._spike("grad_spikes", grad)) \
            if judge_spikes else None
        return measure(self.model, losses, total, scale, spikes)

    def _spike(self, name: str, value: float) -> bool:
        return spike_seen(self.cfg.guard.spike_settings(), self.bundle[name], value)


def spike_seen(settings: dict[str, Any], history: dict[str, Any], value: float) -> bool:
    """Is `value` a spike against the guard's spike detector `history` (its state_dict) at that step?"""
    detector = DeviceSpikeDetector(**settings, device="cpu")
    detector.load_state_dict(history)
    return bool(detector.update(torch.tensor(value)))


def measure(model: torch.nn.Module, losses: dict[str, torch.Tensor], total: torch.Tensor, scale: float | None,
            spikes=None) -> Run:
    """One run's numbers after its backward: the losses, the gradient norm (unscaled by `scale`), the
    buffers' finiteness, and `spikes(total_loss, grad_norm)` when given."""
    values = {name: float(value.detach().float()) for name, value in losses.items()}
    values["total_loss"] = float(total.detach().float())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else 0.0
    grad_norm /= scale or 1.0
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    buffers_finite = all(bool(torch.isfinite(b).all()) for b in buffers)
    spike = bool(spikes(values["total_loss"], grad_norm)) if spikes is not None else False
    return Run(values, grad_norm, spike, buffers_finite=buffers_finite)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -------------------------------------------------------------------------------------------------
# Localisation


class NonFiniteTracer(TorchDispatchMode):
    """Records, per phase, the first op whose output is non-finite while its inputs were finite (and the
    first op to output a non-finite value at all), with the module it ran in. Forward: module pre- and
    post-hooks keep the path of the module running. Backward: a hook on each module's output gradient
    names the module whose backward runs next."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.module = ""
        self._stack: list[str] = []
        self.made: dict[str, OpSite] = {}  # phase -> first op making a non-finite value from finite inputs
        self.passed: dict[str, OpSite] = {}  # phase -> first op outputting a non-finite value at all

    def watch(self, model: torch.nn.Module) -> list:
        hooks = []
        for name, module in model.named_modules():
            if not name:
                continue
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: self._push(n)))
            hooks.append(module.register_forward_hook(lambda m, a, out, n=name: self._pop(n, out)))
        return hooks

    def _push(self, name: str) -> None:
        self._stack.append(name)
        self.module = name

    def _pop(self, name: str, output: Any) -> None:
        if self._stack and self._stack[-1] == name:
            self._stack.pop()
        self.module = self._stack[-1] if self._stack else ""
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                try:
                    tensor.register_hook(lambda grad, n=name: self._backward_in(n))
                except RuntimeError:
                    pass  # a tensor that cannot take a hook: its module goes unnamed in backward

    def _backward_in(self, name: str) -> None:
        self.module = name

    def enter_backward(self) -> None:
        self.phase, self.module, self._stack = "backward", "", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        watching = self.phase not in self.made and name not in _UNINITIALISED
        inputs_finite = _finite(tree_leaves((args, kwargs))) if watching else True
        out = func(*args, **kwargs)
        if watching and not _finite(tree_leaves(out)):
            site = OpSite(op=str(func.overloadpacket.__name__), module=self.module, phase=self.phase,
                          inputs_finite=inputs_finite)
            self.passed.setdefault(self.phase, site)
            if inputs_finite:
                self.made[self.phase] = site
        return out

    def site(self, phase: str) -> OpSite | None:
        return self.made.get(phase) or self.passed.get(phase)


def _finite(leaves: list) -> bool:
    """Every floating tensor among `leaves` is finite. Python numbers are the op's constants (code, not
    data): `loss * nan` makes a non-finite value from finite inputs."""
    for value in leaves:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() \
                and not bool(torch.isfinite(value).all()):
            return False
    return True


# -------------------------------------------------------------------------------------------------
# The whole replay


def replay(path: Path, cfg: Config, device: torch.device) -> ReplayFacts:
    """The facts of one replay (see the module docstring). Leaves torch's RNG as it found it."""
    bundle = load_replay(path)
    started = time.perf_counter()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            facts = _replay(bundle, cfg, device)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            # parts that do not fit the run's model (another class count, another architecture) or each
            # other; a non-finite value met in the replayed step is a fact, caught inside the replay
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"{path}: its contents do not fit this run's model ({reason}); it is damaged or "
                            "from another run") from None
    facts.seconds = time.perf_counter() - started
    return facts


def _replay(bundle: dict[str, Any], cfg: Config, device: torch.device) -> ReplayFacts:
    reference = bundle.get("reference_model")
    return replay_facts(Replayer(bundle, cfg, device), bundle["model"], weights=host_arrays(bundle["model"]),
                        reference=reference, reference_weights=host_arrays(reference) if reference else None,
                        reference_step=bundle.get("reference_step"), amp=bundle["amp"],
                        replays=cfg.explain.replays, param_abs_max=cfg.guard.param_abs_max)


def host_arrays(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The floating tensors of a state dict as float32 numpy arrays (the state's facts)."""
    return {name: t.detach().float().cpu().numpy() for name, t in state.items() if t.is_floating_point()}


def locate(run, state: dict[str, torch.Tensor]) -> tuple[OpSite | None, OpSite | None]:
    """The first non-finite op and module, forward and backward: `run(state, tracer=..., judge_spikes=False)`
    once under a `NonFiniteTracer`."""
    tracer = NonFiniteTracer()
    run(state, tracer=tracer, judge_spikes=False)
    return tracer.site("forward"), tracer.site("backward")


def tensor_pixel_facts(pixels: torch.Tensor) -> tuple[int, float]:
    return pixel_facts(pixels.detach().float().cpu().numpy())
