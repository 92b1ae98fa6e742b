"""Fault injection for MindSpore: the tensor work behind each device-side kind in
`nanguard.guard.faults` (the host-side kinds, zero_box and lr_spike, are the run's). `GuardedTrainStep`
built with `fault_hooks` has the Parameters the host writes between steps: `loss_poison` (multiplied
into the loss components) and `grad_poison` (one scalar per weight, into its gradient)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor

from nanguard.errors import UserError
from nanguard.guard.faults import StepFaults
from nanguard.guard.observation import json_id


class MindSporeFaults:
    """The faults of one step: `before(static, image_ids)` on the host arrays and the poison Parameters,
    `after(check)` once the step ran (the poison put back; weight_bitflip)."""

    def __init__(self, faults: StepFaults, step_cell, loss_names: tuple[str, ...]) -> None:
        self.faults, self.step_cell, self.loss_names = faults, step_cell, loss_names
        self.weights = list(step_cell.weights)

    def before(self, static, image_ids: tuple) -> None:
        """nan_input: a band of non-finite pixels in one image; loss_nan and grad_nan: the poison."""
        f = self.faults
        poison = batch_faults(f, static, image_ids, self.loss_names)
        for spec in f.of("grad_nan"):
            k = f.pick(spec, len(self.weights), "param")
            self.step_cell.grad_poison[k].set_data(Tensor(float(spec.param("value")), ms.float32))
            f.record(spec, {"param_index": k})
        if (poison != 1).any():
            self.step_cell.loss_poison.set_data(Tensor(poison))

    def after(self) -> None:
        f = self.faults
        if f.of("loss_nan", "grad_nan"):  # one step only
            self.step_cell.loss_poison.set_data(Tensor(np.ones(len(self.loss_names), np.float32)))
            for p in self.step_cell.grad_poison:
                p.set_data(Tensor(1.0, ms.float32))
        for spec in f.of("weight_bitflip"):
            candidates = [i for i, p in enumerate(self.weights) if p.dtype == ms.float32 and int(np.prod(p.shape)) > 1]
            k = candidates[f.pick(spec, len(candidates), "param")]
            values = self.weights[k].asnumpy().copy()
            flat = values.reshape(-1)
            e = f.pick(spec, flat.size, "element")
            bits = flat[e:e + 1].view(np.uint32)
            bits ^= np.uint32(1 << int(spec.param("bit")))
            self.weights[k].set_data(Tensor(values))
            f.record(spec, {"param_index": k, "element": e, "bit": int(spec.param("bit"))})


def batch_faults(faults: StepFaults, static, image_ids: tuple, loss_names: tuple[str, ...]) -> np.ndarray:
    """The faults that live in the batch and in the step's code: nan_input written into `static`'s
    images; returns the loss poison (loss_nan). The same for a training step and for its replay file."""
    poison = np.ones(len(loss_names), np.float32)
    for spec in faults.specs:
        if spec.kind == "nan_input":
            i = faults.pick(spec, len(image_ids), "image")
            value = float(spec.param("value"))
            static.images[i, :, : max(1, static.images.shape[2] // 4)] = value
            faults.record(spec, {"image_id": json_id(image_ids[i]), "value": str(value)})
        elif spec.kind == "loss_nan":
            name = spec.param("component")
            if name in loss_names:
                poison[loss_names.index(name)] = float(spec.param("value"))
                faults.record(spec, {"component": name})
        elif spec.kind not in ("weight_bitflip", "grad_nan"):  # fp16_overflow: refused before the run (no fp16 here)
            raise UserError(f"--inject {spec.kind}: not available with backend=mindspore")
    return poison
