"""The training step, in one screen: forward -> loss components -> guard (backward -> check -> clip ->
masked update) -> the policy's outcomes for the previous step.

`UnguardedStep` is the same step without the guard, as torchvision's reference and most loops run it:
it is what `guard.enabled=false` trains with, and the baseline of the benchmarks.
"""

from __future__ import annotations

import contextlib
import math

import torch

from nanguard.backends.torch.data import to_tensors
from nanguard.backends.torch.devicestate import LRSchedule
from nanguard.backends.torch.guard import Guard, NoFaults, Outcome
from nanguard.data.loader import Batch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def train_step(model: torch.nn.Module, guard: Guard, batch: Batch, *, device: torch.device, amp: str = "off",
               faults: NoFaults | None = None) -> list[Outcome]:
    """One step on `batch`. Returns the outcomes the guard read this step (those of the step before)."""
    faults = faults or NoFaults()
    images, targets = to_tensors(batch, device)
    faults.on_batch(images, targets, batch.image_ids)
    try:
        with autocast(device, amp):
            losses = model(images, targets)  # the four loss components, 0-dim device tensors
    except Exception as exc:  # the model refused this batch (a torchvision check, say): an incident
        return guard.skip_batch(exc, image_ids=batch.image_ids, annotation_ids=batch.annotation_ids)
    # no sync from here on: guard.step keeps every flag on the device
    return guard.step(losses, image_ids=batch.image_ids, annotation_ids=batch.annotation_ids, faults=faults)


class UnguardedStep(Guard):
    """backward -> clip -> step, no checks, no masking: a NaN goes straight into the weights. The loss
    values still reach the host one step late (for metrics), and the policy always sees a healthy step."""

    def step(self, losses, *, image_ids=(), annotation_ids=(), faults=None):
        faults = faults or NoFaults()
        names, components, total, scaler_on = self._backward(losses, faults)
        clip = self.config.clip_norm if self.config.clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        lr = self._set_lr(faults.lr_factor)
        if scaler_on:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None:
            self.schedule.advance(torch.ones((), dtype=torch.bool, device=self.device))
        faults.after_update(self.params)
        zero = torch.zeros((), device=self.device)
        vector = torch.cat([components, torch.stack([
            total.detach().float(), grad_norm.float(), lr.float(), torch.full((), math.nan, device=self.device),
            *([zero] * 9), torch.ones((), device=self.device)])])  # no flags; always applied
        outcomes = self._take_pending()
        self._pending = self._send(self.steps_run, vector, names, image_ids, annotation_ids)
        self.steps_run += 1
        return outcomes

    def skip_batch(self, error: BaseException, **ids):
        """Unguarded, a batch the model refuses ends the run, as in torchvision's reference."""
        raise error

    def _set_lr(self, fault_factor: float) -> torch.Tensor:
        if self.schedule is None:
            return torch.as_tensor(self.optimizer.param_groups[0]["lr"], dtype=torch.float32)
        lr = self.schedule.lr() * fault_factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


__all__ = ["train_step", "UnguardedStep", "LRSchedule", "AMP_DTYPES", "autocast"]
