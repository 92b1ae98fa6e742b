"""A numpy backend for the run-level tests (tests only): it honours the whole `Backend` contract and
`Injects`, so the run folder, the lock, resume, checkpoint fallback, policy actions, quarantine, the report
and the hostile inputs about files and values are tested in-process in milliseconds, without a framework.

The "detector" is a linear model on each image's mean colour: four loss components (the Faster R-CNN
names) from the weights and the batch, their gradients in closed form, SGD. The guard's device half is
mirrored in numpy with the same rules: each component and the gradient norm checked, the spike windows
(`nanguard.guard.SpikeDetector`, the reference the device detectors are tested against), the update
skipped on a bad step, the weights checked when asked. Every step is deterministic, so a resumed run is
bit-identical to a straight one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from nanguard.config import Config
from nanguard.errors import UserError
from nanguard.fileio import atomic_write
from nanguard.guard import SpikeDetector, step_vector
from nanguard.guard.faults import StepFaults
from nanguard.run.backend import StepNumbers

NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
FORMAT = "nanguard-fake-1"


class FakeBackend:
    checkpoint_suffix = ".npz"

    def __init__(self, device: str | None = None) -> None:
        self.calls: list[str] = []  # what the run called, in order (for tests of the contract's use)
        self.training = False

    def check_config(self, cfg: Config) -> None:
        self.calls.append("check_config")

    def setup(self, cfg: Config, num_classes: int, *, train: bool = True) -> None:
        self.calls.append(f"setup(train={train})")
        self.cfg, self.num_classes, self.training = cfg, num_classes, train
        rng = np.random.default_rng(cfg.seed)
        self.w = (rng.standard_normal((4, 3)) * 0.1).astype(np.float32)  # one row per loss component
        self.lr = float(cfg.train.lr)
        self.loss_spikes = SpikeDetector(**cfg.guard.spike_settings())
        self.grad_spikes = SpikeDetector(**cfg.guard.spike_settings())
        self.applied = 0
        self._armed: StepFaults | None = None

    def step(self, batch, *, lr_factor: float, check_weights: bool, between) -> StepNumbers:
        self.calls.append("step")
        faults, self._armed = self._armed, None
        x = np.stack([np.asarray(image, np.float32).mean(axis=(0, 1)) / 255.0 for image in batch.images])  # [B, 3]
        if faults is not None:
            for spec in faults.of("nan_input"):
                i = faults.pick(spec, len(x), "image")
                x[i] = float(spec.param("value"))
                faults.record(spec, {"image_id": batch.image_ids[i]})
        target = np.array([float(sum(len(b) for b in batch.boxes)) / max(1, len(batch.boxes)), 1.0, 0.5, 0.25],
                          np.float32)
        with np.errstate(all="ignore"):
            pred = x @ self.w.T  # [B, 4]
            err = pred.mean(axis=0) - target * 0.1
            components = (err ** 2).astype(np.float64)
            grad = (2 * err[:, None] * x.mean(axis=0)[None, :]).astype(np.float32)  # d loss_k / d w_k
        poison = np.ones(4)
        if faults is not None:
            for spec in faults.of("loss_nan"):
                poison[NAMES.index(spec.param("component"))] = float(spec.param("value"))
                faults.record(spec, {"component": spec.param("component")})
            for spec in faults.of("grad_nan"):
                grad[faults.pick(spec, 4, "param")] = float(spec.param("value"))
                faults.record(spec, {"param_index": 0})
        components = components * poison
        between()
        with np.errstate(all="ignore"):
            grad_norm = float(np.sqrt(np.sum(grad.astype(np.float64) ** 2)))
            total = float(components.sum())
        guarded = self.cfg.guard.enabled
        values: dict[str, float] = {"total_loss": total, "grad_norm": grad_norm,
                                    "lr": self.lr * _multiplier(self.cfg, self.applied) * lr_factor}
        if guarded:
            nonfinite_loss = not np.isfinite(components).all()
            nonfinite_grad = not math.isfinite(grad_norm)
            loss_spike = self.loss_spikes.update(total)
            grad_spike = self.grad_spikes.update(grad_norm)
            skip = nonfinite_loss or nonfinite_grad or loss_spike or grad_spike
            values.update(nonfinite_loss=nonfinite_loss, nonfinite_grad=nonfinite_grad, nonfinite_buffer=0.0,
                          loss_spike=loss_spike, grad_spike=grad_spike, scale_overflow=0.0)
        else:
            skip = False
        if not skip:
            clip = self.cfg.guard.clip_norm
            coef = min(1.0, clip / (grad_norm + 1e-6)) if clip > 0 else 1.0
            self.w = (self.w - np.float32(values["lr"] * coef) * grad).astype(np.float32)
            self.applied += 1
        values["applied"] = float(not skip)
        if faults is not None:
            for spec in faults.of("weight_bitflip"):
                flat = self.w.reshape(-1)
                e = faults.pick(spec, flat.size, "element")
                flat[e:e + 1].view(np.uint32)[0] ^= np.uint32(1 << int(spec.param("bit")))
                faults.record(spec, {"element": e})
        if guarded and check_weights:
            peak = float(np.abs(self.w).max())
            values.update(nonfinite_param=not math.isfinite(peak), wild_param=peak > self.cfg.guard.param_abs_max)
        vector = [float(v) for v in components] + [float(v) for v in step_vector(values, math.nan)]
        return StepNumbers(NAMES, lambda: list(vector))

    def arm(self, faults: StepFaults) -> None:
        self._armed = faults or None

    def capture(self) -> dict[str, Any]:
        if not self.training:
            return {"w": self.w.copy()}
        return {"w": self.w.copy(), "applied": self.applied, "loss_spikes": self.loss_spikes.state_dict(),
                "grad_spikes": self.grad_spikes.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "w" not in state:
            raise UserError("the checkpoint lacks the fake backend's state; it is damaged")
        self.w = np.array(state["w"], np.float32).reshape(4, 3)
        if self.training:
            self.applied = int(state["applied"])
            self.loss_spikes.load_state_dict(state["loss_spikes"])
            self.grad_spikes.load_state_dict(state["grad_spikes"])

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        backend = dict(state["backend"])
        meta = {**{k: v for k, v in state.items() if k != "backend"},
                "backend": {k: v for k, v in backend.items() if k != "w"}, "format": FORMAT}

        def write(handle) -> None:
            np.savez(handle, w=backend["w"], meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))

        atomic_write(Path(path), write)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                w = data["w"]
        except Exception as exc:  # numpy raises many types for a damaged file
            raise UserError(f"{path}: cannot read this checkpoint ({type(exc).__name__}); it is damaged") from None
        if meta.pop("format", None) != FORMAT:
            raise UserError(f"{path}: not a fake-backend checkpoint")
        return {**meta, "backend": {**meta["backend"], "w": w}}

    def predict(self, images: list[np.ndarray]) -> list[tuple]:
        out = []
        for image in images:
            h, w = image.shape[:2]
            out.append((np.array([[0, 0, w / 2, h / 2]], np.float32), np.array([0.9], np.float32),
                        np.array([1], np.int64)))
        return out

    def weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w.copy()}

    def runtime(self) -> dict[str, Any]:
        return {"backend": "fake"}

    def close(self) -> None:
        self.calls.append("close")


def _multiplier(cfg: Config, applied: int) -> float:
    from nanguard.guard.schedule import multiplier

    t = cfg.train
    return multiplier(applied, steps=t.steps, warmup=t.warmup_steps, kind=t.schedule, min_ratio=t.min_lr_ratio)

