"""What a backend reports for one training step.

The device computes the flags with no host synchronisation; the host reads them one step late (from
pinned memory) and builds an `Observation`. The policy (`nanguard.guard.policy.decide`) turns a sequence
of observations into actions. Nothing here knows any framework: values are plain Python floats and bools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nanguard.config import FASTER_RCNN, PROFILES, LossProfile  # noqa: F401 (settings live in the bottom layer)

LOSS_COMPONENTS: tuple[str, ...] = FASTER_RCNN.components

# The numbers of one step that a backend packs, after the loss components, into one small device
# vector and copies to the host without blocking (`Observation.from_vector` unpacks it). Flags are
# 0.0 / 1.0; the parameter flags are NaN on steps whose parameters were not checked; loss_scale is
# NaN without fp16 loss scaling. A plain (unguarded) step packs NaN for every flag it does not compute.
STEP_FIELDS: tuple[str, ...] = (
    "total_loss", "grad_norm", "lr", "loss_scale", "nonfinite_loss", "nonfinite_grad",
    "nonfinite_buffer", "loss_spike", "grad_spike", "nonfinite_param", "wild_param", "scale_overflow",
    "applied", "rank_divergence",
)



def step_vector(values: dict, missing) -> list:
    """The step's numbers in `STEP_FIELDS` order, taken by name from `values` (`missing` where a step
    does not compute one): how every backend packs its vector, and `Observation.from_vector` unpacks it.
    Plain Python, so that a MindSpore graph compiles it as it is."""
    return [values.get(name, missing) for name in STEP_FIELDS]


# Incident kinds, most severe first: the first kind an observation has is its primary kind.
# State corruption (the model itself is wrong) comes before a bad step (the update was masked).
INCIDENT_KINDS: tuple[str, ...] = (
    "nonfinite_param",
    "wild_param",
    "rank_divergence",
    "nonfinite_buffer",
    "model_error",
    "nonfinite_loss",
    "nonfinite_grad",
    "loss_scale_floor",
    "loss_spike",
    "grad_spike",
    "invalid_target",
)

# Not a bad step: target boxes that were non-finite or degenerate were dropped from the step (one bad box
# costs one box) and the rest of the update was applied. Logged as an incident, never skipped.
NOTE_KINDS: frozenset[str] = frozenset({"invalid_target"})

# Kinds that mean the model state is already corrupted: the update happened with nothing masked (a
# flipped bit in a weight), so skipping cannot help; only a rollback can.
CORRUPTION_KINDS: frozenset[str] = frozenset({"nonfinite_param", "wild_param", "rank_divergence"})


def is_bad(kinds) -> bool:
    """The one bad-step rule: a step is bad when one of its incident kinds is more than a note."""
    return any(kind not in NOTE_KINDS for kind in kinds)

# Kinds that point at the batch: the images in it are implicated (and counted for quarantine).
# nonfinite_buffer is one of them: it is the BatchNorm statistics this batch's forward pass wrote, and
# the backend puts them back with the rest of the step. A buffer corrupted for good makes every later
# step bad too, which the "still bad after the backoff" rule turns into a rollback.
DATA_KINDS: frozenset[str] = frozenset(
    {"model_error", "nonfinite_loss", "nonfinite_grad", "nonfinite_buffer", "loss_spike", "grad_spike"}
)


@dataclass(frozen=True)
class Observation:
    """One training step as the host sees it, one step after the device ran it.

    `step` is the iteration index, which is also the data position: steps only go up, including across
    a rollback (the data window after the snapshot is skipped, not replayed).
    Loss values and `grad_norm` (the global norm before clipping) may be nan/inf.
    `nonfinite_param` / `wild_param` are None when parameters were not checked this step.
    `wild_param`: a finite parameter whose abs max exceeds a bound (silent corruption, e.g. a bit flip).
    `scale_overflow`: the fp16 GradScaler found an inf and backed off; normal, not an incident by itself.
    `applied`: the device applied the update (False for a masked step).
    """

    step: int
    losses: dict[str, float] = field(default_factory=dict)
    total_loss: float = 0.0
    grad_norm: float = 0.0
    lr: float = 0.0
    loss_scale: float | None = None
    nonfinite_loss: bool = False
    nonfinite_grad: bool = False
    nonfinite_param: bool | None = None
    nonfinite_buffer: bool = False
    loss_spike: bool = False
    grad_spike: bool = False
    wild_param: bool | None = None
    model_error: str | None = None
    rank_divergence: bool | None = None  # distributed: the ranks' parameters differ (None: not compared)
    scale_overflow: bool = False
    applied: bool = True
    image_ids: tuple = ()
    annotation_ids: tuple = ()  # one tuple per image, aligned with image_ids
    rank: int = 0
    batch: tuple[int, int] | None = None  # (epoch, position): the loader rebuilds the batch from it
    invalid_targets: tuple = ()  # (image id, annotation id, why) of target boxes dropped from the step
    bad_ranks: tuple = ()  # distributed: the ranks whose own loss, gradients or buffers went bad

    def __post_init__(self) -> None:
        # Ids go into JSON and checkpoints: plain ints or strings, in a tuple (a list, or a numpy
        # integer from a loader, would not survive strict JSON or hashing).
        for name in ("image_ids", "annotation_ids", "invalid_targets"):
            object.__setattr__(self, name, tuple(json_id(i) for i in getattr(self, name)))

    @classmethod
    def from_vector(cls, step: int, names: tuple[str, ...], values: list[float], **context: Any) -> Observation:
        """Unpack a backend's step vector: `values` is the loss components (in `names` order), then
        `STEP_FIELDS`, then (distributed) one flag per rank. `context`: image_ids, annotation_ids, rank,
        batch, invalid_targets."""
        losses = dict(zip(names, values[:len(names)]))
        f = dict(zip(STEP_FIELDS, values[len(names):]))
        rank_flags = values[len(names) + len(STEP_FIELDS):]  # one per rank, in a distributed run
        context.setdefault("bad_ranks", tuple(r for r, v in enumerate(rank_flags) if v > 0.5))
        flag = {k: v > 0.5 for k, v in f.items()}  # NaN > 0.5 is False: a flag not computed is not set
        checked = not math.isnan(f["nonfinite_param"])
        return cls(
            step=step, losses=losses, total_loss=f["total_loss"], grad_norm=f["grad_norm"], lr=f["lr"],
            loss_scale=None if math.isnan(f["loss_scale"]) else f["loss_scale"],
            nonfinite_loss=flag["nonfinite_loss"], nonfinite_grad=flag["nonfinite_grad"],
            nonfinite_buffer=flag["nonfinite_buffer"], loss_spike=flag["loss_spike"],
            grad_spike=flag["grad_spike"],
            nonfinite_param=flag["nonfinite_param"] if checked else None,
            wild_param=flag["wild_param"] if checked else None,
            rank_divergence=flag["rank_divergence"] if not math.isnan(f["rank_divergence"]) else None,
            scale_overflow=flag["scale_overflow"], applied=flag["applied"], **context)

    def kinds(self, min_loss_scale: float | None = None) -> list[str]:
        """Incident kinds of this step, most severe first (order of `INCIDENT_KINDS`).

        `loss_scale_floor` is only judged when `min_loss_scale` is given (the policy passes its
        `PolicyConfig.min_loss_scale`): an fp16 loss scale below it means gradients overflow even at a
        tiny scale. `scale_overflow` alone is never a kind: it is the scaler's normal back-off.
        """
        found = {
            "nonfinite_param": self.nonfinite_param is True,
            "wild_param": self.wild_param is True,
            "rank_divergence": self.rank_divergence is True,
            "nonfinite_buffer": self.nonfinite_buffer,
            "model_error": self.model_error is not None,
            "nonfinite_loss": self.nonfinite_loss,
            "nonfinite_grad": self.nonfinite_grad,
            "loss_scale_floor": (
                min_loss_scale is not None
                and self.loss_scale is not None
                and self.loss_scale < min_loss_scale
            ),
            "loss_spike": self.loss_spike,
            "grad_spike": self.grad_spike,
            "invalid_target": bool(self.invalid_targets),
        }
        return [kind for kind in INCIDENT_KINDS if found[kind]]

    def bad(self, min_loss_scale: float | None = None) -> bool:
        """Any incident flag that makes this a bad step (not a mere note such as invalid_target);
        `loss_scale_floor` is judged only with the policy's `min_loss_scale`."""
        return is_bad(self.kinds(min_loss_scale))

    @property
    def params_checked(self) -> bool:
        return self.nonfinite_param is not None

    def nonfinite_components(self) -> list[str]:
        """Loss components whose value is nan/inf: the four known ones in their order, then others."""
        names = [name for name in LOSS_COMPONENTS if name in self.losses]
        names += sorted(name for name in self.losses if name not in LOSS_COMPONENTS)
        return [name for name in names if not _finite(self.losses[name])]

    def describe(self, kinds: list[str] | None = None, min_loss_scale: float | None = None) -> str:
        """What was seen, as the start of a decision's reason: "step 12: non-finite loss
        (loss_box_reg=nan), non-finite gradient (grad_norm=inf)"."""
        phrases = {
            "nonfinite_param": "non-finite parameter",
            "wild_param": "parameter beyond the wild bound (silent corruption)",
            "rank_divergence": f"the ranks' parameters differ (rank(s) {', '.join(map(str, self.bad_ranks))} apart)",
            "nonfinite_buffer": "non-finite buffer",
            "model_error": f"model error: {self.model_error}",
            "nonfinite_grad": f"non-finite gradient (grad_norm={_fmt(self.grad_norm)})",
            "loss_spike": f"loss spike (total_loss={_fmt(self.total_loss)})",
            "grad_spike": f"gradient-norm spike (grad_norm={_fmt(self.grad_norm)})",
            "loss_scale_floor": (f"fp16 loss scale {_fmt(self.loss_scale)} below "
                                 f"min_loss_scale={_fmt(min_loss_scale)}"),
            "invalid_target": (f"{len(self.invalid_targets)} invalid target box(es) dropped from the step "
                               f"({'; '.join(f'image {i} annotation {a}: {why}' for i, a, why in self.invalid_targets[:3])}"
                               f"{'; ...' if len(self.invalid_targets) > 3 else ''})"),
        }
        components = ", ".join(f"{name}={_fmt(self.losses[name])}"
                               for name in self.nonfinite_components())
        phrases["nonfinite_loss"] = (
            f"non-finite loss ({components or f'total_loss={_fmt(self.total_loss)}'})")
        kinds = self.kinds(min_loss_scale) if kinds is None else kinds
        return f"step {self.step}: " + (", ".join(phrases[k] for k in kinds) or "healthy")

    def values(self) -> dict[str, Any]:
        """The observed numbers (may be nan/inf: pass through `fileio.json_safe` before writing)."""
        out: dict[str, Any] = dict(self.losses)
        out["total_loss"] = self.total_loss
        out["grad_norm"] = self.grad_norm
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale
        return out


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def json_id(value: Any) -> int | str | tuple:
    """An id as nanguard writes it into JSON and checkpoints: ints and strings as they are, a numpy
    integer as an int, groups (the annotation ids of an image) as tuples, anything else as text."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    if isinstance(value, (tuple, list)):  # annotation ids come grouped per image, aligned with image_ids
        return tuple(json_id(v) for v in value)
    if hasattr(value, "__index__"):
        return int(value.__index__())
    return str(value)
