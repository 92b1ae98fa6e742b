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


class _Run:
    """The numbers of one run of the step (forward, loss, backward) from the bundle's state."""

    def __init__(self, losses: dict[str, float], grad_norm: float, spike: bool, error: str | None = None,
                 buffers_finite: bool = True) -> None:
        self.losses, self.grad_norm, self.spike, self.error = losses, grad_norm, spike, error
        self.buffers_finite = buffers_finite

    @property
    def nonfinite(self) -> bool:
        return self.error is not None or not self.buffers_finite or not math.isfinite(self.grad_norm) \
            or not all(math.isfinite(v) for v in self.losses.values())

    @property
    def bad(self) -> bool:
        return self.nonfinite or self.spike

    def key(self) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in self.losses.items())) + (repr(self.grad_norm), self.error)


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

    def sample(self, i: int, run: _Run) -> ImageFacts:
        """Image `i` of the batch after its run alone: its ids, pixels, and its boxes when it fails."""
        nonfinite, std = pixel_facts(self.images[i])
        return ImageFacts(image_id=self.bundle["image_ids"][i], annotation_ids=tuple(self.bundle["annotation_ids"][i]),
                          fails_alone=run.nonfinite, loss_alone=run.losses.get("total_loss"), nonfinite_pixels=nonfinite,
                          pixel_std=std, bad_boxes=_absurd_boxes(self.images[i], self.targets[i]["boxes"],
                                                                 self.bundle["annotation_ids"][i]))

    def run(self, state: dict[str, torch.Tensor], *, images: list[int] | None = None, amp: str | None = None,
            tracer: NonFiniteTracer | None = None, judge_spikes: bool = True) -> _Run:
        """The step from `state` (the model's state dict), on all images or the `images` given."""
        self.model.load_state_dict(state)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        set_rng_state(self.bundle["rng"])
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
                return _Run({}, math.nan, False, error=f"{type(exc).__name__}: {exc}"[:300])
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
            spikes=None) -> _Run:
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
    return _Run(values, grad_norm, spike, buffers_finite=buffers_finite)


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
    return replay_facts(Replayer(bundle, cfg, device), bundle, replays=cfg.explain.replays,
                        param_abs_max=cfg.guard.param_abs_max)


def replay_facts(replayer, kept: dict[str, Any], *, replays: int, param_abs_max: float) -> ReplayFacts:
    """The facts of a bad step from any replayer: `replayer.run(state, images=, amp=, tracer=,
    judge_spikes=)` runs the step from a model state, `replayer.sample(i, run)` describes sample `i`
    after its run alone; `kept` holds the state the step ran with ("model"), the older healthy one
    ("reference_model", "reference_step") and "amp". A run's replayer and the own loop's share this."""
    state = kept["model"]
    runs = [replayer.run(state) for _ in range(max(1, replays))]
    first = runs[0]
    facts = ReplayFacts(
        replays=len(runs), reproduced=all(run.bad for run in runs),
        same_every_time=len({run.key() for run in runs}) == 1,
        losses=first.losses, grad_norm=first.grad_norm,
        nonfinite_components=[name for name, value in first.losses.items()
                              if name != "total_loss" and not math.isfinite(value)],
        spike=first.spike, amp=kept["amp"], error=first.error)
    _state_facts(facts, kept, param_abs_max)
    if not facts.reproduced:
        return facts
    if first.nonfinite:
        tracer = NonFiniteTracer()
        replayer.run(state, tracer=tracer, judge_spikes=False)
        facts.forward, facts.backward = tracer.site("forward"), tracer.site("backward")
    if kept.get("reference_model") is not None and not (facts.state_nonfinite or facts.state_wild):
        facts.reference_ok = not replayer.run(kept["reference_model"]).bad
    if facts.amp != "off" and replayer.can_change_amp:  # float32 makes the same non-finite value? (a spike alone is not AMP's doing)
        full = replayer.run(state, amp="off")
        facts.full_precision_ok = not (full.nonfinite if first.nonfinite else full.bad)
    bad_state = facts.state_nonfinite or facts.state_wild  # the verdict is the state's: no image is to blame
    if (first.nonfinite or not facts.reference_ok) and not bad_state:  # a spike the older state shares: the images
        facts.images = _image_facts(replayer, state)
    return facts


def _state_facts(facts: ReplayFacts, bundle: dict[str, Any], bound: float) -> None:
    """Non-finite / absurd elements of the state the step ran with, and how far the healthy rest of it
    moved from the older state (a flipped bit moves one element; an LR blow-up, all of them)."""
    reference = bundle.get("reference_model") or {}
    moved, norm = 0.0, 0.0
    for name, tensor in bundle["model"].items():
        if not tensor.is_floating_point():
            continue
        tensor = tensor.float()
        finite = torch.isfinite(tensor)
        nonfinite = int((~finite).sum())
        wild = int((finite & (tensor.abs() > bound)).sum())
        if nonfinite or wild:
            facts.state_nonfinite += nonfinite
            facts.state_wild += wild
            facts.state_tensors.append(name)
        old = reference.get(name)
        if old is not None and old.shape == tensor.shape:
            sane = finite & (tensor.abs() <= bound) & torch.isfinite(old.float())
            moved += float(((tensor - old.float()) * sane).pow(2).sum())
            norm += float((old.float() * sane).pow(2).sum())
    if reference:
        facts.reference_step = int(bundle["reference_step"])
        facts.weight_change = math.sqrt(moved) / max(math.sqrt(norm), 1e-12)


def _image_facts(replayer, state: dict[str, torch.Tensor]) -> list[ImageFacts]:
    """Each image (sample) alone, forward and backward: whether it fails, and what its input holds."""
    facts = [replayer.sample(i, replayer.run(state, images=[i], judge_spikes=False)) for i in range(replayer.count)]
    losses = sorted(f.loss_alone for f in facts if f.loss_alone is not None and math.isfinite(f.loss_alone))
    median = losses[(len(losses) - 1) // 2] if losses else math.nan
    for image_facts in facts:
        loss = image_facts.loss_alone
        if not image_facts.fails_alone and loss is not None and math.isfinite(loss) and len(losses) > 2 \
                and loss > 10 * median:
            image_facts.fails_alone = True  # it alone carries the spike
        if not image_facts.fails_alone:
            image_facts.bad_boxes = []  # the boxes of the images to blame only
    return facts


def pixel_facts(pixels: torch.Tensor) -> tuple[int, float]:
    """(non-finite values, standard deviation of the finite ones) of an image or any model input."""
    pixels = pixels.detach().float()
    finite = torch.isfinite(pixels)
    return int((~finite).sum()), float(pixels[finite].std()) if int(finite.sum()) > 1 else math.nan


def _absurd_boxes(image: torch.Tensor, boxes: torch.Tensor, annotation_ids: list) -> list[tuple[Any, str]]:
    """Boxes that survived the host's check (finite, positive size) but cannot be real: far outside
    the image, or thousands of times wider than tall."""
    height, width = image.shape[-2:]
    found = []
    for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        ann = annotation_ids[j] if j < len(annotation_ids) else None
        w, h = x2 - x1, y2 - y1
        if x2 < -width or y2 < -height or x1 > 2 * width or y1 > 2 * height or w > 4 * width or h > 4 * height:
            found.append((ann, f"box {x1:.4g},{y1:.4g},{x2:.4g},{y2:.4g} far outside the {width}x{height} image"))
        elif max(w / h, h / w) > 1000:
            found.append((ann, f"box {w:.4g}x{h:.4g} px: aspect ratio over 1000"))
    return found
