"""Fault injection for PyTorch: the tensor work behind each kind in `nanguard.guard.faults`.

`TorchFaults(plan, step, log)` is the `StepHooks` the trainer's step (`backends.torch.step.train_step`)
calls at each point of one step. Every injection is written to injections.jsonl; nothing else in
nanguard reads that file.
"""

from __future__ import annotations

import contextlib

import torch

from nanguard.backends.torch.step import NoHooks
from nanguard.guard import FaultPlan, FaultSpec
from nanguard.guard.faults import plain_id as _plain


class TorchFaults(NoHooks):
    def __init__(self, plan: FaultPlan, step: int, log, rank: int = 0) -> None:
        self.plan, self.step, self.log, self.rank = plan, step, log, rank
        self.active: list[FaultSpec] = plan.faults_at(step, rank) if plan else []

    def _of(self, kind: str) -> list[FaultSpec]:
        return [spec for spec in self.active if spec.kind == kind]

    def on_host_batch(self, batch) -> None:
        """zero_box: one target box of the decoded batch gets x2 = x1 (an annotation gone bad)."""
        for spec in self._of("zero_box"):
            candidates = [i for i, boxes in enumerate(batch.boxes) if len(boxes)]
            if not candidates:
                continue
            i = candidates[self.plan.pick(spec, self.step, len(candidates), "image")]
            boxes = batch.boxes[i] = batch.boxes[i].copy()
            j = self.plan.pick(spec, self.step, len(boxes), "box")
            boxes[j, 2] = boxes[j, 0]  # x2 = x1: a zero-width box
            self.log.record(self.step, spec, self.rank, {"image_id": _plain(batch.image_ids[i]), "box": j})

    def during_update(self, schedule):
        """lr_spike: the schedule's base LR times `factor` for this one update."""
        factor = 1.0
        for spec in self._of("lr_spike"):
            factor *= float(spec.param("factor"))
            self.log.record(self.step, spec, self.rank, {"lr_factor": factor})
        if factor == 1.0 or schedule is None:
            return contextlib.nullcontext()
        return _scaled_base_lr(schedule, factor)

    def on_batch(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                 image_ids: tuple) -> None:
        """nan_input: a band of non-finite pixels in one image on the device."""
        for spec in self._of("nan_input"):
            i = self.plan.pick(spec, self.step, len(images), "image")
            value = float(spec.param("value"))
            images[i][:, : max(1, images[i].shape[1] // 4)] = value  # a band of non-finite pixels
            self.log.record(self.step, spec, self.rank, {"image_id": _plain(image_ids[i]), "value": str(value)})

    def on_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for spec in self._of("loss_nan"):
            name = spec.param("component")
            if name in losses:  # multiply, so the non-finite value flows into the gradients too
                losses[name] = losses[name] * float(spec.param("value"))
                self.log.record(self.step, spec, self.rank, {"component": name})
        for spec in self._of("fp16_overflow"):
            for name in losses:
                losses[name] = losses[name] * 1.0e6  # far past fp16's 65504 once scaled
            self.log.record(self.step, spec, self.rank, {"loss_multiplier": 1.0e6})
        return losses

    def after_backward(self, params: list[torch.nn.Parameter]) -> None:
        for spec in self._of("grad_nan"):
            with_grad = [i for i, p in enumerate(params) if p.grad is not None]
            k = with_grad[self.plan.pick(spec, self.step, len(with_grad), "param")]
            grad = params[k].grad.view(-1)
            grad[self.plan.pick(spec, self.step, grad.numel(), "element")] = float(spec.param("value"))
            self.log.record(self.step, spec, self.rank, {"param_index": k})

    def after_update(self, params: list[torch.nn.Parameter]) -> None:
        for spec in self._of("weight_bitflip"):
            candidates = [i for i, p in enumerate(params) if p.dtype == torch.float32 and p.numel() > 1]
            k = candidates[self.plan.pick(spec, self.step, len(candidates), "param")]
            flat = params[k].data.view(-1)
            e = self.plan.pick(spec, self.step, flat.numel(), "element")
            bits = flat[e : e + 1].view(torch.int32)
            bits.bitwise_xor_(1 << int(spec.param("bit")) if int(spec.param("bit")) < 31 else -(1 << 31))
            self.log.record(self.step, spec, self.rank, {"param_index": k, "element": e,
                                                          "bit": int(spec.param("bit"))})


@contextlib.contextmanager
def _scaled_base_lr(schedule, factor: float):
    base = schedule.base_lr
    schedule.base_lr = base * factor
    try:
        yield
    finally:
        schedule.base_lr = base
