"""The training step, in one screen: host-side target check -> forward -> loss components -> guard
(backward -> check -> agree -> apply -> send) -> the policy's outcomes for the previous step.

The trainer's fault hooks (`StepHooks`; `nanguard.backends.torch.faults.TorchFaults` injects
`--inject` faults through them) are applied here, around the guard: the guard itself has no test seam.

`PlainStep` is what users run today, as torchvision's reference does: backward, clip, step, no checks
and no masking. It is what `guard.enabled=false` trains with, and the baseline of the benchmarks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol

import numpy as np
import torch

from nanguard.backends.torch.devicestate import LossScaler, LRSchedule
from nanguard.backends.torch.guard import Backward, Guard, Outcome, pack, send
from nanguard.data.loader import Batch
from nanguard.data.targets import drop_invalid_targets
from nanguard.guard import Decision, PolicyState
from nanguard.guard.host import Mailbox, StepContext

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepHooks(Protocol):
    """Points of one step where the trainer may act (fault injection). Each returns None unless noted."""

    def on_host_batch(self, batch: Batch) -> None:
        """The batch as decoded on the host (numpy), before its targets are checked."""

    def on_batch(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], image_ids: tuple) -> None:
        """The batch on the device, before the forward pass."""

    def on_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """After the forward pass, before the backward pass; returns the losses to use."""

    def after_backward(self, params: list[torch.nn.Parameter]) -> None:
        """Gradients are in `.grad`; before the check."""

    def during_update(self, schedule: LRSchedule | None) -> contextlib.AbstractContextManager:
        """A context around the check-agree-apply-send part of the step."""

    def after_update(self, params: list[torch.nn.Parameter]) -> None:
        """After the step (the parameters as the next step will see them)."""


class NoHooks:
    """The hooks of a clean run: each leaves everything as it is."""

    def on_host_batch(self, batch):
        pass

    def on_batch(self, images, targets, image_ids):
        pass

    def on_losses(self, losses):
        return losses

    def after_backward(self, params):
        pass

    def during_update(self, schedule):
        return contextlib.nullcontext()

    def after_update(self, params):
        pass


NO_HOOKS = NoHooks()


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """[H, W, 3] uint8 (possibly a read-only view of the loader's cache) -> [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0)


def to_tensors(batch: Batch, device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """images: [3, H, W] float32 in [0, 1]; targets: boxes [N, 4] xyxy float32, labels [N] int64."""
    images = [image_tensor(image, device) for image in batch.images]
    targets = [{"boxes": torch.from_numpy(boxes).to(device), "labels": torch.from_numpy(labels).to(device)}
               for boxes, labels in zip(batch.boxes, batch.labels)]
    return images, targets


def train_step(model: torch.nn.Module, stepper: Guard | PlainStep, batch: Batch, *, device: torch.device,
               amp: str = "off", hooks: StepHooks = NO_HOOKS) -> list[Outcome]:
    """One step on `batch`. Returns the outcomes the stepper read this step (a guard: those of the step
    before). Invalid target boxes are dropped on the host and reported in the step's observation."""
    hooks.on_host_batch(batch)
    batch, invalid = drop_invalid_targets(batch)
    images, targets = to_tensors(batch, device)
    hooks.on_batch(images, targets, batch.image_ids)
    context = StepContext(batch.image_ids, batch.annotation_ids, (batch.key.epoch, batch.key.position), invalid,
                          batch.rank_image_ids, batch.rank_annotation_ids)
    try:
        with autocast(device, amp):
            losses = model(images, targets)  # the four loss components, 0-dim device tensors
    except Exception as exc:  # the model refused this batch: an incident (a plain step re-raises)
        return stepper.skip_batch(exc, image_ids=batch.image_ids, annotation_ids=batch.annotation_ids,
                                  batch=context.batch)
    # no sync from here on: the guard keeps every flag on the device
    backward = stepper.backward(hooks.on_losses(dict(losses)))
    hooks.after_backward(stepper.params)
    with hooks.during_update(stepper.schedule):
        outcomes = stepper.update(backward, context)
    hooks.after_update(stepper.params)
    return outcomes


class PlainStep:
    """backward -> clip -> step, no checks, no masking: a NaN goes straight into the weights, and a batch
    the model refuses ends the run, as in torchvision's reference. The loss values reach the host only
    every `observe_every` steps and at `flush` (a sync there, as a plain loop's logging makes); on the
    other steps nothing is done beyond backward, clip, step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scaler=None,
                 clip_norm: float = 0.0, schedule: LRSchedule | None = None, observe_every: int = 0,
                 rank: int = 0) -> None:
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.scaler = LossScaler(scaler, optimizer)
        self.clip_norm, self.observe_every = clip_norm, observe_every
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device = self.params[0].device
        self.mailbox = Mailbox(rank)
        self.policy_state = PolicyState()
        self.steps_run = 0
        self.stopped = False
        self._last: tuple | None = None

    def step(self, losses: dict[str, torch.Tensor]) -> list[Outcome]:
        return self.update(self.backward(losses))

    def backward(self, losses: dict[str, torch.Tensor]) -> Backward:
        names = tuple(sorted(losses))
        total = sum(losses[n] for n in names)
        self.scaler.backward(total)
        return Backward(names, torch.stack([losses[n].detach().float().reshape(()) for n in names]), total.detach())

    def update(self, backward: Backward, context: StepContext = StepContext()) -> list[Outcome]:
        nan = torch.full((), math.nan, device=self.device)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm, foreach=True)
                     if self.clip_norm > 0 else nan)
        saved = [group["lr"] for group in self.optimizer.param_groups]
        lr = self.schedule.lr() if self.schedule is not None else torch.as_tensor(
            saved[0], dtype=torch.float32, device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr if self.schedule is not None else group["lr"]
        if self.scaler.enabled:
            self.scaler.scaler.step(self.optimizer)
            self.scaler.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for group, value in zip(self.optimizer.param_groups, saved):
            group["lr"] = value  # the schedule owns the lr
        if self.schedule is not None:
            self.schedule.advance(torch.ones((), dtype=torch.bool, device=self.device))
        # kept, not copied: the numbers reach the host only when asked for (no work on the other steps)
        self._last = (self.steps_run, backward, {"total_loss": backward.total, "grad_norm": grad_norm, "lr": lr},
                      context)
        self.steps_run += 1
        due = self.observe_every and (self.steps_run - 1) % self.observe_every == 0
        return self.flush() if due else []

    def skip_batch(self, error: BaseException, **context) -> list[Outcome]:
        raise error

    def flush(self) -> list[Outcome]:
        """The last step's numbers, read now (a sync), once."""
        if self._last is None:
            return []
        step, backward, values, context = self._last
        self._last = None
        values["applied"] = torch.ones((), device=self.device)
        self.mailbox.post(step, backward.names, send(pack(backward.components, values)), context)
        obs = self.mailbox.read(self.mailbox.take())
        return [Outcome(obs, Decision.unguarded(obs.step))]

    def state_dict(self) -> dict:
        return {"steps_run": self.steps_run}

    def load_state_dict(self, state: dict) -> None:
        self.steps_run = int(state["steps_run"])
        self._last = None


__all__ = ["train_step", "PlainStep", "StepHooks", "NoHooks", "NO_HOOKS", "AMP_DTYPES", "autocast", "to_tensors"]
