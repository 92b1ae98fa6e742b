"""The MindSpore backend of the run (`nanguard.run.backend.Backend`): the static-shape Faster
R-CNN (`model.py`), trained by `GuardedTrainStep` (the guard's device half inside the compiled step;
its host half is the run's), device-side faults (`faults.py`), checkpoints in MindSpore's .ckpt format
(`checkpoint.py`).

    nanguard train --config demo backend=mindspore

CPU only here (MindSpore's GPU plugin needs CUDA 11 libraries the lent GPUs do not have). Graph mode
by default; NANGUARD_MINDSPORE_MODE=pynative runs the same step eagerly. `guard.enabled=false` trains
with the same cell built without checks (`GuardedTrainStep(checks=False)`). Incidents are replayed
and localised (`replay.py`). Not built yet: mixed precision, data parallel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from nanguard.backends.shared import split_decay
from nanguard.config import Config
from nanguard.data.loader import Batch
from nanguard.errors import UserError
from nanguard.guard.faults import StepFaults
from nanguard.run.backend import StepNumbers
from nanguard.run.ranks import Ranks

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
# A folder: the train step's compiled graph is kept in it, by config, and loaded by later processes of
# the same config (a resumed run, a rerun) instead of compiled again (`_compile_cache`).
COMPILE_CACHE = "NANGUARD_MINDSPORE_COMPILE_CACHE"
# Settings that change no compiled graph (file names, cadences, what happens after training).
_NOT_IN_GRAPH = {"data": None, "eval": None, "explain": None, "inject": None, "policy": None,
                 "train": ("log_every", "tensorboard", "checkpoint_every", "keep_checkpoints", "eval_at_end",
                           "threads")}
MAX_BOXES = 32  # ground-truth slots per image; boxes beyond are reported (a note), not trained on


def _ms():
    try:
        import mindspore
    except ImportError:
        raise UserError("backend=mindspore: mindspore is not installed; `make install` installs it") from None
    return mindspore


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


class MindSporeBackend:
    """`nanguard.run.backend.Backend`, `Injects` and `Replays`."""

    checkpoint_suffix = ".ckpt"

    def __init__(self, device: str | None) -> None:
        if device == "cuda":
            raise UserError("--device cuda: the MindSpore backend runs on the CPU here (its GPU plugin needs "
                            "CUDA 11); use --device cpu or backend=torch")
        handler = signal.getsignal(signal.SIGINT)
        self.ms = _ms()
        mode = os.environ.get("NANGUARD_MINDSPORE_MODE", "graph")
        if mode not in ("graph", "pynative"):
            raise UserError(f"NANGUARD_MINDSPORE_MODE={mode!r}: use graph or pynative")
        self.training = False
        try:
            self.ms.set_device("CPU")
        except RuntimeError:  # MindSpore already ran kernels in this process (a notebook, a test session)
            if self.ms.get_context("device_target") != "CPU":
                raise UserError(f"MindSpore already runs on {self.ms.get_context('device_target')} in this "
                                "process; the MindSpore backend runs on the CPU: start a new process") from None
        self.ms.set_context(mode=self.ms.GRAPH_MODE if mode == "graph" else self.ms.PYNATIVE_MODE)
        self._sigint = handler

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
        root = os.environ.get(COMPILE_CACHE)
        if root:  # refused now in one line, not MindSpore's errors at the first compile
            try:
                Path(root).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"{COMPILE_CACHE}={root}: cannot make it a folder ({exc.strerror or exc}); "
                                "point it at a writable folder or unset it") from None

    # ---------------------------------------------------------------------------------------------
    # Setup

    def _build(self, cfg: Config, num_classes: int):
        from nanguard.backends.mindspore.batch import canvas_size
        from nanguard.backends.mindspore.model import FasterRCNN

        self.ms.set_seed(cfg.seed)
        self.canvas = canvas_size(cfg.model.min_size, cfg.model.max_size)
        return FasterRCNN(cfg.model, num_classes, self.canvas, max_boxes=MAX_BOXES)

    def setup(self, cfg: Config, num_classes: int, *, train: bool = True) -> None:
        from mindspore import nn

        from nanguard.backends.mindspore.schedule import LRSchedule
        from nanguard.backends.mindspore.step import GuardedTrainStep

        self.cfg, self.num_classes, self.training = cfg, num_classes, train
        self.model = self._build(cfg, num_classes)
        if not train:
            return
        t = cfg.train
        decay, no_decay = split_decay(self.model.trainable_params(), lambda p: len(p.shape))
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.schedule = LRSchedule(t)
        self._lr_factor = 1.0
        if t.optimizer == "sgd":
            optimizer = nn.Momentum(groups, learning_rate=self.schedule, momentum=t.momentum)
        elif t.optimizer == "adam":
            optimizer = nn.Adam(groups, learning_rate=self.schedule)
        else:
            optimizer = nn.AdamWeightDecay(groups, learning_rate=self.schedule)
        self.step_cell = GuardedTrainStep(self.model, optimizer, cfg.guard,
                                          fault_hooks=len(LOSS_NAMES) if cfg.inject else 0,
                                          checks=cfg.guard.enabled, param_check_every=cfg.guard.param_check_every)
        self.rng = np.random.default_rng(cfg.seed)  # the samplers' noise
        # what a replay needs, kept only where a run explains its incidents (guarded)
        self._noise: dict[Any, np.ndarray] | None = {} if cfg.guard.enabled and cfg.explain.keep > 0 else None
        self.replay_states: dict[int, dict[str, Any]] = {}
        self._armed = None  # MindSporeFaults of the next step
        self._cached = False  # the compile cache was used (the first step only)

    # ---------------------------------------------------------------------------------------------
    # The step

    def step(self, batch: Batch, *, lr_factor: float, check_weights: bool, between) -> StepNumbers:
        from mindspore import Tensor

        from nanguard.backends.mindspore.batch import to_static
        from nanguard.backends.mindspore.step import send

        m = self.cfg.model
        static = to_static(batch.images, batch.boxes, batch.labels, m.min_size, m.max_size, MAX_BOXES)
        dropped = tuple((batch.image_ids[i], batch.annotation_ids[i][j],
                         f"beyond the {MAX_BOXES} box slots of the MindSpore model") for i, j in static.overflow)
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.before(static, batch.image_ids)
        if lr_factor != self._lr_factor:  # a host write between steps, only when the policy changed it
            self.schedule.set_factor(lr_factor)
            self._lr_factor = lr_factor
        noise = self.rng.random((len(batch.images), self.model.noise_size()), dtype=np.float32)
        if self._noise is not None:  # the samplers' draws of this step: what its replay runs with
            self._noise[batch.key] = noise
            for old in list(self._noise)[:-8]:
                del self._noise[old]
        between()  # one compiled cell: the previous step is read before it, when nothing of it has run
        with self._compile_cache(), self._graph_run():
            components, vector = self.step_cell(Tensor(static.images), Tensor(static.boxes), Tensor(static.labels),
                                                Tensor(static.valid), Tensor(noise))
        if check_weights and self.cfg.guard.enabled and self.cfg.guard.param_check_every > 1:
            with self._graph_run():
                vector = self.step_cell.check_weights(vector)  # on the grid, and the state a snapshot keeps
        if armed is not None:
            armed.after()  # after the weight check: a bit flip lands after the update, as on torch
        return StepNumbers(LOSS_NAMES, send(components, vector), dropped)

    @contextlib.contextmanager
    def _compile_cache(self):
        """With NANGUARD_MINDSPORE_COMPILE_CACHE=DIR, the first step's compile goes through MindSpore's
        compile cache in DIR/<key of the settings that shape the graph>. MindSpore 2.10 finds a cached
        graph by the order the process compiled it in, not by what it is: so only the train step is
        cached (the first graph a `nanguard train` process compiles), in a folder no other graph or
        config shares; everything else compiles as usual."""
        root = os.environ.get(COMPILE_CACHE)
        # MindSpore hashes the running script (sys.argv[0]) into the cache's key: none under `python -c`
        if not root or self._cached or not Path(sys.argv[0]).is_file():
            yield
            return
        self._cached = True
        settings = self.cfg.to_dict()
        for key, fields in _NOT_IN_GRAPH.items():
            if fields is None:
                settings.pop(key)
            else:
                settings[key] = {k: v for k, v in settings[key].items() if k not in fields}
        settings.update(faults=bool(self.cfg.inject), mode=self.ms.get_context("mode"), version=self.ms.__version__,
                        script=str(Path(sys.argv[0]).resolve()))  # each entry point a folder: no thrashing
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        os.environ.update(MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(Path(root) / f"train_step-{key}"))
        try:
            yield
        finally:
            for name in ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"):
                os.environ.pop(name, None)

    def arm(self, faults: StepFaults) -> None:
        from nanguard.backends.mindspore.faults import MindSporeFaults

        self._armed = MindSporeFaults(faults, self.step_cell, LOSS_NAMES) if faults else None

    # ---------------------------------------------------------------------------------------------
    # State

    def capture(self) -> dict[str, Any]:
        if not self.training:
            return {"arrays": {name: p.asnumpy().copy() for name, p in self.model.parameters_and_names()}}
        return {"arrays": self.step_cell.state_arrays(), "rng": dict(self.rng.bit_generator.state)}

    def restore(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "arrays" not in state:
            raise UserError("the checkpoint lacks the MindSpore backend's state; it is damaged or from backend=torch")
        if not self.training:
            from nanguard.backends.mindspore.convert import load_arrays

            wanted = {name for name, _ in self.model.parameters_and_names()}  # the model's Parameters keep their names
            try:
                load_arrays(self.model, {k: v for k, v in state["arrays"].items() if k in wanted})
            except ValueError:
                raise UserError(f"the checkpoint's weights do not fit model.name={self.cfg.model.name}; drop the "
                                "model.* overrides") from None
            return
        if "rng" not in state:
            raise UserError("the checkpoint lacks the MindSpore backend's state; it is damaged or from backend=torch")
        try:
            self.step_cell.load_state_arrays(state["arrays"])
        except ValueError as exc:
            raise UserError(f"the checkpoint does not fit this model ({exc}); drop the model.* overrides") from None
        self.rng.bit_generator.state = state["rng"]

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        from nanguard.backends.mindspore.checkpoint import save_checkpoint

        backend = state["backend"]
        meta = {k: v for k, v in state.items() if k != "backend"}
        meta["backend"] = {k: v for k, v in backend.items() if k != "arrays"}
        save_checkpoint(path, backend["arrays"], json.loads(json.dumps(meta, default=_json_default)))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        from nanguard.backends.mindspore.checkpoint import load_checkpoint

        arrays, meta = load_checkpoint(path)
        if not isinstance(meta.get("backend"), dict):
            raise UserError(f"{path}: cannot read this checkpoint (no backend state); it is damaged or foreign")
        state = dict(meta)
        state["backend"] = {"arrays": arrays, **meta["backend"]}
        return state

    # ---------------------------------------------------------------------------------------------
    # Replay (nanguard.explain)

    def keep_replay(self, step: int, reference: tuple[int, Any]) -> None:
        if self._noise is None:
            return
        label, snapshot = reference
        self.replay_states[step] = {"state": self.step_cell.state_arrays(), "reference": snapshot["arrays"],
                                    "reference_step": label}
        for old in sorted(self.replay_states)[:-4]:  # the run takes them at once; never pile up
            del self.replay_states[old]

    def replay_data(self, step: int, batch: Batch, *, lr: float, faults) -> bytes | None:
        from nanguard.backends.mindspore.batch import to_static
        from nanguard.backends.mindspore.faults import batch_faults
        from nanguard.backends.mindspore.replay import replay_bytes
        from nanguard.data.targets import drop_invalid_targets
        from nanguard.guard import NullInjectionLog
        from nanguard.guard.observation import json_id

        kept = self.replay_states.pop(step, None)
        noise = (self._noise or {}).get(batch.key)
        if kept is None or noise is None:
            return None
        batch, _ = drop_invalid_targets(batch)
        m = self.cfg.model
        static = to_static(batch.images, batch.boxes, batch.labels, m.min_size, m.max_size, MAX_BOXES)
        poison = np.ones(len(LOSS_NAMES), np.float32)
        if faults:
            specs = [s for s in faults.faults_at(step) if s.kind in ("nan_input", "loss_nan")]
            poison = batch_faults(StepFaults(faults, step, specs, NullInjectionLog()), static, batch.image_ids, LOSS_NAMES)
        meta = {"num_classes": self.num_classes, "lr": float(lr) if lr is not None else None, "rank": 0,
                "image_ids": [json_id(i) for i in batch.image_ids], "sizes": [list(size) for size in static.sizes],
                "annotation_ids": [[json_id(a) for a in ids][:MAX_BOXES] for ids in batch.annotation_ids]}
        return replay_bytes(step=step, state=kept["state"], reference=kept["reference"],
                            reference_step=kept["reference_step"], meta=meta,
                            batch={"images": static.images, "boxes": static.boxes, "labels": static.labels,
                                   "valid": static.valid, "noise": noise, "poison": poison})

    def replay(self, path: Path, cfg: Config):
        from nanguard.backends.mindspore.replay import replay

        return replay(self, path, cfg)

    # ---------------------------------------------------------------------------------------------
    # Evaluation and the end of a run

    @contextlib.contextmanager
    def _graph_run(self):
        """Around a compiled cell's run. For a graph run MindSpore installs its own C++ SIGINT handler,
        which ends the process by sending it SIGTERM (exit 143, no word). During the run that SIGTERM is
        a Ctrl-C (KeyboardInterrupt), and Python's SIGINT handler is put back after it: a MindSpore run
        stops as a torch run does (exit 130, "interrupted"; the folder keeps its checkpoints). Four
        syscalls, no device sync."""
        term = signal.signal(signal.SIGTERM, _interrupted)
        try:
            yield
        finally:
            if self._sigint is not None:
                signal.signal(signal.SIGINT, self._sigint)
            signal.signal(signal.SIGTERM, term)

    def predict(self, images: list[np.ndarray]) -> list[tuple]:
        from mindspore import Tensor

        from nanguard.backends.mindspore.batch import to_static

        m = self.cfg.model
        empty = [np.zeros((0, 4), np.float32)] * len(images)
        static = to_static(images, empty, [np.zeros(0, np.int64)] * len(images), m.min_size, m.max_size, 1)
        self.model.set_train(False)
        try:
            with self._graph_run():
                boxes, scores, labels, valid = (t.asnumpy() for t in self.model.detect(Tensor(static.images)))
        finally:
            self.model.set_train(True)
        return [(boxes[i][valid[i]] / np.float32(static.scales[i]), scores[i][valid[i]], labels[i][valid[i]])
                for i in range(len(images))]

    def weights(self) -> dict[str, np.ndarray]:
        return {name: p.asnumpy().copy() for name, p in self.model.parameters_and_names()}

    def runtime(self) -> dict[str, Any]:
        from nanguard.backends.mindspore import runtime

        mode = "graph" if self.ms.get_context("mode") == self.ms.GRAPH_MODE else "pynative"
        return {"backend": "mindspore", "mode": mode, **runtime.facts("CPU")}

    def close(self) -> None:
        pass


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def create(device: str | None) -> MindSporeBackend:
    return MindSporeBackend(device)

