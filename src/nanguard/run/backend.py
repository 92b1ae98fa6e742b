"""The contract between the framework-neutral run (`nanguard.run.trainer`) and a framework.

A backend builds the Faster R-CNN, runs one guarded (or plain) step on a host batch and returns the
observations the guard read, gives and takes its whole state for a checkpoint, and predicts boxes for
evaluation. Everything else — the run folder, the data and its audit, the fault plan, metrics,
incidents, the checkpoint cadence, final.json, evaluation — is the run's, the same for every backend.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Protocol

from nanguard.config import Config
from nanguard.data.coco import CocoIndex
from nanguard.data.loader import Batch
from nanguard.errors import UserError
from nanguard.explain.verdict import ReplayFacts
from nanguard.guard import FaultPlan, InjectionLog, NullInjectionLog, Observation, Outcome, PolicyState


def unreadable_unguarded(error: BaseException, image_ids: tuple) -> UserError:
    """What `Backend.skip_batch` raises with guard.enabled=false: a batch that cannot be read ends an
    unguarded run (as in a plain loop), with the fix."""
    return UserError(f"image(s) {', '.join(map(str, image_ids))}: cannot be read ({error}); with "
                     "guard.enabled=false the run stops here: run `nanguard audit` on the split")


# config `backend` -> the module whose `create(device: str | None) -> Backend` builds it
BACKENDS = {"torch": "nanguard.backends.torch.backend", "mindspore": "nanguard.backends.mindspore.backend"}


class Backend(Protocol):
    name: str
    checkpoint_suffix: str  # ".pt"

    def check_config(self, cfg: Config) -> None:
        """Refuse (UserError) settings this backend cannot train with, before anything is written."""

    def setup(self, cfg: Config, num_classes: int, *, faults: FaultPlan,
              injections: InjectionLog | NullInjectionLog) -> None:
        """Build the model for `num_classes` foreground classes, its optimizer, schedule and guard (or
        a plain step with guard.enabled=false)."""

    def setup_model(self, cfg: Config, num_classes: int, state: dict[str, Any]) -> None:
        """Only the model, with the weights of a checkpoint's backend state (for evaluation)."""

    def train_step(self, batch: Batch) -> list[Outcome]:
        """One step on a host batch (faults of the plan applied). Returns the outcomes read during it
        (a guard reads the previous step's; a plain step only every train.log_every steps)."""

    def skip_batch(self, error: BaseException, batch_key: tuple[int, int], image_ids: tuple,
                   annotation_ids: tuple) -> list[Outcome]:
        """The batch could not be read: a `model_error` incident (a plain step re-raises)."""

    def flush(self) -> list[Outcome]:
        """The pending outcome, now (before a checkpoint, at the end)."""

    @property
    def stopped(self) -> bool: ...

    @property
    def policy_state(self) -> PolicyState: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue bit-identically (model, optimizer, schedule, scaler, guard, RNG), as a
        copy that later steps do not change (it may be written some steps later)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def rebase(self, steps_done: int, state: dict[str, Any]) -> None:
        """`state` (this backend's part of a checkpoint just written, after `steps_done` steps) is now
        the state the run restarts from: the guard's base, the rollback target of last resort."""

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Write `state` (plain data and the backend's tensors) atomically to `path`."""

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Read a checkpoint safely (no code execution); UserError for a damaged or foreign file."""

    def predict(self, index: CocoIndex, *, batch_size: int, max_images: int = 0,
                skipped: list | None = None) -> list[dict[str, Any]]:
        """COCO-format detections (xywh, the dataset's category ids) for the images of `index`; the ids
        of images the model cannot take (a warning line each) are appended to `skipped`."""

    def weights_finite(self) -> bool: ...

    def runtime(self) -> dict[str, Any]:
        """Facts about the process the run trained in (framework version, device, the settings that
        change numerics or speed): final.json's `runtime`."""

    def rank_param_digests(self) -> list[str]:
        """A digest of the parameters of every rank, rank by rank (a collective: every rank calls it at
        the end of a run); one entry in one process."""

    def close(self) -> None:
        """When: once, at the end of `nanguard train` (every rank, also after an error): release what
        setup took (a distributed run's process group: left to the interpreter's exit, gloo's threads
        can abort the process, "terminate called without an active exception")."""

    # Replay (nanguard.explain): nothing of it runs unless a step is bad.

    def keep_replay_state(self, want: Callable[[Observation], bool] | None) -> None:
        """When: once, after setup. From now on, keep what a replay of a bad step needs (the state it
        ran with, its RNG) for the observations `want` says yes to; None keeps nothing."""

    def write_replay(self, step: int, batch: Batch, path: Path, *, lr: float) -> bool:
        """Write the replay file of `step` (trained on the host batch `batch`) to `path`; False when
        nothing was kept for that step."""

    def replay(self, path: Path, cfg: Config) -> ReplayFacts:
        """Replay the step of a replay file and localise what went wrong (`ReplayFacts`)."""


def create_backend(name: str, device: str | None) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"backend={name!r} is not available; choose one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as exc:
        raise UserError(f"backend={name}: its framework is not installed ({exc.name}); `make install` "
                        "installs the torch backend") from None
    return module.create(device)
