"""The PyTorch backend of the run (`nanguard.run.backend.Backend`): torchvision's Faster R-CNN, the
guard's device half (`GuardedStep`, or a plain step), checkpoints written with `torch.save` and read
with `weights_only=True`, replay for `nanguard.explain`, torch.distributed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanguard.backends.shared import split_decay
from nanguard.backends.torch import checkpoint as ckpt
from nanguard.backends.torch.devicestate import LossScaler, LRSchedule, to_host
from nanguard.backends.torch.distributed import (
    RankAgreement,
    check_launcher_env,
    gather_objects,
    hand_to_first,
    init_process_group,
)
from nanguard.backends.torch.faults import TorchFaults
from nanguard.backends.torch.guard import GuardedStep, send
from nanguard.backends.torch.replay import replay, replay_bytes
from nanguard.backends.torch.step import NO_HOOKS, PlainStep, autocast, image_tensor, to_tensors
from nanguard.config import Config
from nanguard.data.loader import Batch
from nanguard.errors import UserError
from nanguard.guard import FaultPlan
from nanguard.guard.faults import StepFaults
from nanguard.run.backend import StepNumbers
from nanguard.run.ranks import Ranks


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam/AdamW. No weight decay on norms and biases (torchvision's references'
    `norm_weight_decay=0` habit), fused where possible: fused kernels take the guard's found_inf."""
    t = cfg.train
    decay, no_decay = split_decay((p for p in model.parameters() if p.requires_grad), lambda p: p.ndim)
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
    """`nanguard.run.backend.Backend`, and `Injects`, `Replays`, `Collective`."""

    checkpoint_suffix = ".pt"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ranks = Ranks()
        self.training = False

    def check_config(self, cfg: Config) -> None:
        check_launcher_env(Ranks.from_env())  # before the run folder exists
        if cfg.model.weights:  # a file that does not load is refused before the run folder exists
            ckpt.read_tensor_file(Path(cfg.model.weights), "model.weights")

    def setup(self, cfg: Config, num_classes: int, *, train: bool = True) -> None:
        # torchvision (1.5 s to import) only where a model is built: not in `--nproc`'s launcher
        from nanguard.backends.torch.model import build_model

        self.cfg, self.num_classes, self.training = cfg, num_classes, train
        if not train:
            self.model = build_model(cfg.model, num_classes).to(self.device)
            return
        self.ranks = Ranks.from_env()
        if self.ranks.distributed:
            self.device = init_process_group(self.device, self.ranks)
        torch.manual_seed(cfg.seed + self.ranks.rank)  # DDP gives every rank rank 0's initial weights
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
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
        self.stepper: GuardedStep | PlainStep = (
            GuardedStep(self.model, self.optimizer, config=cfg.guard, ranks=agreement, **common)
            if cfg.guard.enabled else
            PlainStep(self.model, self.optimizer, clip_norm=cfg.guard.clip_norm, **common))
        self.rng = RngState(self.ranks)
        self._armed: TorchFaults | None = None
        # what a replay needs, kept only where a run explains its incidents (guarded)
        explain = cfg.guard.enabled and cfg.explain.keep > 0
        self._rng_before: dict[tuple, dict[str, Any]] | None = {} if explain else None
        self.replay_states: dict[int, dict[str, Any]] = {}

    # ---------------------------------------------------------------------------------------------
    # The step

    def step(self, batch: Batch, *, lr_factor: float, check_weights: bool, between) -> StepNumbers:
        if self._rng_before is not None:  # a 5 kB host copy: what a replay of this step starts from
            self._rng_before[batch.key] = ckpt.rng_state(self.device)
            for old in list(self._rng_before)[:-8]:
                del self._rng_before[old]
        hooks, self._armed = self._armed or NO_HOOKS, None
        images, targets = to_tensors(batch, self.device)
        hooks.on_batch(images, targets, batch.image_ids)
        try:
            with autocast(self.device, self.cfg.train.amp):
                losses = self.forward_model(images, targets)  # the four loss components, 0-dim device tensors
        except Exception as exc:  # the model refused this batch: an incident (unguarded: the end of the run)
            if isinstance(self.stepper, GuardedStep):
                self.stepper.discard()
            return StepNumbers((), None, error=exc)
        # no sync from here on: the guard keeps every flag on the device
        backward = self.stepper.backward(hooks.on_losses(dict(losses)))
        hooks.after_backward(self.stepper.params)
        between()
        if isinstance(self.stepper, GuardedStep):
            read_values = send(self.stepper.update(backward, lr_factor=lr_factor, check_weights=check_weights))
        else:
            read_values = self.stepper.apply(backward, lr_factor)
        hooks.after_update(self.stepper.params)
        return StepNumbers(backward.names, read_values)

    def arm(self, faults: StepFaults) -> None:
        self._armed = TorchFaults(faults.plan, faults.step, faults.log, faults.rank) if faults else None

    # ---------------------------------------------------------------------------------------------
    # State

    def capture(self) -> dict[str, Any]:
        if not self.training:
            return to_host({"model": self.model.state_dict()})
        if isinstance(self.stepper, GuardedStep):
            state = self.stepper.capture()
            state["guard"] = {"loss_spikes": state.pop("loss_spikes"), "grad_spikes": state.pop("grad_spikes")}
        else:
            state = to_host({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                             "guard": {}})
        state["rng"] = self.rng.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "model" not in state:
            raise UserError("the checkpoint lacks the model's weights; it is damaged or from another nanguard")
        if not self.training:
            try:
                self.model.load_state_dict(state["model"])
            except (RuntimeError, KeyError):
                raise UserError(f"the checkpoint's weights do not fit model.name={self.cfg.model.name}; drop the "
                                "model.* overrides") from None
            return
        missing = [name for name in ("optimizer", "schedule", "scaler", "guard", "rng") if name not in state]
        if missing:
            raise UserError(f"checkpoint lacks {', '.join(missing)}; it is damaged or from another nanguard")
        if isinstance(self.stepper, GuardedStep) and state["guard"]:
            self.stepper.restore({**state, **state["guard"]})
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            LossScaler(self.scaler, self.optimizer).load_state_dict(state["scaler"])
        self.rng.load_state_dict(state["rng"])  # last: loading the others must not move it

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        ckpt.save_checkpoint(path, state)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        return ckpt.load_checkpoint(path)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> list[tuple]:
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = self.model([image_tensor(image, self.device) for image in images]) if images else []
        finally:
            self.model.train(was_training)
        return [(out["boxes"].float().cpu().numpy(), out["scores"].float().cpu().numpy(),
                 out["labels"].cpu().numpy()) for out in outputs]

    def weights(self) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().copy() for name, p in self.model.named_parameters()}  # sync-ok: end of run

    def runtime(self) -> dict[str, Any]:
        device = torch.device(self.device)
        facts = {"backend": "torch", "torch": torch.__version__, "device": str(device),
                 "amp": self.cfg.train.amp, "threads": torch.get_num_threads()}
        if device.type == "cuda":
            facts["gpu"] = torch.cuda.get_device_name(device)
        else:
            facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        return facts

    def gather(self, value: Any) -> list[Any]:
        return gather_objects(value) if self.ranks.distributed else [value]

    def hand_to_first(self, data: bytes | None, source: int) -> bytes | None:
        return hand_to_first(data, source, self.device) if self.ranks.distributed else data

    def peer_lost(self, error: BaseException) -> str | None:
        return _peer_lost(error)

    def close(self) -> None:
        if self.ranks.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ---------------------------------------------------------------------------------------------
    # Replay (nanguard.explain)

    def keep_replay(self, step: int, reference: tuple[int, Any]) -> None:
        if not isinstance(self.stepper, GuardedStep) or self._rng_before is None:
            return
        label, state = reference
        self.replay_states[step] = {**self.stepper.capture_before_forward(), "reference_step": label,
                                    "reference_model": state["model"]}
        for old in sorted(self.replay_states)[:-4]:  # the run takes them at once; never pile up
            del self.replay_states[old]

    def replay_data(self, step: int, batch: Batch, *, lr: float, faults: FaultPlan | None) -> bytes | None:
        kept = self.replay_states.pop(step, None)
        rng = (self._rng_before or {}).get(batch.key)
        if kept is None or rng is None:
            return None
        return replay_bytes(step=step, kept=kept, rng=rng, batch=batch, plan=faults or FaultPlan([]),
                            num_classes=self.num_classes, amp=self.cfg.train.amp, lr=lr, rank=self.ranks.rank)

    def replay(self, path: Path, cfg: Config):
        return replay(path, cfg, self.device)


def create(device: str | None) -> TorchBackend:
    return TorchBackend(pick_device(device))


# What gloo and NCCL say when the process at the other end of a collective is gone.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed",
              "NCCL communicator was aborted", "remote process exited", "Connection refused")


def _peer_lost(error: BaseException) -> str | None:
    text = str(error)
    if not isinstance(error, RuntimeError):
        return None
    return next((marker for marker in _PEER_GONE if marker in text), None)
