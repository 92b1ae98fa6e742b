"""Fault injection for PyTorch: the tensor work behind each device-side kind in `nanguard.guard.faults`
(the host-side kinds, zero_box and lr_spike, are the run's: `nanguard.guard.faults.inject_host`).

`TorchFaults(plan, step, log)` is the `StepHooks` the backend's step calls at each point of one step.
Every injection is written to injections.jsonl; nothing else in nanguard reads that file.
"""

from __future__ import annotations

import torch

from nanguard.backends.torch.step import NoHooks
from nanguard.guard import FaultPlan, FaultSpec
from nanguard.guard.faults import HOST_KINDS
from nanguard.guard.observation import json_id


class TorchFaults(NoHooks):
    def __init__(self, plan: FaultPlan, step: int, log, rank: int = 0) -> None:
        self.plan, self.step, self.log, self.rank = plan, step, log, rank
        self.active: list[FaultSpec] = [s for s in plan.faults_at(step, rank) if s.kind not in HOST_KINDS] if plan else []

    def _of(self, kind: str) -> list[FaultSpec]:
        return [spec for spec in self.active if spec.kind == kind]

    def on_batch(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                 image_ids: tuple) -> None:
        """nan_input: a band of non-finite pixels in one image on the device."""
        for spec in self._of("nan_input"):
            i = self.plan.pick(spec, self.step, len(images), "image")
            value = float(spec.param("value"))
            images[i][:, : max(1, images[i].shape[1] // 4)] = value  # a band of non-finite pixels
            self.log.record(self.step, spec, self.rank, {"image_id": json_id(image_ids[i]), "value": str(value)})

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
