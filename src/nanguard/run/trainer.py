"""`nanguard train` for every backend: the loop, metrics, incidents, checkpoints, exact resume, the eval.

The run folder:
  config.yaml       the resolved config (also inside every checkpoint)
  audit.json        the training split's audit (data.audit=drop|strict)
  metrics.jsonl     every train.log_every steps: step, each loss component, total, lr, grad norm, img/s
  incidents.jsonl   one line per incident (the guard's decision; `diagnosis` when explained)
  incidents/<step>/ an incident's evidence: incident.json, its replay file, diagnosis.json
  injections.jsonl  what --inject did (nothing in nanguard reads it)
  checkpoints/step_XXXXXXXX.<suffix>   after XXXXXXXX steps; the newest train.keep_checkpoints kept
  eval.json, final.json, report.html

Steps are counted from 0: the observation, metrics and incident of step s describe the (s+1)-th batch;
`step_00000100` holds the state after 100 steps. Resuming from it replays nothing and skips nothing: the
data cursor and the backend's whole state (RNG, optimizer, schedule, guard) come back, so a run killed at
any moment and resumed ends bit-identical (on the CPU) to the run that was never killed.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanguard.config import Config
from nanguard.data.loader import Batch, BatchLoadError, Loader
from nanguard.data.targets import drop_invalid_targets
from nanguard.errors import UserError
from nanguard.fileio import json_safe
from nanguard.explain.diagnose import Explainer
from nanguard.guard import (
    FaultPlan,
    GatheredInjectionLog,
    IncidentLog,
    InjectionLog,
    NullIncidentLog,
    NullInjectionLog,
    Outcome,
    incident_record,
)
from nanguard.guard.driver import PolicyDriver
from nanguard.guard.faults import StepFaults, inject_host
from nanguard.guard.host import GuardHost, PlainHost, StepContext
from nanguard.progress import TrainProgress
from nanguard.run.backend import Backend, Collective, Injects, Replays, ranks_apart, weights_digest
from nanguard.run.checkpoints import Checkpoints, check_world
from nanguard.run.data import DataPaths, check_validation_split, resolve_data, training_index, validation_data
from nanguard.run.folder import RunFolder, io_error
from nanguard.run.ranks import Ranks
from nanguard.run.tensorboard import NullTensorBoard, TensorBoard


@dataclass
class Counters:
    """The run's own stateful part: where it is and how long it has trained."""

    step: int = 0
    train_seconds: float = 0.0
    world: int = 1  # the processes that trained it (`--nproc`)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "train_seconds": self.train_seconds, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_world(state, self.world)
        self.step, self.train_seconds = int(state["step"]), float(state["train_seconds"])


class Metrics:
    """metrics.jsonl: one line every train.log_every steps (and the last), with img/s since the last."""

    def __init__(self, folder: RunFolder, log_every: int, last_step: int, progress: TrainProgress,
                 tensorboard: TensorBoard | NullTensorBoard) -> None:
        self.folder, self.log_every, self.last_step, self.progress = folder, log_every, last_step, progress
        self.tensorboard = tensorboard
        self.marks: dict[int, tuple[float, int]] = {}  # step -> (time, images so far) when it had run
        self.images = 0

    def start(self, step: int) -> None:
        self.marks = {step - 1: (time.perf_counter(), 0)}
        self.last_logged = step - 1

    def ran(self, step: int, images: int) -> None:
        self.images += images
        self.marks[step] = (time.perf_counter(), self.images)

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.last_step

    def write(self, outcome: Outcome) -> None:
        obs = outcome.observation
        if not self.due(obs.step) or obs.step not in self.marks:
            return
        (t0, n0), (t1, n1) = self.marks[self.last_logged], self.marks[obs.step]
        rate = (n1 - n0) / max(t1 - t0, 1e-9)
        self.marks = {k: v for k, v in self.marks.items() if k >= obs.step}
        self.last_logged = obs.step
        line = json_safe({
            "step": obs.step, **obs.losses, "total_loss": obs.total_loss, "lr": obs.lr,
            "grad_norm": obs.grad_norm, "images_per_second": round(rate, 3), "applied": obs.applied,
            **({"loss_scale": obs.loss_scale} if obs.loss_scale is not None else {})})
        self.folder.append("metrics.jsonl", line)
        self.tensorboard.metrics(obs.step, line)
        self.progress.metrics(obs.total_loss, rate)


def train(cfg: Config, folder: RunFolder, backend: Backend, *, resuming: bool, quiet: bool,
          stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `folder` until step `stop_at` (default: train.steps; the LR
    schedule always spans train.steps, so stopping early and resuming changes nothing); returns
    final.json's content."""
    try:
        training = Training(cfg, folder, backend, resuming=resuming, quiet=quiet)
        training.loop(cfg.train.steps if stop_at is None else stop_at)
        return training.finish()
    finally:
        backend.close()


class Training:
    """One `nanguard train` process: the data, the stateful parts, the logs, the loop."""

    def __init__(self, cfg: Config, folder: RunFolder, backend: Backend, *, resuming: bool, quiet: bool) -> None:
        self.cfg, self.folder, self.backend = cfg, folder, backend
        self.ranks = Ranks.from_env()
        self.quiet = quiet or not folder.writer  # one progress bar: rank 0's
        self.counters = Counters(world=self.ranks.world)
        self.checkpoints = Checkpoints(folder.path, backend, keep=cfg.train.keep_checkpoints, writer=folder.writer)
        # read first: a resume that cannot continue (another --nproc, no checkpoint that loads) changes nothing
        state = self.checkpoints.load_newest() if resuming else None
        if state is not None:
            self.counters.load_state_dict(state["run"])
        self.paths = resolve_data(cfg, self.quiet)
        self.train_index = training_index(cfg, self.paths, folder.write_json, self.quiet)
        if len(self.train_index) < cfg.train.batch_size * self.ranks.world:
            raise UserError(f"{self.paths.train_ann}: {len(self.train_index)} images cannot fill one batch of "
                            f"train.batch_size={cfg.train.batch_size} on each of {self.ranks.world} ranks")
        if not any(len(record.boxes) for record in self.train_index.records):
            raise UserError(f"{self.paths.train_ann}: no annotation is left to train on (of "
                            f"{len(self.train_index)} images); a detector learns nothing from background alone")
        if cfg.train.eval_at_end and folder.writer:  # found now, not after the whole training
            check_validation_split(self.paths, self.train_index.category_ids)
        self.plan = FaultPlan(cfg.inject, seed=cfg.seed)
        self.plan.check(amp=cfg.train.amp)
        self.loader = Loader(self.train_index, cfg.train.batch_size, seed=cfg.seed, hflip=cfg.data.hflip,
                             prefetch=cfg.data.prefetch, cache_bytes=cfg.data.cache_mb << 20,
                             rank=self.ranks.rank, world=self.ranks.world)
        # The checkpoint's contents, declared once: save and load both loop over these parts (in this order).
        self.parts: dict[str, Any] = {"run": self.counters, "data": self.loader}
        if state is not None and tuple(state["category_ids"]) != self.train_index.category_ids:
            raise UserError(f"{self.checkpoints.loaded_from}: trained on other categories than "
                            f"{self.paths.train_ann}")
        if resuming:  # lines after the checkpoint are written again; the counters restart from the rest
            folder.truncate_logs(self.counters.step)
        self.incidents = IncidentLog(folder.path / "incidents.jsonl", resume=resuming) if folder.writer \
            else NullIncidentLog()
        log = InjectionLog(folder.path / "injections.jsonl", resume=resuming) if self.plan and folder.writer else None
        if self.plan and self.ranks.distributed and isinstance(backend, Collective):
            self.injections = GatheredInjectionLog(log)  # every rank's lines, written by rank 0 at checkpoints
        else:
            self.injections = log or NullInjectionLog()
        backend.setup(cfg, self.train_index.num_classes)
        self.guarded = cfg.guard.enabled
        # the guard's host half: the numbers read one step late, the policy and its snapshots
        self.driver = PolicyDriver(cfg.policy, None, capture=backend.capture, restore=backend.restore) \
            if self.guarded else None
        self.host = GuardHost(self.driver, cfg.guard, rank=self.ranks.rank) \
            if self.driver is not None else PlainHost(cfg.train.log_every, rank=self.ranks.rank)
        self.parts["backend"] = _Captured(backend)
        self.parts["guard"] = _PolicyPart(self.driver, self.counters)  # after the backend: it captures the base
        # a replay needs the bad rank's batch and state: across ranks, that rank hands them to rank 0
        explain = self.guarded and isinstance(backend, Replays) and (
            not self.ranks.distributed or isinstance(backend, Collective))
        self.explainer = Explainer(cfg, folder.path, backend, faults=self.plan, resume=resuming, rank=self.ranks.rank,
                                   collective=backend if self.ranks.distributed else None) if explain else None
        if self.explainer is not None and cfg.explain.keep > 0:
            self.host.keep = self._keep_replay
        if state is not None:
            for name, part in self.parts.items():
                if name != "run":
                    part.load_state_dict(state[name])
        self.pending = PendingCheckpoints(self.checkpoints, self.driver,
                                          confirm=cfg.policy.snapshot_confirm if self.guarded else 0)

    @property
    def stopped(self) -> bool:
        return self.driver is not None and self.driver.stopped

    def _keep_replay(self, obs) -> None:
        """A bad step was read: keep the state it ran with, while explain.keep allows."""
        if self.explainer.wants(obs):
            self.backend.keep_replay(obs.step, self.driver.newest_kept())

    def loop(self, total_steps: int) -> None:
        counters, loader = self.counters, self.loader
        self.progress = TrainProgress(total_steps, start=counters.step, enabled=not self.quiet)
        tensorboard = self.cfg.train.tensorboard and self.folder.writer
        self.tensorboard = TensorBoard(self.folder.path, counters.step) if tensorboard else NullTensorBoard()
        self.metrics = Metrics(self.folder, self.cfg.train.log_every, total_steps - 1, self.progress, self.tensorboard)
        started = time.perf_counter()
        self.metrics.start(counters.step)
        try:
            with self.progress, _io_errors_name_the_path(self.folder):
                while counters.step < total_steps and not self.stopped:
                    step = counters.step
                    try:
                        batch = loader.next()
                    except BatchLoadError as err:  # an unreadable image: an incident, not the end of the run
                        self.metrics.ran(step, 0)
                        if not self.guarded:  # unguarded, a batch that cannot be read ends the run
                            raise unreadable_unguarded(err.cause, err.image_ids) from None
                        if self.ranks.distributed and isinstance(self.backend, Collective):
                            # the other ranks are already in this step's collectives: take part with a
                            # placeholder whose loss is non-finite here, so every rank skips the step
                            print(f"nanguard train: rank {self.ranks.rank}, step {step}: cannot read image(s) "
                                  f"{', '.join(map(str, err.image_ids))} ({err}); every rank skips this step",
                                  file=sys.stderr)
                            self.handle(self.train_step(step, err.placeholder()))
                        else:
                            context = StepContext(tuple(err.image_ids), tuple(err.annotation_ids),
                                                  (err.key.epoch, err.key.position))
                            self.handle(self.host.failed(step, err.cause, context))
                    else:
                        outcomes = self.train_step(step, batch)
                        self.metrics.ran(step, len(batch.images))
                        self.handle(outcomes)
                    counters.step += 1
                    self.progress.advance(counters.step)
                    last = counters.step == total_steps or self.stopped
                    if counters.step % self.cfg.train.checkpoint_every == 0 or last:
                        self.handle(self.host.flush())  # a sync, once per checkpoint: the state must be final
                        if isinstance(self.injections, GatheredInjectionLog):
                            self.injections.flush(self.backend.gather)
                        counters.train_seconds += time.perf_counter() - started
                        started = time.perf_counter()
                        self.pending.add(counters.step, {
                            **{name: part.state_dict() for name, part in self.parts.items()},
                            "config": self.cfg.to_dict(), "category_ids": list(self.train_index.category_ids)},
                            now=last)
        finally:
            loader.close()
            self.tensorboard.close()

    def train_step(self, step: int, batch: Batch) -> list[Outcome]:
        """One step: the host-side faults, the targets checked, the backend's step, its numbers posted.
        Returns the outcomes read during it (guarded: the previous step's)."""
        lr_factor = self.host.lr_factor if self.guarded else 1.0
        if self.plan:
            faults = StepFaults(self.plan, step, self.plan.faults_at(step, self.ranks.rank), self.injections,
                                self.ranks.rank)
            batch, spike = inject_host(faults, batch)
            lr_factor *= spike
            if isinstance(self.backend, Injects):
                self.backend.arm(faults.device())
        if self.explainer is not None:
            self.explainer.ran(step, batch)
        checked, invalid = drop_invalid_targets(batch)
        numbers = self.backend.step(checked, lr_factor=lr_factor,
                                    check_weights=self.guarded and self.host.check_weights(step),
                                    between=self.host.read_previous if self.guarded else _nothing)
        context = StepContext(batch.image_ids, batch.annotation_ids, (batch.key.epoch, batch.key.position),
                              invalid + numbers.dropped, batch.rank_image_ids, batch.rank_annotation_ids)
        if numbers.error is not None:  # the model refused the batch: an incident (unguarded: the end)
            if not self.guarded:
                raise numbers.error
            return self.host.failed(step, numbers.error, context)
        return self.host.sent(step, numbers.names, numbers.read_values, context)

    def handle(self, outcomes: list[Outcome]) -> None:
        """The policy's outcomes: quarantine, the incident line (diagnosed first when explain.auto asks),
        metrics, checkpoint confirmation."""
        for outcome in outcomes:
            decision = outcome.decision
            if decision.quarantine:
                self.loader.quarantine(decision.quarantine)
            if decision.kinds and not decision.ignored:
                record = incident_record(outcome.observation, decision)
                diagnosis = self.explainer.explain(record) if self.explainer is not None else None
                if diagnosis is not None:
                    record["diagnosis"] = json_safe(diagnosis.to_dict())
                self.incidents.write(record)
                self.tensorboard.incident(outcome.observation.step, record)
                self.progress.incident(outcome.observation.step, decision, diagnosis)
            self.metrics.write(outcome)
            self.pending.observe(outcome)

    def finish(self) -> dict[str, Any]:
        """final.json (after the evaluation, with train.eval_at_end)."""
        cfg, backend, counters, incidents, folder = self.cfg, self.backend, self.counters, self.incidents, self.folder
        weights = backend.weights()
        final: dict[str, Any] = {
            "status": "stopped" if self.stopped else "completed",
            "steps": counters.step,
            "train_seconds": round(counters.train_seconds, 3),
            "images_per_second": round(counters.step * cfg.train.batch_size / max(counters.train_seconds, 1e-9), 3),
            **incidents.summary(),
            "injections": self.injections.count if self.plan else 0,
            "weights_finite": all(bool(np.isfinite(w).all()) for w in weights.values()),
            "runtime": backend.runtime(),
        }
        if self.stopped:
            final["verdict"] = self.driver.policy_state.stop_verdict
            final["stop_reason"] = self.driver.policy_state.stop_reason
        if self.ranks.distributed and isinstance(backend, Collective):  # the same weights: compared, never assumed
            digests = backend.gather(weights_digest(weights))
            final["rank_param_digests"] = digests
            if len(set(digests)) > 1:
                final["status"] = "diverged"
                final["verdict"] = (f"the ranks' parameters differ at the end ({len(set(digests))} distinct digests; "
                                    f"ranks {ranks_apart(digests)} differ from the majority); the run cannot "
                                    "be trusted: resume from the last checkpoint")
        if not final["weights_finite"] and final["status"] == "completed":  # never reported as a success
            final["status"] = "diverged"
            final["verdict"] = ("the weights hold NaN or Inf at the end (guard.enabled=false: nothing kept them out); "
                                "nothing trained here can be used: train again with the guard on"
                                if not cfg.guard.enabled else
                                "the weights hold NaN or Inf at the end; resume from the last checkpoint")
        if cfg.train.eval_at_end and folder.writer:
            final.update(evaluate_run(cfg, backend, self.paths, self.train_index.category_ids, self.quiet, folder))
        folder.write_json("final.json", json_safe(final))
        if folder.writer:
            self._report()
        return final

    def _report(self) -> None:
        """report.html, at the end of every run (`nanguard report` writes it again at any time)."""
        from nanguard.report.html import write_report

        try:
            path = write_report(self.folder.path)
        except UserError as err:  # e.g. a report.html the user put there: kept, the run is not failed for it
            print(f"nanguard train: warning: no report: {err}", file=sys.stderr)
        else:
            if not self.quiet:
                print(f"report: {path}", file=sys.stderr)


class PendingCheckpoints:
    """A checkpoint is a confirmed snapshot. The state after c steps is written only once the
    `confirm` steps run with it (c, c+1, ...) were healthy: an LR spike applied in the step before c
    shows only in step c's loss, and a checkpoint must never hold a ruined state. A bad step in the
    window drops it (the next one comes checkpoint_every steps later); the last checkpoint of a run is
    written at once. When one is written, the policy takes it as its base state (its older rollback
    targets go), exactly as a process that resumes from it starts: so a run resumed after a kill -9 is
    bit-identical to the one never killed, rollbacks included."""

    def __init__(self, checkpoints: Checkpoints, driver: PolicyDriver | None, confirm: int) -> None:
        self.checkpoints, self.driver, self.confirm = checkpoints, driver, confirm
        self.waiting: list[list] = []  # [steps done, state, healthy observations since], oldest first

    def add(self, steps_done: int, state: dict[str, Any], *, now: bool) -> None:
        if now or self.confirm == 0:
            self.waiting.clear()  # older ones are superseded
            self._write(steps_done, state)
        else:
            self.waiting.append([steps_done, state, 0])

    def observe(self, outcome: Outcome) -> None:
        step, bad = outcome.observation.step, outcome.decision.bad
        for entry in list(self.waiting):
            if step < entry[0]:
                continue
            if bad:
                self.waiting.remove(entry)
                continue
            entry[2] += 1
            if entry[2] >= self.confirm:
                self.waiting.remove(entry)
                self._write(entry[0], entry[1])

    def _write(self, steps_done: int, state: dict[str, Any]) -> None:
        self.checkpoints.save(steps_done, state)
        if self.driver is not None:  # the state after step steps_done - 1 is the base now
            self.driver.rebase(steps_done - 1, state["backend"])


class _Captured:
    """The backend's part of a checkpoint: its `capture()`, put back with `restore`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def state_dict(self) -> Any:
        return self.backend.capture()

    def load_state_dict(self, state: Any) -> None:
        self.backend.restore(state)


class _PolicyPart:
    """The policy's part of a checkpoint (its state and LR factor; the snapshots are not: a resumed run
    starts from the checkpoint, its base)."""

    def __init__(self, driver: PolicyDriver | None, counters: Counters) -> None:
        self.driver, self.counters = driver, counters

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict(self.counters.step) if self.driver is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.driver is not None and state:
            self.driver.load_state_dict(state, self.counters.step)


def unreadable_unguarded(error: BaseException, image_ids: tuple) -> UserError:
    """With guard.enabled=false a batch that cannot be read ends the run (as in a plain loop), with the fix."""
    return UserError(f"image(s) {', '.join(map(str, image_ids))}: cannot be read ({error}); with "
                     "guard.enabled=false the run stops here: run `nanguard audit` on the split")


def _nothing() -> None:
    pass


@contextlib.contextmanager
def _io_errors_name_the_path(folder: RunFolder):
    """An OSError while writing the run's files (a full disk, a folder made read-only) ends the run with
    one line naming the file and the cause; the checkpoints written so far resume it."""
    try:
        yield
    except OSError as exc:
        raise io_error(exc.filename or folder.path, exc, "write the run's files") from None


def evaluate_run(cfg: Config, backend: Backend, paths: DataPaths, category_ids, quiet: bool,
                 folder: RunFolder | None) -> dict[str, Any]:
    """mAP on the validation split; the 12-line table on stderr, eval.json in the run folder."""
    from nanguard.run.evaluate import evaluate

    val_index, document = validation_data(paths, category_ids)
    metrics, table, _ = evaluate(backend, val_index, document, batch_size=cfg.eval.batch_size,
                                 min_size=cfg.model.min_size, max_size=cfg.model.max_size,
                                 max_images=cfg.eval.max_images)
    if not quiet:
        print(table, file=sys.stderr)
    if folder is not None:
        folder.write_json("eval.json", json_safe(metrics))
    return {"mAP": metrics["mAP"], "mAP50": metrics["mAP50"], "mAP75": metrics["mAP75"]}
