"""The MindSpore backend of the run (`nanguard.run.backend.Backend`): the static-shape Faster
R-CNN (`model.py`), trained by `GuardedTrainStep` (the guard inside the compiled step), the policy carried
out by the framework-free `PolicyDriver`, checkpoints in MindSpore's .ckpt format.

    nanguard train --config demo backend=mindspore

CPU only here (MindSpore's GPU plugin needs CUDA 11 libraries the lent GPUs do not have). Graph mode
by default; NANGUARD_MINDSPORE_MODE=pynative runs the same step eagerly. `guard.enabled=false` trains
with the same cell built without checks (`GuardedTrainStep(checks=False)`). Not built yet: mixed
precision, replay and localisation of incidents (a MindSpore run's incidents are logged and acted on,
not diagnosed), data parallel.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nanguard.config import Config
from nanguard.data.coco import CocoIndex
from nanguard.data.loader import Batch, load_image
from nanguard.data.targets import drop_invalid_targets
from nanguard.errors import UserError
from nanguard.guard import Decision, FaultPlan, Outcome
from nanguard.guard.faults import plain_id as _plain
from nanguard.guard.driver import PolicyDriver
from nanguard.guard.host import Mailbox, StepContext
from nanguard.run.backend import unreadable_unguarded
from nanguard.run.ranks import Ranks

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
MAX_BOXES = 32  # ground-truth slots per image; boxes beyond are reported (a note), not trained on


def _ms():
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's own log: errors only (its warnings flood a run's stderr)
    try:
        import mindspore
    except ImportError:
        raise UserError("backend=mindspore: mindspore is not installed; `make install` installs it") from None
    return mindspore


class MindSporeBackend:
    name = "mindspore"
    checkpoint_suffix = ".ckpt"

    def __init__(self, device: str | None) -> None:
        if device == "cuda":
            raise UserError("--device cuda: the MindSpore backend runs on the CPU here (its GPU plugin needs "
                            "CUDA 11); use --device cpu or backend=torch")
        self.ms = _ms()
        mode = os.environ.get("NANGUARD_MINDSPORE_MODE", "graph")
        if mode not in ("graph", "pynative"):
            raise UserError(f"NANGUARD_MINDSPORE_MODE={mode!r}: use graph or pynative")
        self.ms.set_device("CPU")
        self.ms.set_context(mode=self.ms.GRAPH_MODE if mode == "graph" else self.ms.PYNATIVE_MODE)

    def check_config(self, cfg: Config) -> None:
        refused = []
        if cfg.model.name not in ("tiny", "resnet50_fpn"):
            refused.append(f"model.name={cfg.model.name} (tiny and resnet50_fpn are built for MindSpore)")
        if cfg.model.weights:
            refused.append("model.weights (convert a PyTorch model with nanguard.backends.mindspore.convert)")
        if cfg.train.amp != "off":
            refused.append(f"train.amp={cfg.train.amp} (MindSpore runs float32 here)")
        if Ranks.from_env().distributed:
            refused.append("several processes (no MindSpore data parallel yet)")
        if refused:
            raise UserError(f"backend=mindspore does not support {'; '.join(refused)}; use backend=torch for it")

    # ---------------------------------------------------------------------------------------------
    # Setup

    def _build(self, cfg: Config, num_classes: int):
        from nanguard.backends.mindspore.batch import canvas_size
        from nanguard.backends.mindspore.model import FasterRCNN

        self.ms.set_seed(cfg.seed)
        self.canvas = canvas_size(cfg.model.min_size, cfg.model.max_size)
        return FasterRCNN(cfg.model, num_classes, self.canvas, max_boxes=MAX_BOXES)

    def setup(self, cfg: Config, num_classes: int, *, faults: FaultPlan, injections) -> None:
        from mindspore import nn

        from nanguard.backends.mindspore.schedule import LRSchedule
        from nanguard.backends.mindspore.step import GuardedTrainStep

        self.cfg, self.faults, self.injections, self.num_classes = cfg, faults, injections, num_classes
        self.model = self._build(cfg, num_classes)
        t = cfg.train
        decay = [p for p in self.model.trainable_params() if len(p.shape) > 1]
        no_decay = [p for p in self.model.trainable_params() if len(p.shape) <= 1]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.schedule = LRSchedule(t)
        if t.optimizer == "sgd":
            optimizer = nn.Momentum(groups, learning_rate=self.schedule, momentum=t.momentum)
        elif t.optimizer == "adam":
            optimizer = nn.Adam(groups, learning_rate=self.schedule)
        else:
            optimizer = nn.AdamWeightDecay(groups, learning_rate=self.schedule)
        self.step_cell = GuardedTrainStep(self.model, optimizer, cfg.guard, fault_hooks=len(LOSS_NAMES) if faults else 0,
                                          checks=cfg.guard.enabled, param_check_every=cfg.guard.param_check_every)
        self.weights = list(optimizer.parameters)
        self.rng = np.random.default_rng(cfg.seed)  # the samplers' noise
        self.steps_run = 0
        self.mailbox = Mailbox()
        self.driver = PolicyDriver(cfg.policy, None, capture=self._capture, restore=self._restore)

    def setup_model(self, cfg: Config, num_classes: int, state: dict[str, Any]) -> None:
        self.cfg = cfg
        self.model = self._build(cfg, num_classes)
        from nanguard.backends.mindspore.convert import load_arrays

        arrays = state["arrays"]  # the step's state: the model's Parameters keep their names
        wanted = {name for name, _ in self.model.parameters_and_names()}
        try:
            load_arrays(self.model, {k: v for k, v in arrays.items() if k in wanted})
        except ValueError:
            raise UserError(f"the checkpoint's weights do not fit model.name={cfg.model.name}; drop the model.* "
                            "overrides") from None

    # ---------------------------------------------------------------------------------------------
    # Steps

    def train_step(self, batch: Batch) -> list[Outcome]:
        from mindspore import Tensor

        from nanguard.backends.mindspore.batch import to_static
        from nanguard.backends.mindspore.step import send

        step = self.steps_run
        active = self.faults.faults_at(step) if self.faults else []
        batch = self._inject_host(batch, step, active)
        batch, invalid = drop_invalid_targets(batch)
        m = self.cfg.model
        static = to_static(batch.images, batch.boxes, batch.labels, m.min_size, m.max_size, MAX_BOXES)
        invalid = invalid + tuple((batch.image_ids[i], batch.annotation_ids[i][j],
                                   f"beyond the {MAX_BOXES} box slots of the MindSpore model")
                                  for i, j in static.overflow)
        self._inject_device(static, batch, step, active)
        noise = self.rng.random((len(batch.images), self.model.noise_size()), dtype=np.float32)
        components, vector = self.step_cell(Tensor(static.images), Tensor(static.boxes), Tensor(static.labels),
                                            Tensor(static.valid), Tensor(noise))
        if self.cfg.guard.enabled and self.cfg.guard.param_check_every > 1 and \
                self.driver.weights_check_due(step, self.cfg.guard.param_check_every):
            vector = self.step_cell.check_weights(vector)  # on the grid, and the state a snapshot keeps
        self._after_step(step, active)
        if self.cfg.guard.enabled:
            self.driver.stage(step)
        context = StepContext(batch.image_ids, batch.annotation_ids, (batch.key.epoch, batch.key.position), invalid)
        return self._advance(self.mailbox.post(step, LOSS_NAMES, send(components, vector), context))

    def skip_batch(self, error: BaseException, batch_key: tuple[int, int], image_ids: tuple,
                   annotation_ids: tuple) -> list[Outcome]:
        if not self.cfg.guard.enabled:  # unguarded, a batch that cannot be read ends the run (as torch's)
            raise unreadable_unguarded(error, image_ids) from None
        context = StepContext(tuple(image_ids), tuple(annotation_ids), batch_key)
        return self._advance(self.mailbox.post_error(self.steps_run, error, context))

    def _advance(self, previous) -> list[Outcome]:
        self.steps_run += 1
        if not self.cfg.guard.enabled:  # unguarded: the numbers are read every train.log_every steps only
            due = (self.steps_run - 1) % max(1, self.cfg.train.log_every) == 0
            return self.flush() if due else []
        outcomes = self.driver.decide(self.mailbox.read(previous))
        self.schedule.set_factor(self.driver.lr_factor)
        return outcomes

    def flush(self) -> list[Outcome]:
        observation = self.mailbox.read(self.mailbox.take())
        if not self.cfg.guard.enabled:
            return [] if observation is None else [Outcome(observation, Decision.unguarded(observation.step))]
        return self.driver.decide(observation)

    @property
    def stopped(self) -> bool:
        return self.driver.stopped

    @property
    def policy_state(self):
        return self.driver.policy_state

    # ---------------------------------------------------------------------------------------------
    # Faults (the MindSpore side of nanguard.guard.faults; each injection goes to injections.jsonl)

    def _inject_host(self, batch: Batch, step: int, active) -> Batch:
        for spec in (s for s in active if s.kind == "zero_box"):
            candidates = [i for i, boxes in enumerate(batch.boxes) if len(boxes)]
            if not candidates:
                continue
            i = candidates[self.faults.pick(spec, step, len(candidates), "image")]
            boxes = [b.copy() if k == i else b for k, b in enumerate(batch.boxes)]
            j = self.faults.pick(spec, step, len(boxes[i]), "box")
            boxes[i][j, 2] = boxes[i][j, 0]
            batch = dataclasses.replace(batch, boxes=boxes)
            self.injections.record(step, spec, 0, {"image_id": _plain(batch.image_ids[i]), "box": j})
        return batch

    def _inject_device(self, static, batch: Batch, step: int, active) -> None:
        from mindspore import Tensor

        poison = np.ones(len(LOSS_NAMES), np.float32)
        for spec in active:
            if spec.kind == "nan_input":
                i = self.faults.pick(spec, step, len(batch.images), "image")
                value = float(spec.param("value"))
                static.images[i, :, : max(1, static.images.shape[2] // 4)] = value
                self.injections.record(step, spec, 0, {"image_id": _plain(batch.image_ids[i]), "value": str(value)})
            elif spec.kind == "zero_box" or spec.kind == "weight_bitflip":
                continue
            elif spec.kind == "loss_nan":
                name = spec.param("component")
                if name in LOSS_NAMES:
                    poison[LOSS_NAMES.index(name)] = float(spec.param("value"))
                    self.injections.record(step, spec, 0, {"component": name})
            elif spec.kind == "grad_nan":
                k = self.faults.pick(spec, step, len(self.weights), "param")
                self.step_cell.grad_poison[k].set_data(Tensor(float(spec.param("value")), self.ms.float32))
                self.injections.record(step, spec, 0, {"param_index": k})
            elif spec.kind == "lr_spike":
                factor = float(spec.param("factor"))
                self.schedule.set_factor(self.driver.lr_factor * factor)
                self.injections.record(step, spec, 0, {"lr_factor": factor})
            else:  # fp16_overflow: refused before the run (no fp16 here)
                raise UserError(f"--inject {spec.kind}: not available with backend=mindspore")
        if (poison != 1).any():
            self.step_cell.loss_poison.set_data(Tensor(poison))

    def _after_step(self, step: int, active) -> None:
        from mindspore import Tensor

        if any(s.kind in ("loss_nan", "grad_nan", "lr_spike") for s in active):  # one step only
            self.step_cell.loss_poison.set_data(Tensor(np.ones(len(LOSS_NAMES), np.float32)))
            for p in self.step_cell.grad_poison:
                p.set_data(Tensor(1.0, self.ms.float32))
            self.schedule.set_factor(self.driver.lr_factor)
        for spec in (s for s in active if s.kind == "weight_bitflip"):
            candidates = [i for i, p in enumerate(self.weights) if p.dtype == self.ms.float32 and int(np.prod(p.shape)) > 1]
            k = candidates[self.faults.pick(spec, step, len(candidates), "param")]
            values = self.weights[k].asnumpy().copy()
            flat = values.reshape(-1)
            e = self.faults.pick(spec, step, flat.size, "element")
            bits = flat[e:e + 1].view(np.uint32)
            bits ^= np.uint32(1 << int(spec.param("bit")))
            self.weights[k].set_data(Tensor(values))
            self.injections.record(step, spec, 0, {"param_index": k, "element": e, "bit": int(spec.param("bit"))})

    # ---------------------------------------------------------------------------------------------
    # State

    def _capture(self) -> dict[str, np.ndarray]:
        return self.step_cell.state_arrays()  # a host copy every policy.snapshot_every steps

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.step_cell.load_state_arrays(arrays)

    def state_dict(self) -> dict[str, Any]:
        return {"arrays": self.step_cell.state_arrays(),
                "meta": {"steps_run": self.steps_run, "driver": self.driver.state_dict(self.steps_run),
                         "rng": self.rng.bit_generator.state}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "arrays" not in state or "meta" not in state:
            raise UserError("the checkpoint lacks the MindSpore backend's state; it is damaged or from backend=torch")
        try:
            self.step_cell.load_state_arrays(state["arrays"])
        except ValueError as exc:
            raise UserError(f"the checkpoint does not fit this model ({exc}); drop the model.* overrides") from None
        meta = state["meta"]
        self.steps_run = int(meta["steps_run"])
        self.rng.bit_generator.state = meta["rng"]
        self.driver.load_state_dict(meta["driver"], self.steps_run)
        self.schedule.set_factor(self.driver.lr_factor)
        self.mailbox.take()

    def rebase(self, steps_done: int, state: dict[str, Any]) -> None:
        self.driver.rebase(steps_done - 1, state["arrays"])

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        from nanguard.backends.mindspore.checkpoint import save_checkpoint

        backend = state["backend"]
        meta = {k: v for k, v in state.items() if k != "backend"}
        meta["backend"] = backend["meta"]
        save_checkpoint(path, backend["arrays"], json.loads(json.dumps(meta, default=_plain_json)))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        from nanguard.backends.mindspore.checkpoint import load_checkpoint

        arrays, meta = load_checkpoint(path)
        if "backend" not in meta:
            raise UserError(f"{path}: cannot read this checkpoint (no backend state); it is damaged or foreign")
        state = dict(meta)
        state["backend"] = {"arrays": arrays, "meta": meta["backend"]}
        return state

    # ---------------------------------------------------------------------------------------------
    # Evaluation

    def predict(self, index: CocoIndex, *, batch_size: int, max_images: int = 0,
                skipped: list | None = None) -> list[dict[str, Any]]:
        from mindspore import Tensor

        from nanguard.backends.mindspore.batch import to_static

        m = self.cfg.model
        records = index.records[:max_images] if max_images else index.records
        detections: list[dict[str, Any]] = []
        self.model.set_train(False)
        try:
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                images = []
                for record in chunk:
                    try:
                        images.append(load_image(record.path))
                    except (OSError, ValueError) as exc:
                        raise UserError(f"{record.path}: cannot read image id {record.image_id} "
                                        f"({exc.__class__.__name__}); run `nanguard audit` on the split") from None
                empty = [np.zeros((0, 4), np.float32)] * len(images)
                static = to_static(images, empty, [np.zeros(0, np.int64)] * len(images), m.min_size, m.max_size, 1)
                boxes, scores, labels, valid = (t.asnumpy() for t in self.model.detect(Tensor(static.images)))
                for i, record in enumerate(chunk):
                    for box, score, label in zip(boxes[i][valid[i]], scores[i][valid[i]], labels[i][valid[i]]):
                        x1, y1, x2, y2 = (float(v) / float(static.scales[i]) for v in box)
                        detections.append({"image_id": record.image_id,
                                           "category_id": index.category_ids[int(label) - 1],
                                           "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)],
                                           "score": round(float(score), 5)})
        finally:
            self.model.set_train(True)
        return detections

    def weights_finite(self) -> bool:
        return all(bool(np.isfinite(p.asnumpy()).all()) for p in self.model.get_parameters())

    def runtime(self) -> dict[str, Any]:
        from nanguard.backends.mindspore import runtime

        mode = "graph" if self.ms.get_context("mode") == self.ms.GRAPH_MODE else "pynative"
        return {"backend": self.name, "mode": mode, **runtime.facts("CPU")}

    def rank_param_digests(self) -> list[str]:
        import hashlib

        digest = hashlib.sha256()
        for name, p in sorted(self.model.parameters_and_names()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(p.asnumpy()).tobytes())
        return [digest.hexdigest()]

    def close(self) -> None:
        pass

    # Replay: not built for MindSpore yet (incidents are logged and acted on, not diagnosed)

    def keep_replay_state(self, want) -> None:
        pass

    def write_replay(self, step: int, batch: Batch, path: Path, *, lr: float) -> bool:
        return False

    def replay(self, path: Path, cfg: Config):
        raise UserError(f"{path}: replaying a MindSpore step is not built yet; run with backend=torch to "
                        "diagnose this kind of incident")


def _plain_json(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def create(device: str | None) -> MindSporeBackend:
    return MindSporeBackend(device)

