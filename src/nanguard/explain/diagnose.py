"""Diagnosing incidents, in training and on demand (framework-neutral).

`RUN_DIR/incidents/<step>/` holds one incident's evidence:
  incident.json    its incidents.jsonl line
  replay.<suffix>  what the backend needs to replay the step (its format; see the backend's replay)
  diagnosis.json   the verdict (`nanguard.explain.verdict.Diagnosis`), once diagnosed

`Explainer` is the trainer's side: it tells the backend which bad steps to keep the state of (while
`explain.keep` allows), writes each incident's folder from the ring of recent batches (on several
ranks: the bad rank's, written by rank 0), and diagnoses the incidents `explain.auto` asks for. `nanguard diagnose RUN_DIR` runs the same diagnosis later.
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path
from typing import Any

from nanguard.config import Config
from nanguard.data.loader import Batch
from nanguard.errors import UserError
from nanguard.explain.verdict import Diagnosis, judge
from nanguard.fileio import atomic_write, atomic_write_json, json_safe
from nanguard.guard import Observation, is_bad, read_incidents

INCIDENTS_DIR = "incidents"


def incident_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / INCIDENTS_DIR / str(int(step))


def diagnose(record: dict[str, Any], folder: Path, backend, cfg: Config, *, write: bool = True,
             rank: int | None = None) -> Diagnosis:
    """Replay (when the folder holds the backend's replay file) and judge one incident; writes
    diagnosis.json into `folder` (unless `write` is false). `rank`: a distributed run's rank whose batch
    the replay file holds (by default the lowest of the record's `bad_ranks`, if any)."""
    replay_file = folder / f"replay{backend.checkpoint_suffix}"
    can_replay = hasattr(backend, "replay")
    facts = backend.replay(replay_file, cfg) if can_replay and replay_file.is_file() else None
    diagnosis = judge(record, facts, lr=cfg.train.lr, param_abs_max=cfg.guard.param_abs_max,
                      unkept=None if facts else _why_unkept(record, cfg, can_replay))
    if rank is None and record.get("bad_ranks"):
        rank = min(record["bad_ranks"])
    if rank is not None and facts is not None:
        diagnosis.rank = rank
        diagnosis.evidence.insert(0, f"replayed rank {rank}'s batch")
    if not write:
        return diagnosis
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "diagnosis.json", json_safe({"step": record["step"], **diagnosis.to_dict(),
                                                                "facts": facts.to_dict() if facts else None}))
    except (OSError, UserError) as err:  # the verdict stands; only its copy in the folder is missing
        print(f"nanguard: warning: {folder / 'diagnosis.json'} not written ({err})", file=sys.stderr)
    return diagnosis


def _why_unkept(record: dict[str, Any], cfg: Config, can_replay: bool) -> tuple[str, str]:
    """(why no replay data exists for this incident, what would give it some): raising explain.keep is
    advice only where it is what stood in the way."""
    if not can_replay:
        return (f"backend={cfg.backend} keeps no replay data yet",
                "train the same data with backend=torch to diagnose it (the same config and seed)")
    if not cfg.guard.enabled:
        return ("guard.enabled=false keeps nothing", "train with the guard on")
    if cfg.explain.keep == 0:
        return ("explain.keep=0 keeps nothing", "set explain.keep >= 1")
    return (f"the first explain.keep={cfg.explain.keep} incidents kept theirs",
            "raise explain.keep, or resume from the checkpoint before this step with explain.auto=all")


class Explainer:
    """When: the trainer calls `ran(step, batch)` after each step and `explain(record)` for each incident
    line before it is written; `explain` returns the diagnosis to add to the line (or None).

    Across ranks (`gather`: the backend's collective, every rank calls `explain` for the same records):
    the replay data of a bad step is that of the rank whose batch went bad (the lowest of `bad_ranks`;
    rank 0 for a spike of the averaged loss: the state is the same on every rank after an agreed skip),
    handed to rank 0 (point to point), which writes the incident folder and runs the diagnosis once; it
    names that rank."""

    def __init__(self, cfg: Config, run_dir: Path, backend, *, faults=None, resume: bool = False,
                 rank: int = 0, collective=None) -> None:
        self.cfg, self.run_dir, self.backend, self.faults = cfg, Path(run_dir), backend, faults
        self.rank, self.collective = rank, collective
        self.ring: deque[tuple[int, Batch]] = deque(maxlen=max(2, cfg.explain.ring))
        self.kept = 0  # bad steps whose replay data was asked for (explain.keep): the same count on every rank
        self.diagnosed_kinds: set[str] = set()
        if resume:  # go on as the run never stopped: from the lines kept (the logs are truncated first)
            for record in read_incidents(self.run_dir):
                if record.get("diagnosis"):
                    self.diagnosed_kinds.add(record["kind"])
                replay = incident_dir(self.run_dir, record["step"]) / f"replay{backend.checkpoint_suffix}"
                self.kept += replay.is_file()
            if collective is not None:  # rank 0 holds the folder: every rank counts as it does
                self.kept = collective.gather(self.kept)[0]

    def wants(self, obs: Observation) -> bool:
        """When: the run reads a bad observation. Keep the state it ran with (explain.keep; on several
        ranks, only the rank whose batch will be replayed)?"""
        return self.kept < self.cfg.explain.keep and self.rank == _culprit(obs.bad_ranks)

    def ran(self, step: int, batch: Batch) -> None:
        self.ring.append((step, batch))  # the loader's host arrays: no copy

    def explain(self, record: dict[str, Any]) -> Diagnosis | None:
        step = int(record["step"])
        folder = incident_dir(self.run_dir, step)
        culprit = _culprit(record.get("bad_ranks"))  # the rank whose batch is replayed
        data = None
        if is_bad(record.get("kinds") or []) and self.kept < self.cfg.explain.keep:  # the same on every rank
            self.kept += 1
            if self.rank == culprit:
                data = self._replay_data(step, record)
            if self.collective is not None:
                data = self.collective.hand_to_first(data, culprit)
        wanted = self._wanted(record)
        if self.rank != 0:
            return None
        if data is not None:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"replay{self.backend.checkpoint_suffix}", lambda handle: handle.write(data))
        if data is not None or wanted:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / "incident.json", record)
        if not wanted:
            return None
        self.diagnosed_kinds.add(record["kind"])
        return diagnose(record, folder, self.backend, self.cfg, rank=culprit if self.collective is not None else None)

    def _replay_data(self, step: int, record: dict[str, Any]) -> bytes | None:
        """This rank's replay data of `step` (None: its batch left the ring, or nothing was kept). Never
        raises: on several ranks, rank 0 waits for it."""
        batch = next((b for s, b in self.ring if s == step), None)
        if batch is None:
            return None
        try:
            return self.backend.replay_data(step, batch, lr=record.get("lr"), faults=self.faults)
        except Exception as exc:  # the step is skipped all the same; its diagnosis says nothing was kept
            print(f"nanguard: warning: step {step}: its replay data could not be kept ({type(exc).__name__}: "
                  f"{exc})"[:400], file=sys.stderr)
            return None

    def _wanted(self, record: dict[str, Any]) -> bool:
        auto = self.cfg.explain.auto
        return auto == "all" or (auto == "first" and record.get("kind") not in self.diagnosed_kinds)


def _culprit(bad_ranks) -> int:
    """The rank whose batch a bad step's replay runs: the lowest that went bad itself (rank 0 for a spike
    of the averaged loss, and in one process)."""
    return min(bad_ranks or [0])
