"""The PyTorch backend of the run (`nanguard.run.backend.Backend`): torchvision's Faster R-CNN, the
device-side guard (or a plain step), checkpoints written with `torch.save` and read with
`weights_only=True`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nanguard.backends.torch import checkpoint as ckpt
from nanguard.backends.torch.devicestate import LRSchedule, to_host
from nanguard.backends.torch.distributed import RankAgreement, gather_objects, init_process_group, param_digest
from nanguard.backends.torch.evaluate import predict
from nanguard.backends.torch.faults import TorchFaults
from nanguard.backends.torch.guard import Guard
from nanguard.backends.torch.model import build_model, read_tensor_file
from nanguard.backends.torch.replay import replay, write_replay
from nanguard.backends.torch.step import NO_HOOKS, PlainStep, train_step
from nanguard.config import Config
from nanguard.data.coco import CocoIndex
from nanguard.data.loader import Batch
from nanguard.errors import UserError
from nanguard.guard import FaultPlan, Outcome
from nanguard.run.backend import unreadable_unguarded
from nanguard.run.ranks import Ranks


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


class RngState:
    """torch's CPU and CUDA generators, as a stateful part of the checkpoint (restored last). In a
    distributed run every rank's (they draw apart: each samples its own images' proposals)."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    def state_dict(self) -> dict[str, Any]:
        if not self.ranks.distributed:
            return ckpt.rng_state()
        return {"by_rank": gather_objects(ckpt.rng_state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "by_rank" not in state:
            return ckpt.set_rng_state(state)
        if len(state["by_rank"]) != self.ranks.world:
            raise UserError(f"the checkpoint was written by {len(state['by_rank'])} ranks, this run has "
                            f"{self.ranks.world}; resume with the same --nproc")
        ckpt.set_rng_state(state["by_rank"][self.ranks.rank])


class TorchBackend:
    name = "torch"
    checkpoint_suffix = ".pt"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def check_config(self, cfg: Config) -> None:
        if cfg.model.weights:  # a file that does not load is refused before the run folder exists
            read_tensor_file(Path(cfg.model.weights), "model.weights")

    def setup(self, cfg: Config, num_classes: int, *, faults: FaultPlan, injections) -> None:
        self.ranks = Ranks.from_env()
        if self.ranks.distributed:
            self.device = init_process_group(self.device, self.ranks)
        torch.manual_seed(cfg.seed + self.ranks.rank)  # DDP gives every rank rank 0's initial weights
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg, self.faults, self.injections, self.num_classes = cfg, faults, injections, num_classes
        self._rng_before: dict[int, dict[str, Any]] | None = None
        self.model = build_model(cfg.model, num_classes).to(self.device).train()
        self.forward_model: torch.nn.Module = self.model
        agreement = None
        if self.ranks.distributed:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.model)
            if cfg.guard.enabled:
                agreement = RankAgreement(self.device)
                self.forward_model.register_comm_hook(None, agreement.comm_hook)
        self.optimizer = build_optimizer(cfg, self.model)
        self.schedule = LRSchedule(cfg.train, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        common = dict(scaler=self.scaler, schedule=self.schedule)
        self.stepper: Guard | PlainStep = (
            Guard(self.model, self.optimizer, config=cfg.guard, policy=cfg.policy, ranks=agreement, **common)
            if cfg.guard.enabled else
            PlainStep(self.model, self.optimizer, clip_norm=cfg.guard.clip_norm, observe_every=cfg.train.log_every,
                      **common))
        # The checkpoint's parts, declared once: state_dict and load_state_dict loop over them (the RNG
        # last: building and loading the others must not move it).
        self.parts = {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule,
                      "scaler": self.scaler, "guard": self.stepper, "rng": RngState(self.ranks)}

    def setup_model(self, cfg: Config, num_classes: int, state: dict[str, Any]) -> None:
        self.model = build_model(cfg.model, num_classes).to(self.device)
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError):
            raise UserError(f"the checkpoint's weights do not fit model.name={cfg.model.name}; drop the model.* "
                            "overrides") from None

    # ---------------------------------------------------------------------------------------------
    # Steps

    def train_step(self, batch: Batch) -> list[Outcome]:
        step = self.stepper.steps_run
        if self._rng_before is not None:  # a 5 kB host copy: what a replay of this step starts from
            self._rng_before[step] = ckpt.rng_state()
            self._rng_before.pop(step - 8, None)
        hooks = TorchFaults(self.faults, step, self.injections, rank=self.ranks.rank) if self.faults else NO_HOOKS
        return train_step(self.forward_model, self.stepper, batch, device=self.device, amp=self.cfg.train.amp,
                          hooks=hooks)

    def skip_batch(self, error: BaseException, batch_key: tuple[int, int], image_ids: tuple,
                   annotation_ids: tuple) -> list[Outcome]:
        if isinstance(self.stepper, PlainStep):  # unguarded, a batch that cannot be read ends the run
            raise unreadable_unguarded(error, image_ids) from None
        return self.stepper.skip_batch(error, image_ids=image_ids, annotation_ids=annotation_ids, batch=batch_key)

    def flush(self) -> list[Outcome]:
        return self.stepper.flush()

    @property
    def stopped(self) -> bool:
        return self.stepper.stopped

    @property
    def policy_state(self):
        return self.stepper.policy_state

    # ---------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        return to_host({name: part.state_dict() for name, part in self.parts.items()})

    def rebase(self, steps_done: int, state: dict[str, Any]) -> None:
        if isinstance(self.stepper, Guard):
            self.stepper.rebase(steps_done - 1, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [name for name in self.parts if name not in state]
        if missing:
            raise UserError(f"checkpoint lacks {', '.join(missing)}; it is damaged or from another nanguard")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        ckpt.save_checkpoint(path, state)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        return ckpt.load_checkpoint(path)

    def predict(self, index: CocoIndex, *, batch_size: int, max_images: int = 0,
                skipped: list | None = None) -> list[dict[str, Any]]:
        return predict(self.model, index, batch_size=batch_size, device=self.device, max_images=max_images,
                       skipped=skipped)

    # ---------------------------------------------------------------------------------------------
    # Replay (nanguard.explain)

    def keep_replay_state(self, want) -> None:
        if isinstance(self.stepper, Guard) and want is not None:
            self.stepper.keep_replay_state = want
            self._rng_before = {}

    def write_replay(self, step: int, batch: Batch, path: Path, *, lr: float) -> bool:
        kept = self.stepper.replay_states.pop(step, None) if isinstance(self.stepper, Guard) else None
        rng = (self._rng_before or {}).get(step)
        if kept is None or rng is None:
            return False
        write_replay(path, step=step, kept=kept, rng=rng, batch=batch, plan=self.faults,
                     num_classes=self.num_classes, amp=self.cfg.train.amp, lr=lr)
        return True

    def replay(self, path: Path, cfg: Config):
        return replay(path, cfg, self.device)

    def rank_param_digests(self) -> list[str]:
        digest = param_digest(self.model)
        return gather_objects(digest) if self.ranks.distributed else [digest]

    def close(self) -> None:
        ranks = getattr(self, "ranks", None)
        if ranks is not None and ranks.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def weights_finite(self) -> bool:
        return bool(all(torch.isfinite(p).all() for p in self.model.parameters()))  # sync-ok: end of run


    def runtime(self) -> dict[str, Any]:
        device = torch.device(self.device)
        facts = {"backend": self.name, "torch": torch.__version__, "device": str(device),
                 "amp": self.cfg.train.amp, "threads": torch.get_num_threads()}
        if device.type == "cuda":
            facts["gpu"] = torch.cuda.get_device_name(device)
        else:
            facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        return facts


def create(device: str | None) -> TorchBackend:
    return TorchBackend(pick_device(device))
