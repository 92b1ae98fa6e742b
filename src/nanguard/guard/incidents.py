"""Incident records and their JSONL log (RUN_DIR/incidents.jsonl).

One line per bad step (an incident), written when the policy has decided on it:

    step            int
    kind            the primary incident kind (the most severe, see observation.INCIDENT_KINDS)
    kinds           every incident kind of the step, most severe first
    components      the loss components that were non-finite
    values          the observed numbers: each loss component, total_loss, grad_norm, loss_scale;
                    non-finite numbers as the strings "nan", "inf", "-inf"
    image_ids, annotation_ids
    lr              the LR the step ran with ("nan"/"inf" strings if non-finite)
    lr_factor       the LR multiplier from now on
    action          none, skip, quarantine, lr_backoff, rollback, stop (the strongest)
    reason          the policy's sentence, verbatim
    verdict         with stop: what most likely went wrong and what to change; else null
    quarantined     image ids quarantined by this decision
    rollback_to_step, model_error, applied, rank
    bad_ranks       a distributed run: the ranks whose own loss, gradients or buffers went bad ([] for
                    a spike of the averaged loss, and in one process)
    restored_step   with rollback: the state restored is the one right after this step's update
                    (-1: the state before the first step); null otherwise
    batch           {"epoch", "position"} of the step's batch (the loader rebuilds it), or null
    invalid_targets [{"image_id", "annotation_id", "why"}] target boxes dropped from the step
    diagnosis       (the trainer's, or the own-loop guard's with replay=) null or the verdict of
                    `nanguard.explain`: verdict, reproduced, phase, first_op, module, loss_component,
                    image_ids, annotation_ids, evidence, advice, seconds, rank (a distributed run's
                    rank whose batch was replayed, else null)

Healthy steps and observations the policy ignored (lag after a rollback) are not written.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from nanguard.fileio import append_jsonl, json_safe, read_jsonl
from nanguard.guard.observation import Observation
from nanguard.guard.policy import Decision

INCIDENTS_FILE = "incidents.jsonl"


def incident_record(obs: Observation, decision: Decision) -> dict[str, Any]:
    """The JSON-safe line for one incident (see the module docstring for the fields)."""
    kinds = list(decision.kinds) or obs.kinds()
    return json_safe({
        "step": obs.step,
        "kind": kinds[0] if kinds else None,
        "kinds": kinds,
        "components": obs.nonfinite_components(),
        "values": obs.values(),
        "image_ids": list(obs.image_ids),
        "annotation_ids": list(obs.annotation_ids),
        "lr": float(obs.lr),
        "lr_factor": decision.lr_factor,
        "action": decision.action,
        "reason": decision.reason,
        "verdict": decision.verdict,
        "quarantined": list(decision.quarantine),
        "rollback_to_step": decision.rollback_to_step,
        "restored_step": decision.rollback_to_step if decision.action == "rollback" else None,
        "batch": {"epoch": obs.batch[0], "position": obs.batch[1]} if obs.batch is not None else None,
        "invalid_targets": [{"image_id": i, "annotation_id": a, "why": why} for i, a, why in obs.invalid_targets],
        "model_error": obs.model_error,
        "applied": obs.applied,
        "rank": obs.rank,
        "bad_ranks": list(obs.bad_ranks),
    })


class _Counters:
    """The summary counters shared by the real and the null log."""

    def __init__(self) -> None:
        self.skipped_steps = 0
        self.rollbacks = 0
        self.incidents = 0
        self.incidents_by_kind: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.quarantined: list[Any] = []
        self.stopped = False
        self.verdict: str | None = None
        self.diagnoses: Counter[str] = Counter()

    def count(self, record: dict[str, Any]) -> None:
        self.incidents += 1
        self.incidents_by_kind.update(record.get("kinds") or [])
        self.actions[record["action"]] += 1
        if not record.get("applied", False):
            self.skipped_steps += 1
        if record["action"] == "rollback":
            self.rollbacks += 1
        if record["action"] == "stop":
            self.stopped = True
            self.verdict = record.get("verdict")
        if record.get("diagnosis"):
            self.diagnoses[record["diagnosis"]["verdict"]] += 1
        for image_id in record.get("quarantined") or []:
            if image_id not in self.quarantined:
                self.quarantined.append(image_id)

    def summary(self) -> dict[str, Any]:
        """Counters for final.json."""
        return {
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "incidents": self.incidents,
            "incidents_by_kind": dict(sorted(self.incidents_by_kind.items())),
            "actions": dict(sorted(self.actions.items())),
            "quarantined": list(self.quarantined),
            "stopped": self.stopped,
            "verdict": self.verdict,
            "diagnoses": dict(sorted(self.diagnoses.items())),
        }


class IncidentLog(_Counters):
    """Appends one strict-JSON line per incident to `path` (usually RUN_DIR/incidents.jsonl).

    With `resume=True` the counters start from the lines already in the file (a resumed run);
    otherwise an existing file is appended to but not counted.
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            for record in read_jsonl(self.path):
                self.count(record)

    def record(self, obs: Observation, decision: Decision) -> dict[str, Any] | None:
        """When: after `policy.decide` for every observation. Writes a line if the step was an
        incident (and not ignored); returns the record written, or None."""
        if decision.ignored or not decision.kinds:  # healthy, lagging, or a repeated stop
            return None
        return self.write(incident_record(obs, decision))

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append a record made by `incident_record` (a trainer adds its `diagnosis` first)."""
        append_jsonl(self.path, record)
        self.count(record)
        return record


class NullIncidentLog(_Counters):
    """Counts like IncidentLog but writes nothing (a null object instead of `if log:`)."""

    path = None

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        self.count(record)
        return record

    def record(self, obs: Observation, decision: Decision) -> dict[str, Any] | None:
        if decision.ignored or not decision.kinds:
            return None
        record = incident_record(obs, decision)
        self.count(record)
        return record


def read_incidents(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The incident records of a log file or of a run folder (a torn last line is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / INCIDENTS_FILE
    return read_jsonl(path)
