"""Fault injection specs: `nanguard train --inject SPEC` (repeatable) or `inject: [SPEC, ...]` in the
config. A product feature: it proves, on the user's own setup, that the guard catches each fault.

SPEC is `KIND@STEP[:key=value...]`, e.g. `loss_nan@120:component=loss_box_reg`,
`grad_nan@50:every=100:count=3`, `nan_input@10:prob=0.1`, `lr_spike@300:factor=1000`,
`weight_bitflip@400`, `zero_box@30:rank=1`.

Keys every kind takes:
    every=N   repeat every N steps from STEP on
    count=N   fire at most N times (default 1 with neither every nor prob, else unlimited);
              count alone repeats on consecutive steps (every=1)
    prob=P    at each eligible step >= STEP, fire with probability P (0 < P <= 1); eligible steps are
              every step, or the `every` grid when every is given
    rank=R    fire on rank R only (default 0: one fault, not one per GPU)
Draws are deterministic from (seed, spec index, step): a hash, never a global RNG, so every rank and
every rerun agree.

This module parses and schedules; the backend does the tensor work for each kind (see `FAULT_KINDS`).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nanguard.errors import UserError
from nanguard.fileio import append_jsonl, json_safe, read_jsonl
from nanguard.guard.observation import LOSS_COMPONENTS, json_id

SPEC_FORMAT = "KIND@STEP[:key=value...], e.g. loss_nan@120:component=loss_box_reg"


@dataclass(frozen=True)
class Param:
    """One key=value a fault kind takes: how to parse it, its default, and what is allowed."""

    parse: Callable[[str], Any]
    default: Any
    allowed: str  # for the error message: "an integer >= 1", "one of ..."


@dataclass(frozen=True)
class FaultKind:
    name: str
    description: str
    params: dict[str, Param] = field(default_factory=dict)
    requires_amp: str | None = None  # train.amp the kind needs


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError
        return value
    return parse


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError
        return text
    return parse


def _bit(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 31:
        raise ValueError
    return value


COMMON_PARAMS: dict[str, Param] = {
    "every": Param(_int_at_least(1), None, "an integer >= 1"),
    "count": Param(_int_at_least(1), None, "an integer >= 1"),
    "prob": Param(_probability, None, "a probability in (0, 1]"),
    "rank": Param(_int_at_least(0), 0, "an integer >= 0"),
}
_NONFINITE = _one_of("nan", "inf", "-inf")
_VALUE = Param(_NONFINITE, "nan", "one of nan, inf, -inf")

FAULT_KINDS: dict[str, FaultKind] = {}


def register_fault_kind(kind: FaultKind) -> FaultKind:
    """Add a kind to the registry (by name; a second kind with the same name is a bug)."""
    if kind.name in FAULT_KINDS:
        raise ValueError(f"fault kind {kind.name!r} registered twice")
    clash = set(kind.params) & set(COMMON_PARAMS)
    if clash:
        raise ValueError(f"fault kind {kind.name!r} redefines common keys {sorted(clash)}")
    FAULT_KINDS[kind.name] = kind
    return kind


for _kind in (
    FaultKind("nan_input", "NaN (or value=inf) pixels in one image of the batch",
              {"value": _VALUE}),
    FaultKind("zero_box", "a zero-width target box in one image of the batch"),
    FaultKind("loss_nan", "a non-finite value in one loss component",
              {"component": Param(_one_of(*LOSS_COMPONENTS), "loss_box_reg",
                                  "one of " + ", ".join(LOSS_COMPONENTS)),
               "value": _VALUE}),
    FaultKind("grad_nan", "a non-finite value in one parameter's gradient (a transient fault)",
              {"value": _VALUE}),
    FaultKind("lr_spike", "the LR multiplied by `factor` for one step",
              {"factor": Param(_positive_float, 1000.0, "a finite number > 0")}),
    FaultKind("weight_bitflip", "flip bit `bit` (default 30, float32's top exponent bit) of one "
              "weight after the update: silent corruption",
              {"bit": Param(_bit, 30, "an integer in 0..31")}),
    FaultKind("fp16_overflow", "scale the loss so fp16 gradients overflow (needs train.amp=fp16)",
              requires_amp="fp16"),
):
    register_fault_kind(_kind)


@dataclass(frozen=True)
class FaultSpec:
    """A parsed, validated fault spec. `params` holds the kind-specific keys (defaults filled in) as
    sorted (key, value) pairs, so a spec is hashable."""

    kind: str
    step: int
    every: int | None = None
    count: int | None = None
    prob: float | None = None
    rank: int = 0
    params: tuple[tuple[str, Any], ...] = ()
    text: str = ""

    def param(self, name: str) -> Any:
        """A kind-specific value, e.g. spec.param("component")."""
        return dict(self.params)[name]

    @property
    def max_fires(self) -> int | None:
        """How many times it fires at most (None: unlimited)."""
        if self.count is not None:
            return self.count
        return 1 if self.every is None and self.prob is None else None

    @property
    def period(self) -> int | None:
        """Steps between eligible steps (None: STEP only)."""
        if self.every is not None:
            return self.every
        return 1 if (self.prob is not None or (self.count or 1) > 1) else None

    def eligible(self, step: int) -> bool:
        if step < self.step:
            return False
        period = self.period
        return step == self.step if period is None else (step - self.step) % period == 0

    def params_dict(self) -> dict[str, Any]:
        """Every key=value of the spec (for the injection log)."""
        out: dict[str, Any] = dict(self.params)
        for key in ("every", "count", "prob"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def __str__(self) -> str:
        return self.text or f"{self.kind}@{self.step}"


def _close(name: str, choices: Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"did you mean {' or '.join(matches)}? " if matches else ""


def parse_fault(spec: str) -> FaultSpec:
    """Parse and validate one SPEC; a UserError names the spec, the bad part and what is allowed."""
    text = str(spec).strip()
    head, *pairs = text.split(":")
    if "@" not in head:
        raise UserError(f"bad fault spec '{text}': expected {SPEC_FORMAT}")
    name, step_text = (part.strip() for part in head.split("@", 1))
    if name not in FAULT_KINDS:
        raise UserError(f"unknown fault kind '{name}' in fault spec '{text}': "
                        f"{_close(name, FAULT_KINDS)}known kinds: {', '.join(sorted(FAULT_KINDS))}")
    try:
        step = int(step_text)
        if step < 0:
            raise ValueError
    except ValueError:
        raise UserError(f"bad step '{step_text}' in fault spec '{text}': expected an integer >= 0"
                        f" ({SPEC_FORMAT})") from None
    kind = FAULT_KINDS[name]
    allowed = {**COMMON_PARAMS, **kind.params}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise UserError(f"bad part '{pair}' in fault spec '{text}': expected key=value; "
                            f"{name} takes {', '.join(allowed)}")
        if key not in allowed:
            raise UserError(f"unknown key '{key}' in fault spec '{text}': {_close(key, allowed)}"
                            f"{name} takes {', '.join(allowed)}")
        if key in values:
            raise UserError(f"key '{key}' given twice in fault spec '{text}'")
        try:
            values[key] = allowed[key].parse(raw)
        except ValueError:
            raise UserError(f"bad value '{raw}' for key '{key}' in fault spec '{text}': expected "
                            f"{allowed[key].allowed}") from None
    kind_params = tuple(sorted((key, values.get(key, param.default))
                               for key, param in kind.params.items()))
    return FaultSpec(kind=name, step=step, every=values.get("every"), count=values.get("count"),
                     prob=values.get("prob"), rank=values.get("rank", 0), params=kind_params,
                     text=text)


def _unit(seed: int, index: int, step: int, salt: str = "") -> float:
    """A uniform draw in [0, 1) that depends only on its arguments."""
    digest = hashlib.sha256(f"nanguard:{seed}:{index}:{step}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class FaultPlan:
    """The faults of a run and when they fire. Deterministic from (seed, spec index, step)."""

    def __init__(self, specs: Iterable[FaultSpec | str], seed: int = 0) -> None:
        self.specs: tuple[FaultSpec, ...] = tuple(
            spec if isinstance(spec, FaultSpec) else parse_fault(spec) for spec in specs)
        self.seed = int(seed)
        self._memo: dict[int, tuple[int, int]] = {}  # index -> (scanned up to step, fires before)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def check(self, *, amp: str | None) -> None:
        """UserError when a spec needs a setting the run does not have (fp16_overflow needs fp16)."""
        for spec in self.specs:
            need = FAULT_KINDS[spec.kind].requires_amp
            if need is not None and amp != need:
                raise UserError(f"fault spec '{spec}' needs train.amp={need} (the run has "
                                f"train.amp={amp}): set train.amp={need} or drop the spec")

    def _drawn(self, index: int, step: int) -> bool:
        spec = self.specs[index]
        return spec.prob is None or _unit(self.seed, index, step) < spec.prob

    def _fires_before(self, index: int, step: int) -> int:
        spec = self.specs[index]
        period = spec.period or 1
        if spec.prob is None:  # every eligible step fires: closed form
            return max(0, -(-(step - spec.step) // period))
        start, fired = self._memo.get(index, (spec.step, 0))
        if start > step:
            start, fired = spec.step, 0
        for at in range(start, step, period):
            if (at - spec.step) % period == 0 and self._drawn(index, at):
                fired += 1
        start = start + max(0, -(-(step - start) // period)) * period
        self._memo[index] = (start, fired)
        return fired

    def fires(self, index: int, step: int, rank: int = 0) -> bool:
        spec = self.specs[index]
        if spec.rank != rank or not spec.eligible(step) or not self._drawn(index, step):
            return False
        limit = spec.max_fires
        return limit is None or self._fires_before(index, step) < limit

    def faults_at(self, step: int, rank: int = 0) -> list[FaultSpec]:
        """The specs that fire at `step` on `rank`, in the order given."""
        return [spec for index, spec in enumerate(self.specs) if self.fires(index, step, rank)]

    def pick(self, spec: FaultSpec, step: int, n: int, salt: str = "") -> int:
        """A deterministic index in [0, n) for the backend's choices (which image, which parameter,
        which element), from (seed, spec index, step, salt)."""
        index = next((i for i, other in enumerate(self.specs) if other is spec),
                     self.specs.index(spec))
        return min(n - 1, int(_unit(self.seed, index, step, "pick:" + salt) * n))


class InjectionLog:
    """Appends one line per injected fault to RUN_DIR/injections.jsonl:
    {step, kind, rank, params, detail}. `detail` says what the backend did (which image, parameter,
    element), a string or a dict."""

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = False) -> None:
        """With `resume=True` the count starts from the lines already in the file (a resumed run)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = len(read_jsonl(self.path)) if resume else 0

    def record(self, step: int, spec: FaultSpec, rank: int = 0,
               detail: str | dict[str, Any] = "") -> dict[str, Any]:
        """When: right after the backend injected `spec` at `step`."""
        line = injection_line(step, spec, rank, detail)
        self.write(line)
        return line

    def write(self, line: dict[str, Any]) -> None:
        append_jsonl(self.path, line)
        self.count += 1


def injection_line(step: int, spec: FaultSpec, rank: int, detail: str | dict[str, Any]) -> dict[str, Any]:
    return json_safe({"step": int(step), "kind": spec.kind, "rank": int(rank), "params": spec.params_dict(),
                      "detail": detail})


class GatheredInjectionLog:
    """Several ranks, one writer: every rank keeps the lines of its own injections, and at each
    `flush` (every rank at the same step: the run's checkpoint steps) rank 0 writes every rank's, in
    (step, rank) order. `log`: rank 0's InjectionLog, None on the other ranks."""

    def __init__(self, log: InjectionLog | None) -> None:
        self.log, self.lines = log, []

    @property
    def count(self) -> int:
        return self.log.count if self.log is not None else 0

    def record(self, step: int, spec: FaultSpec, rank: int = 0,
               detail: str | dict[str, Any] = "") -> dict[str, Any]:
        self.lines.append(injection_line(step, spec, rank, detail))
        return self.lines[-1]

    def flush(self, gather: Callable[[Any], list[Any]]) -> None:
        """`gather(value)`: every rank's value, rank by rank (a collective: every rank calls flush)."""
        everyone, self.lines = gather(self.lines), []
        if self.log is not None:
            for line in sorted((line for lines in everyone for line in lines), key=lambda l: (l["step"], l["rank"])):
                self.log.write(line)


class NullInjectionLog:
    """Writes nothing: for runs without faults."""

    path = None
    count = 0

    def record(self, step: int, spec: FaultSpec, rank: int = 0,
               detail: str | dict[str, Any] = "") -> dict[str, Any]:
        return injection_line(step, spec, rank, detail)


def read_injections(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(path)
    return read_jsonl(path / "injections.jsonl" if path.is_dir() else path)


# The kinds the run injects itself, on the host batch and the LR factor; the rest are a backend's
# (`nanguard.run.backend.Injects`): they act on device tensors.
HOST_KINDS = frozenset({"zero_box", "lr_spike"})


@dataclass
class StepFaults:
    """The faults that fire in one step on one rank, for the code that injects them: the choices it
    makes are `pick`ed (deterministic), each injection is `record`ed in injections.jsonl."""

    plan: FaultPlan
    step: int
    specs: list[FaultSpec]
    log: Any  # InjectionLog | NullInjectionLog
    rank: int = 0

    def __bool__(self) -> bool:
        return bool(self.specs)

    def of(self, *kinds: str) -> list[FaultSpec]:
        return [spec for spec in self.specs if spec.kind in kinds]

    def pick(self, spec: FaultSpec, n: int, salt: str = "") -> int:
        return self.plan.pick(spec, self.step, n, salt)

    def record(self, spec: FaultSpec, detail: str | dict[str, Any] = "") -> None:
        self.log.record(self.step, spec, self.rank, detail)

    def device(self) -> StepFaults:
        """Only the kinds a backend injects."""
        return StepFaults(self.plan, self.step, [s for s in self.specs if s.kind not in HOST_KINDS], self.log, self.rank)


def inject_host(faults: StepFaults, batch):
    """The host-side kinds: zero_box gives one target box of the decoded batch x2 = x1 (an annotation
    gone bad; the batch is copied, never the loader's own arrays); lr_spike multiplies the step's LR.
    Returns (batch, LR multiplier for this step)."""
    for spec in faults.of("zero_box"):
        candidates = [i for i, boxes in enumerate(batch.boxes) if len(boxes)]
        if not candidates:
            continue
        i = candidates[faults.pick(spec, len(candidates), "image")]
        boxes = list(batch.boxes)
        boxes[i] = boxes[i].copy()
        j = faults.pick(spec, len(boxes[i]), "box")
        boxes[i][j, 2] = boxes[i][j, 0]  # x2 = x1: a zero-width box
        batch = replace(batch, boxes=boxes)
        faults.record(spec, {"image_id": json_id(batch.image_ids[i]), "box": j})
    factor = 1.0
    for spec in faults.of("lr_spike"):
        factor *= float(spec.param("factor"))
        faults.record(spec, {"lr_factor": factor})
    return batch, factor
