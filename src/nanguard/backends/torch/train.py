"""`nanguard train` for PyTorch: the run folder, the loop, checkpoints, exact resume, the final eval.

The run folder:
  config.yaml       the resolved config (also inside every checkpoint)
  audit.json        the training split's audit (data.audit=drop|strict)
  metrics.jsonl     every train.log_every steps: step, each loss component, total, lr, grad norm, img/s
  incidents.jsonl   one line per incident (the guard)
  injections.jsonl  what --inject did (nothing in nanguard reads it)
  checkpoints/step_XXXXXXXX.pt   after XXXXXXXX steps; the newest train.keep_checkpoints kept
  final.json        status, steps, mAP, mAP50, mAP75, train_seconds, images_per_second, guard counters

Steps are counted from 0: the observation, metrics and incident of step s describe the (s+1)-th batch;
`step_00000100.pt` holds the state after 100 steps. Resuming from it replays nothing and skips nothing:
the data cursor, RNG states, optimizer, schedule and guard state all come back, so a run killed at any
moment and resumed ends bit-identical (on the CPU) to the run that was never killed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanguard.backends.torch import checkpoint as ckpt
from nanguard.backends.torch.data import DataPaths, resolve_data, training_index, validation_data
from nanguard.backends.torch.devicestate import LRSchedule
from nanguard.backends.torch.evaluate import evaluate
from nanguard.backends.torch.faults import TorchFaults
from nanguard.backends.torch.guard import Guard, NoFaults, Outcome
from nanguard.backends.torch.model import build_model
from nanguard.backends.torch.step import UnguardedStep, train_step
from nanguard.config import Config, config_from_dict, dump_yaml
from nanguard.data.loader import BatchLoadError, Loader
from nanguard.errors import UserError
from nanguard.fileio import append_jsonl, atomic_write_json, atomic_write_text, json_safe, read_jsonl
from nanguard.guard import FaultPlan, IncidentLog, InjectionLog, NullInjectionLog
from nanguard.progress import TrainProgress

LOG_FILES = ("metrics.jsonl", "incidents.jsonl", "injections.jsonl")


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    device: torch.device
    quiet: bool


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam/AdamW. No weight decay on norms and biases (torchvision's references'
    `norm_weight_decay=0` habit), fused where possible: fused kernels take the guard's found_inf."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = torch.tensor(t.lr)  # a tensor: the guard's schedule writes a device tensor here every step
    extra = {"fused": True} if t.fused else {"foreach": False}  # foreach Adam refuses a tensor lr
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, **extra)
    cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, **extra)


def pick_device(requested: str | None) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; use --device cpu")
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def prepare_run_dir(out: str | None, resume: str | None, cfg_factory) -> tuple[Path, Config, bool]:
    """(run folder, config, resuming?). A fresh run writes config.yaml before anything else, so even a
    run killed in its first second can be resumed."""
    if resume is not None:
        run_dir = Path(resume)
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise UserError(f"--resume {run_dir}: not a run folder (no config.yaml); start a run with --out")
        import yaml

        try:
            saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            raise UserError(f"{config_file}: unreadable run config; the run folder is damaged") from None
        return run_dir, cfg_factory(config_from_dict(saved, str(config_file))), True
    run_dir = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if (run_dir / "config.yaml").exists():
        raise UserError(f"--out {run_dir}: already holds a run; resume it with --resume {run_dir} or pick "
                        "another --out")
    cfg = cfg_factory(None)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    return run_dir, cfg, False


def _truncate_logs(run_dir: Path, steps_done: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (they will be written again)."""
    for name in LOG_FILES:
        path = run_dir / name
        if path.exists():
            kept = [r for r in read_jsonl(path) if int(r.get("step", -1)) < steps_done]
            atomic_write_text(path, "".join(_line(r) for r in kept))


def _line(record: dict[str, Any]) -> str:
    from nanguard.fileio import dumps

    return dumps(record) + "\n"


def train(cfg: Config, run_dir: Path, *, resuming: bool, device: torch.device, quiet: bool,
          stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir` until step `stop_at` (default: train.steps; the LR
    schedule always spans train.steps, so stopping early and resuming changes nothing); returns
    final.json's content."""
    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    paths = resolve_data(cfg, quiet)
    train_index = training_index(cfg, paths, run_dir, quiet)
    plan = FaultPlan(cfg.inject, seed=cfg.seed)
    plan.check(amp=cfg.train.amp)

    model = build_model(cfg.model, train_index.num_classes).to(device)
    model.train()
    optimizer = build_optimizer(cfg, model)
    schedule = LRSchedule(cfg.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    loader = Loader(train_index, cfg.train.batch_size, seed=cfg.seed, hflip=cfg.data.hflip,
                    prefetch=cfg.data.prefetch)
    incidents = IncidentLog(run_dir / "incidents.jsonl")
    injections = InjectionLog(run_dir / "injections.jsonl") if plan else NullInjectionLog()
    stepper_cls = Guard if cfg.guard.enabled else UnguardedStep
    guard = stepper_cls(model, optimizer, scaler=scaler, config=cfg.guard, policy=cfg.policy,
                        schedule=schedule, incident_log=incidents)

    step, train_seconds = 0, 0.0
    checkpoints = ckpt.list_checkpoints(run_dir) if resuming else []
    if checkpoints:
        state = ckpt.load_checkpoint(checkpoints[-1][1])
        if tuple(state["category_ids"]) != train_index.category_ids:
            raise UserError(f"{checkpoints[-1][1]}: trained on other categories than {paths.train_ann}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["data"])
        guard.load_state_dict(state["guard"])
        ckpt.set_rng_state(state["rng"])
        step, train_seconds = int(state["step"]), float(state.get("train_seconds", 0.0))
    if resuming:  # lines after the checkpoint are written again; the counters restart from the rest
        _truncate_logs(run_dir, step)
        incidents = guard.incidents = IncidentLog(run_dir / "incidents.jsonl", resume=True)

    total_steps = cfg.train.steps if stop_at is None else stop_at
    progress = TrainProgress(total_steps, start=step, enabled=not quiet)
    # (time, images so far) when each step had run, for img/s between two metrics lines
    marks: dict[int, tuple[float, int]] = {step - 1: (time.perf_counter(), 0)}
    last_logged, images_seen = step - 1, 0
    started = time.perf_counter()

    def handle(outcomes: list[Outcome]) -> None:
        nonlocal last_logged
        for outcome in outcomes:
            obs, decision = outcome.observation, outcome.decision
            if decision.quarantine:
                loader.quarantine(decision.quarantine)
            if decision.kinds and not decision.ignored:
                progress.incident(obs.step, decision)
            if obs.step % cfg.train.log_every == 0 or obs.step == total_steps - 1:
                (t0, n0), (t1, n1) = marks[last_logged], marks[obs.step]
                rate = (n1 - n0) / max(t1 - t0, 1e-9)
                for old in [k for k in marks if k < obs.step]:
                    del marks[old]
                last_logged = obs.step
                append_jsonl(run_dir / "metrics.jsonl", json_safe({
                    "step": obs.step, **obs.losses, "total_loss": obs.total_loss, "lr": obs.lr,
                    "grad_norm": obs.grad_norm, "images_per_second": round(rate, 3), "applied": obs.applied,
                    **({"loss_scale": obs.loss_scale} if obs.loss_scale is not None else {})}))
                progress.metrics(obs.total_loss, rate)

    try:
        with progress:
            while step < total_steps and not guard.stopped:
                faults = TorchFaults(plan, step, injections) if plan else NoFaults()
                try:
                    batch = loader.next()
                except BatchLoadError as err:  # an unreadable image: an incident, not the end of the run
                    marks[step] = (time.perf_counter(), images_seen)
                    handle(guard.skip_batch(err.cause, image_ids=err.image_ids))
                else:
                    outcomes = train_step(model, guard, batch, device=device, amp=cfg.train.amp, faults=faults)
                    images_seen += len(batch.images)
                    marks[step] = (time.perf_counter(), images_seen)
                    handle(outcomes)
                step += 1
                progress.advance(step)
                if step % cfg.train.checkpoint_every == 0 or step == total_steps or guard.stopped:
                    handle(guard.flush())  # a sync, once per checkpoint: the state must be final
                    train_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    ckpt.save_checkpoint(run_dir, _checkpoint_state(cfg, model, optimizer, schedule, scaler, loader,
                                                                    guard, train_index, step, train_seconds),
                                         keep=cfg.train.keep_checkpoints)
    finally:
        loader.close()

    final: dict[str, Any] = {
        "status": "stopped" if guard.stopped else "completed",
        "steps": step,
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(step * cfg.train.batch_size / max(train_seconds, 1e-9), 3),
        **incidents.summary(),
        "injections": injections.count if plan else 0,
        "weights_finite": bool(all(torch.isfinite(p).all() for p in model.parameters())),  # sync-ok: end of run
    }
    if guard.stopped:
        final["verdict"] = guard.policy_state.stop_verdict
        final["stop_reason"] = guard.policy_state.stop_reason
    if cfg.train.eval_at_end:
        final.update(evaluate_run(cfg, model, paths, train_index.category_ids, device, quiet, run_dir))
    atomic_write_json(run_dir / "final.json", json_safe(final))
    return final


def _checkpoint_state(cfg, model, optimizer, schedule, scaler, loader, guard, index, step, train_seconds):
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "step": step,
        "train_seconds": train_seconds,
        "config": cfg.to_dict(),
        "rng": ckpt.rng_state(),
        "data": loader.state_dict(),
        "guard": guard.state_dict(),
        "category_ids": list(index.category_ids),
    }


def evaluate_run(cfg: Config, model, paths: DataPaths, category_ids, device, quiet: bool,
                 run_dir: Path | None) -> dict[str, Any]:
    """mAP on the validation split; the 12-line table on stderr, eval.json in the run folder."""
    val_index, document = validation_data(paths, category_ids)
    metrics, table, _ = evaluate(model, val_index, document, batch_size=cfg.eval.batch_size, device=device,
                                 max_images=cfg.eval.max_images)
    if not quiet:
        print(table, file=sys.stderr)
    if run_dir is not None:
        atomic_write_json(run_dir / "eval.json", json_safe(metrics))
    return {"mAP": metrics["mAP"], "mAP50": metrics["mAP50"], "mAP75": metrics["mAP75"]}
