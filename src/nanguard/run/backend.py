"""The contract between the framework-neutral run (`nanguard.run.trainer`) and a framework.

A backend builds the Faster R-CNN, runs one guarded (or plain) step on a host batch and hands back the
step's device numbers, captures and restores its state, saves and loads a checkpoint file, predicts raw
boxes, reports its runtime, closes (`Backend`). What only some backends can do is a separate small
Protocol the run checks for: `Injects` (device-side faults), `Replays` (explain), `Collective` (several
processes). Everything else — the run folder, the data and its audit, the guard's host half, the fault
plan, metrics, incidents, the checkpoint cadence, final.json, evaluation — is the run's.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections import Counter
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from nanguard.config import Config
from nanguard.data.loader import Batch
from nanguard.errors import UserError
from nanguard.explain.verdict import ReplayFacts
from nanguard.guard import FaultPlan


# config `backend` -> the module whose `create(device: str | None) -> Backend` builds it
BACKENDS = {"torch": "nanguard.backends.torch.backend", "mindspore": "nanguard.backends.mindspore.backend"}
# What a backend's framework reads from the environment once, when it is first imported (a user's own
# value wins): MindSpore's C++ log at errors only, or its warnings (a compile cache in use, side-effect
# nodes eliminated) flood a `--quiet` run's stderr. A user's own loop that imports MindSpore keeps its log.
IMPORT_ENV = {"mindspore": {"GLOG_v": "3"}}
# the module whose `launch(launcher_args) -> int` starts several processes (`nanguard train --nproc N`)
LAUNCHERS = {"torch": "nanguard.backends.torch.launch"}


@dataclass
class StepNumbers:
    """What a backend's step hands back: the step's device numbers, on their way to the host."""

    names: tuple[str, ...]  # the loss components, in the order `read_values` gives them
    read_values: Callable[[], list[float]] | None  # waits for the step's vector (`nanguard.guard.host`)
    dropped: tuple = ()  # (image id, annotation id, why) of target boxes the backend could not train on
    error: BaseException | None = None  # the model refused the batch: nothing was updated, all put back


class Backend(Protocol):
    """A backend only computes. Everything else (the one-step-late reading, the policy and its
    snapshots, faults on the host batch, checkpoint files' names and cadence, COCO conversion) is the
    run's, the same for every backend."""

    checkpoint_suffix: str  # ".pt"

    def check_config(self, cfg: Config) -> None:
        """Refuse (UserError) settings this backend cannot train with, before anything is written."""

    def setup(self, cfg: Config, num_classes: int, *, train: bool = True) -> None:
        """Build the model for `num_classes` foreground classes; with `train`, also its optimizer,
        schedule and the guarded step (or a plain one with guard.enabled=false)."""

    def step(self, batch: Batch, *, lr_factor: float, check_weights: bool,
             between: Callable[[], None]) -> StepNumbers:
        """One step on a host batch (its targets already checked): forward, backward, check, agree,
        apply unless bad. `lr_factor` multiplies the scheduled LR; `check_weights`: check the weights
        after the update. `between()` is called once the step's work is queued and before its update
        changes any state (the run reads the previous step's numbers there)."""

    def capture(self) -> Any:
        """A host copy of the whole training state (model, optimizer, schedule, scaler, the guard's
        device state, RNG) that later steps do not change: a rollback snapshot and a checkpoint's part."""

    def restore(self, state: Any) -> None:
        """Put back a `capture()` (of a model built as this one; UserError where it does not fit).
        Without `train`, only the model's weights."""

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Write `state` (plain data, and a `capture()` under "backend") atomically to `path`."""

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Read a checkpoint safely (no code execution); UserError for a damaged or foreign file."""

    def predict(self, images: list[np.ndarray]) -> list[Detections]:
        """Raw detections for [H, W, 3] uint8 images: per image, boxes [N, 4] xyxy in the image's own
        pixels (float32), scores [N], labels [N] (1-based class indices)."""

    def weights(self) -> dict[str, np.ndarray]:
        """A host copy of the model's parameters, by name (the end of a run: finite? digest)."""

    def runtime(self) -> dict[str, Any]:
        """Facts about the process the run trained in (framework version, device, the settings that
        change numerics or speed): final.json's `runtime`."""

    def close(self) -> None:
        """Once, at the end (every rank, also after an error): release what setup took."""


Detections = tuple  # (boxes [N, 4] xyxy float32, scores [N] float32, labels [N] int64)


@runtime_checkable
class Injects(Protocol):
    """A backend that injects the device-side fault kinds (`--inject`; the host-side ones, zero_box
    and lr_spike, are the run's)."""

    def arm(self, specs: list, record: Callable[[Any, dict[str, Any]], None]) -> None:
        """`specs` fire in the next `step` (each `record(spec, detail)`ed as it does)."""


@runtime_checkable
class Replays(Protocol):
    """A backend that can replay a bad step for `nanguard.explain`. Nothing of it runs unless a step is
    bad."""

    def keep_replay(self, step: int, reference: tuple[int, Any]) -> None:
        """When: as the run reads bad step `step`, before the next update. Keep the state it ran with
        (and its RNG); `reference` is the newest rollback target (label, capture) to compare it with."""

    def replay_data(self, step: int, batch: Batch, *, lr: float, faults: FaultPlan | None) -> bytes | None:
        """The contents of the replay file of `step` (trained on the host batch `batch`; the run writes
        them to RUN_DIR/incidents/<step>/replay<checkpoint_suffix>); None when nothing was kept for it."""

    def replay(self, path: Path, cfg: Config) -> ReplayFacts:
        """Replay the step of a replay file and localise what went wrong (`ReplayFacts`)."""


@runtime_checkable
class Collective(Protocol):
    """A backend that trains in several processes."""

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, rank by rank (a collective: every rank calls it)."""

    def hand_to_first(self, data: bytes | None, source: int) -> bytes | None:
        """Rank `source`'s `data` on rank 0, None on every other rank (every rank calls it; only those
        two exchange anything): a bad rank's replay data for the rank that writes the run folder."""

    def peer_lost(self, error: BaseException) -> str | None:
        """What the communication library said, in a few words, when `error` is a collective failing
        because a peer process is gone (killed, crashed); None for any other error. The run then ends
        in one line, not in the library's traceback."""


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """sha256 of a model's parameters (names and bytes, by name): equal on every rank of a healthy
    data-parallel run."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name]).tobytes())
    return digest.hexdigest()[:16]


def ranks_apart(digests: list[str]) -> list[int]:
    """The ranks whose digest differs from the one most ranks hold (a tie: the lowest rank's among the
    most common), so that one drifted rank 0 does not name every other rank."""
    counts = Counter(digests)
    reference = max(digests, key=lambda d: counts[d])  # max keeps the first of equal counts
    return [rank for rank, digest in enumerate(digests) if digest != reference]


def create_backend(name: str, device: str | None) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"backend={name!r} is not available; choose one of {', '.join(BACKENDS)}")
    for variable, value in IMPORT_ENV.get(name, {}).items():
        os.environ.setdefault(variable, value)
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as exc:
        raise UserError(f"backend={name}: its framework is not installed ({exc.name}); `make install` "
                        "installs the torch backend") from None
    return module.create(device)


def launcher(name: str):
    """The module that launches several processes of backend `name` (`launch(launcher_args) -> int`)."""
    if name not in LAUNCHERS:
        raise UserError(f"backend={name}: no launcher for several processes; use backend=torch for --nproc")
    try:
        return importlib.import_module(LAUNCHERS[name])
    except ImportError as exc:
        raise UserError(f"--nproc: torch is not installed ({exc.name}); `make install` installs it") from None
