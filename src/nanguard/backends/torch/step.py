"""The pieces of a PyTorch training step around the guard: the fault hooks' points (`StepHooks`;
`nanguard.backends.torch.faults.TorchFaults` injects the device-side `--inject` kinds through them),
autocast, host batch -> device tensors, and `PlainStep`.

`PlainStep` is what users run today, as torchvision's reference does: backward, clip, step, no checks
and no masking. It is what `guard.enabled=false` trains with, and the baseline of the benchmarks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from nanguard.backends.torch.devicestate import LossScaler, LRSchedule
from nanguard.backends.torch.guard import Backward, Outcome, pack
from nanguard.data.loader import Batch
from nanguard.guard.host import PlainHost, StepContext

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepHooks(Protocol):
    """Points of one step where the trainer may act (fault injection). Each returns None unless noted."""

    def on_batch(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], image_ids: tuple) -> None:
        """The batch on the device, before the forward pass."""

    def on_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """After the forward pass, before the backward pass; returns the losses to use."""

    def after_backward(self, params: list[torch.nn.Parameter]) -> None:
        """Gradients are in `.grad`; before the check."""

    def after_update(self, params: list[torch.nn.Parameter]) -> None:
        """After the step (the parameters as the next step will see them)."""


class NoHooks:
    """The hooks of a clean run: each leaves everything as it is."""

    def on_batch(self, images, targets, image_ids):
        pass

    def on_losses(self, losses):
        return losses

    def after_backward(self, params):
        pass

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
        self.clip_norm = clip_norm
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device = self.params[0].device
        self.host = PlainHost(observe_every, rank)
        self.steps_run = 0

    def step(self, losses: dict[str, torch.Tensor]) -> list[Outcome]:
        return self.update(self.backward(losses))

    def backward(self, losses: dict[str, torch.Tensor]) -> Backward:
        names = tuple(sorted(losses))
        total = sum(losses[n] for n in names)
        self.scaler.backward(total)
        return Backward(names, torch.stack([losses[n].detach().float().reshape(()) for n in names]), total.detach())

    def apply(self, backward: Backward, lr_factor: float = 1.0) -> Callable[[], list[float]]:
        """Clip, step. Returns the step's `read_values`: the numbers are packed and copied only when it
        is called (no work on the steps nobody reads)."""
        nan = torch.full((), math.nan, device=self.device)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm, foreach=True)
                     if self.clip_norm > 0 else nan)
        saved = [group["lr"] for group in self.optimizer.param_groups]
        lr = self.schedule.lr() * lr_factor if self.schedule is not None else torch.as_tensor(
            saved[0] * lr_factor, dtype=torch.float32, device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr if self.schedule is not None else group["lr"] * lr_factor
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
        values = {"total_loss": backward.total, "grad_norm": grad_norm, "lr": lr,
                  "applied": torch.ones((), device=self.device)}
        # only when the numbers are asked for (every observe_every steps, as a plain loop's logging)
        return lambda: pack(backward.components, values).cpu().numpy().tolist()  # sync-ok: when read

    def update(self, backward: Backward, context: StepContext = StepContext()) -> list[Outcome]:
        read_values = self.apply(backward)
        step, self.steps_run = self.steps_run, self.steps_run + 1
        return self.host.sent(step, backward.names, read_values, context)

    def flush(self) -> list[Outcome]:
        """The last step's numbers, read now (a sync), once."""
        return self.host.flush()

    def state_dict(self) -> dict:
        return {"steps_run": self.steps_run}

    def load_state_dict(self, state: dict) -> None:
        self.steps_run = int(state["steps_run"])
        self.host.mailbox.take()


__all__ = ["PlainStep", "StepHooks", "NoHooks", "NO_HOOKS", "AMP_DTYPES", "autocast", "to_tensors"]
