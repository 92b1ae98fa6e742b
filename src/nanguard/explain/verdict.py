"""From evidence to a verdict: what went wrong in a bad step and what to change. Framework-free.

A backend replays the step (`nanguard.backends.<name>.replay`) and reports `ReplayFacts`: whether the
step reproduced, the first op and module that made a non-finite value, which images fail alone and
what their pixels and boxes look like, what the state it ran with holds, and how the same batch does on
an older healthy state or in full precision. `judge` turns the incident record and those facts into a
`Diagnosis`. It never reads injections.jsonl: the verdict is what the evidence shows.

The vocabulary is the contract (`VERDICTS`):
  bad_annotation     a target box that is non-finite, degenerate or absurd (names the annotation ids)
  bad_image          pixels that are non-finite or constant, or an image that cannot be read
  lr_divergence      the state grew bad through updates: the same batch is healthy on an older state,
                     or most of the weights are non-finite or absurd
  fp16_overflow      non-finite in fp16, finite in float32
  corrupted_weights  a handful of parameter elements are non-finite or absurd (a flipped bit)
  transient          the step does not reproduce (hardware, non-determinism)
  numerical_op       the model or a loss makes a non-finite value from finite, sane inputs (a bug)
  unknown            nothing above fits, or nothing was kept to replay
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from nanguard.guard.observation import FASTER_RCNN, is_bad

VERDICTS: tuple[str, ...] = ("bad_annotation", "bad_image", "lr_divergence", "fp16_overflow",
                             "corrupted_weights", "transient", "numerical_op", "unknown")
PHASES: tuple[str, ...] = ("data", "forward", "backward", "optimizer")

# A flipped bit touches one element; an LR blow-up moves every weight. Between the two: this many.
FEW_ELEMENTS = 16


@dataclass
class OpSite:
    """Where a non-finite value appeared: the op, the module it ran in (dotted path, "" outside the
    model), the phase, and whether the op's inputs were finite (False: it only passed one on)."""

    op: str
    module: str
    phase: str  # forward | backward
    inputs_finite: bool = True


@dataclass
class ImageFacts:
    """One image of the replayed batch, as the model received it."""

    image_id: Any
    annotation_ids: tuple = ()
    fails_alone: bool | None = None  # its own forward + backward is non-finite (None: not tried)
    loss_alone: float | None = None
    nonfinite_pixels: int = 0
    pixel_std: float = 1.0
    bad_boxes: list[tuple[Any, str]] = field(default_factory=list)  # (annotation id, why)
    nonfinite_targets: int = 0  # non-finite values in what the model received beside its input (own loop)


@dataclass
class ReplayFacts:
    replays: int  # how often the step was run again
    reproduced: bool  # non-finite or a spike again, every time
    same_every_time: bool  # the replays agree bit for bit
    losses: dict[str, float] = field(default_factory=dict)
    grad_norm: float = math.nan
    nonfinite_components: list[str] = field(default_factory=list)
    spike: bool = False  # a loss or gradient-norm spike against the guard's history at that step
    forward: OpSite | None = None  # first non-finite value in the forward pass (loss included)
    backward: OpSite | None = None
    images: list[ImageFacts] = field(default_factory=list)
    state_nonfinite: int = 0  # elements of the state the step ran with that are non-finite ...
    state_wild: int = 0  # ... or finite beyond guard.param_abs_max
    state_tensors: list[str] = field(default_factory=list)  # the parameters / buffers holding them
    reference_step: int | None = None  # an older healthy state: the newest confirmed snapshot
    reference_ok: bool | None = None  # the same batch on it is healthy
    weight_change: float | None = None  # |w - w_reference| / |w_reference|
    amp: str = "off"
    full_precision_ok: bool | None = None  # with amp: the same step in float32 is healthy
    error: str | None = None  # the replayed step raised this (the model refused the batch, or a broken replay)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplayFacts:
        data = dict(data)
        for key in ("forward", "backward"):
            data[key] = OpSite(**data[key]) if data.get(key) else None
        data["images"] = [ImageFacts(**{**image, "annotation_ids": tuple(image.get("annotation_ids", ())),
                                        "bad_boxes": [tuple(b) for b in image.get("bad_boxes", [])]})
                          for image in data.get("images", [])]
        return cls(**data)


@dataclass
class Diagnosis:
    verdict: str
    reproduced: bool | None = None
    phase: str | None = None
    first_op: str | None = None
    module: str | None = None
    loss_component: str | None = None
    image_ids: list = field(default_factory=list)
    annotation_ids: list = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    advice: str = ""
    seconds: float = 0.0
    rank: int | None = None  # a distributed run: the rank whose batch was replayed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, step: int) -> str:
        """One terminal line: 'step 41 diagnosed: bad_image (image 17): drop image 17 ...' ('(rank 1,
        image 17)' on a distributed run)."""
        named = [f"annotation {', '.join(map(str, self.annotation_ids[:4]))}"] if self.annotation_ids else \
            [f"image {', '.join(map(str, self.image_ids[:4]))}"] if self.image_ids else []
        if self.rank is not None:
            named.insert(0, f"rank {self.rank}")
        culprits = f" ({', '.join(named)})" if named else ""
        where = f" at {self.module or self.first_op}" if self.verdict == "numerical_op" and (self.module or self.first_op) else ""
        return f"step {step} diagnosed: {self.verdict}{culprits}{where}: {self.advice}"


def judge(record: dict[str, Any], facts: ReplayFacts | None, *, lr: float | None = None,
          param_abs_max: float = 1.0e4, unkept: tuple[str, str] | None = None) -> Diagnosis:
    """The verdict on one incident (`record`: its incidents.jsonl line) from the replay's `facts`
    (None: nothing was kept to replay; `unkept` then says why and what would keep it). `lr`: the
    configured train.lr, for the advice."""
    kinds = list(record.get("kinds") or [])
    if kinds and not is_bad(kinds):
        return _invalid_targets(record)
    if "model_error" in kinds and facts is None:
        return _model_error(record)
    if facts is None:
        why, advice = unkept or ("explain.keep, or an incident the trainer did not see",
                                 "raise explain.keep, or resume from the checkpoint before this step with "
                                 "explain.auto=all to diagnose it")
        return Diagnosis("unknown", evidence=[f"nothing was kept to replay this step ({why})"], advice=advice)
    diagnosis = _judge_replay(record, facts, lr, param_abs_max)
    diagnosis.reproduced = facts.reproduced
    diagnosis.seconds = round(facts.seconds, 3)
    return diagnosis


def _invalid_targets(record: dict[str, Any]) -> Diagnosis:
    dropped = record.get("invalid_targets") or []
    first = dropped[0] if dropped else {"image_id": None, "annotation_id": None, "why": "?"}
    return Diagnosis(
        "bad_annotation", reproduced=None, phase="data",
        image_ids=_unique(d["image_id"] for d in dropped), annotation_ids=_unique(d["annotation_id"] for d in dropped),
        evidence=[f"annotation {d['annotation_id']} of image {d['image_id']}: {d['why']}" for d in dropped[:5]],
        advice=f"drop annotation {first['annotation_id']} of image {first['image_id']} ({first['why']}), or clean the "
               "split with `nanguard audit ANN.json --fix CLEAN.json` (data.audit=drop does it in memory)")


def _model_error(record: dict[str, Any]) -> Diagnosis:
    message = str(record.get("model_error") or "")
    images = list(record.get("image_ids") or [])
    unreadable = any(word in message for word in ("cannot identify image", "cannot be read", "image file is truncated",
                                                  "No such file", "UnidentifiedImageError", "OSError", "decode"))
    if unreadable:
        return Diagnosis("bad_image", phase="data", image_ids=images, evidence=[message],
                         advice="re-export or drop the unreadable image(s); `nanguard audit ANN.json --images DIR` "
                                "finds every one before training")
    return Diagnosis("unknown", phase="forward", image_ids=images, evidence=[message],
                     advice="the model refused this batch; run `nanguard audit` on the split and look at these images")


def _judge_replay(record: dict[str, Any], facts: ReplayFacts, lr: float | None, param_abs_max: float) -> Diagnosis:
    """The rules in order: the state itself bad; not reproduced; the data (the images that fail alone);
    the state drifted (healthy on the older one); fp16; an op that makes non-finite values; unknown."""
    evidence = _replay_evidence(facts)
    site = facts.forward if facts.forward is not None else facts.backward
    located = dict(first_op=site.op if site else None, module=site.module or None if site else None,
                   loss_component=_first_component(facts.nonfinite_components or record.get("components") or []))
    if facts.state_nonfinite + facts.state_wild:  # a fact of the state, whether or not the step's loss showed it
        return _bad_state(record, facts, evidence, lr, param_abs_max)
    if not facts.reproduced:
        return _not_reproduced(record, facts, evidence)
    data = _bad_data(facts, evidence, located)
    if data is not None:
        return data
    if facts.reference_ok:
        evidence.append(f"the same batch is healthy on the state after step {facts.reference_step}")
        return _lr_divergence(evidence, facts, lr, record, "the state drifted since then")
    if facts.amp == "fp16" and facts.full_precision_ok:
        evidence.append("the same step in float32 is healthy")
        return Diagnosis("fp16_overflow", phase=(site.phase if site else "backward"), evidence=evidence, **located,
                         advice="keep fp16 with the loss scaler's back-off (it recovers), or train with train.amp=bf16 "
                                "(the float32 range) if it recurs")
    if site is not None and site.inputs_finite:
        evidence.append(f"{site.op} in {site.module or 'the loss'} made a non-finite value from finite inputs "
                        f"({site.phase})")
        return Diagnosis("numerical_op", phase=site.phase, evidence=evidence, **located,
                         image_ids=[image.image_id for image in facts.images if image.fails_alone], advice=(
                             f"{site.op} in {site.module or 'the loss computation'} makes a non-finite value from finite, "
                             "sane inputs: a numerical bug; guard it (a floor before log / division, a clamp before "
                             "exp) or report it with this incident folder"))
    return Diagnosis("unknown", phase=site.phase if site else None, evidence=evidence, **located,
                     advice="it reproduces but no cause stands out; inspect RUN_DIR/incidents/<step>/ with "
                            "`nanguard diagnose RUN --incident STEP --json`")


def _not_reproduced(record: dict[str, Any], facts: ReplayFacts, evidence: list[str]) -> Diagnosis:
    if "loss_scale_floor" in (record.get("kinds") or []):
        scale = (record.get("values") or {}).get("loss_scale")
        evidence.append(f"the fp16 loss scale is {scale} (below policy.min_loss_scale) after earlier overflows; "
                        "this step no longer overflows")
        return Diagnosis("fp16_overflow", phase="backward", evidence=evidence, advice=(
            "fp16 gradients overflowed step after step until the loss scale fell below policy.min_loss_scale; train "
            "with train.amp=bf16 (the float32 range), or lower policy.min_loss_scale if the scale recovers"))
    return Diagnosis("transient", phase=None, evidence=evidence, advice=(
        f"nothing in the data or the state reproduces it ({facts.replays} replays healthy): a transient fault "
        "(hardware or non-determinism); training went on. If it recurs on one machine, test that GPU "
        "(e.g. nvidia-smi -q -d ECC, or swap the device)"))


def _bad_state(record: dict[str, Any], facts: ReplayFacts, evidence: list[str], lr: float | None,
               param_abs_max: float) -> Diagnosis:
    """A flipped bit touches a handful of elements and leaves the rest where it was; an LR blow-up
    moves every weight."""
    bad_elements = facts.state_nonfinite + facts.state_wild
    names = ", ".join(facts.state_tensors[:3])
    evidence.append(f"the state it ran with holds {facts.state_nonfinite} non-finite and {facts.state_wild} "
                    f"elements beyond {param_abs_max:g} (in {names})")
    spread = facts.weight_change is not None and facts.weight_change > 0.5
    if bad_elements <= FEW_ELEMENTS and not spread:
        return Diagnosis("corrupted_weights", phase="optimizer", module=facts.state_tensors[0] if facts.state_tensors else None,
                         evidence=evidence, advice=(
                             f"{bad_elements} weight element(s) in {names} went bad between two healthy steps, not "
                             "through the loss: a memory or hardware fault; the rollback restored them. If it "
                             "recurs, run a memory test on that GPU (or enable ECC)"))
    return _lr_divergence(evidence, facts, lr, record, "the weights themselves went bad")


def _bad_data(facts: ReplayFacts, evidence: list[str], located: dict[str, Any]) -> Diagnosis | None:
    """The images that fail alone (all of them when none was run alone): their pixels, then their boxes."""
    culprits = [image for image in facts.images if image.fails_alone] or \
        [image for image in facts.images if image.fails_alone is None]
    pixels = [image for image in culprits if image.nonfinite_pixels or image.pixel_std == 0.0]
    if pixels:
        for image in pixels:
            evidence.append(f"image {image.image_id}: " + (f"{image.nonfinite_pixels} non-finite pixel values"
                                                             if image.nonfinite_pixels else "every pixel the same"))
        ids = [image.image_id for image in pixels]
        return Diagnosis("bad_image", phase="data", image_ids=ids, evidence=evidence, **located, advice=(
            f"drop or re-export image {ids[0]}" + (f" (and {len(ids) - 1} more)" if len(ids) > 1 else "")
            + "; its input is non-finite or constant before the first layer (check the decoder and any "
            "per-image normalisation)"))
    targets = [image for image in culprits if image.nonfinite_targets and not image.bad_boxes]
    if targets:
        ids = [image.image_id for image in targets]
        evidence += [f"sample {image.image_id}: {image.nonfinite_targets} non-finite target values"
                     for image in targets[:5]]
        return Diagnosis("bad_annotation", phase="data", image_ids=ids, evidence=evidence, **located, advice=(
            f"fix or drop the targets of sample {ids[0]}" + (f" (and {len(ids) - 1} more)" if len(ids) > 1 else "")
            + ": they hold non-finite values before the first layer"))
    boxes = [image for image in culprits if image.bad_boxes]
    if not boxes:
        return None
    annotations = [ann for image in boxes for ann, _ in image.bad_boxes]
    for image in boxes:
        evidence += [f"annotation {ann} of image {image.image_id}: {why}" for ann, why in image.bad_boxes[:3]]
    return Diagnosis("bad_annotation", phase="data", image_ids=[image.image_id for image in boxes],
                     annotation_ids=annotations, evidence=evidence, **located, advice=(
                         f"drop annotation {annotations[0]} of image {boxes[0].image_id}, or clean the split with "
                         "`nanguard audit ANN.json --fix CLEAN.json`"))


def _lr_divergence(evidence: list[str], facts: ReplayFacts, lr: float | None, record: dict[str, Any], why: str,
                   phase: str = "optimizer") -> Diagnosis:
    values = record.get("values") or {}
    ratio = ""
    loss, grad = _number(values.get("total_loss")), _number(values.get("grad_norm"))
    if facts.weight_change is not None:
        evidence.append(f"the weights moved {facts.weight_change:.3g}x their norm since step {facts.reference_step}")
    if math.isfinite(loss):
        ratio = f": the loss reached {loss:.4g}"
    elif math.isfinite(grad):
        ratio = f": the gradient norm reached {grad:.4g}"
    step_lr = _number(record.get("lr"))
    current = lr if lr is not None else step_lr
    advice = ("lower train.lr" + (f" from {current:g} (e.g. to {current / 4:g})" if current and math.isfinite(current) else "")
              + f"{ratio}; or lengthen train.warmup_steps / lower guard.clip_norm. {why.capitalize()}.")
    return Diagnosis("lr_divergence", phase=phase, evidence=evidence, advice=advice,
                     loss_component=_first_component(facts.nonfinite_components))


def _replay_evidence(facts: ReplayFacts) -> list[str]:
    runs = f"{facts.replays} replay(s)"
    if not facts.reproduced:
        return [f"{runs}: healthy (total_loss={_fmt(facts.losses.get('total_loss', math.nan))}, "
                f"grad_norm={_fmt(facts.grad_norm)})"]
    what = (f"non-finite {', '.join(facts.nonfinite_components)}" if facts.nonfinite_components
            else "a spike" if facts.spike else f"non-finite gradients (grad_norm={_fmt(facts.grad_norm)})")
    same = "bit-identical" if facts.same_every_time else "not bit-identical"
    out = [f"{runs}: {what} every time ({same})"]
    if facts.error:
        out.append(f"the replayed step raised {facts.error}")
    for site in (facts.forward, facts.backward):
        if site is not None:
            out.append(f"first non-finite {site.phase} value: {site.op} in {site.module or 'the loss'}"
                       + ("" if site.inputs_finite else " (its inputs were already non-finite)"))
    return out


def _first_component(components: list[str]) -> str | None:
    order = [name for name in FASTER_RCNN.components if name in components] + \
        [name for name in components if name not in FASTER_RCNN.components]
    return order[0] if order else None


def _unique(values) -> list:
    out: list = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any) -> str:
    number = _number(value)
    return f"{number:.4g}" if not math.isnan(number) or value is not None else "?"
