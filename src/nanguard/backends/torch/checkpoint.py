"""Checkpoint files for PyTorch: atomic writes, `weights_only=True` loads, a clear error for anything else.

A checkpoint is a dict of tensors and plain data (what `nanguard.run.trainer` declares: the run's
counters, the data cursor, the backend's parts, the config, the category ids) plus a `format` marker.
It is written to a temp file, fsynced and renamed, so a process killed mid-write leaves the previous
checkpoints intact and no torn file under a checkpoint's name. Which file to write or read, and the
fallback past a damaged one, are the run's business (`nanguard.run.checkpoints`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nanguard.errors import UserError
from nanguard.fileio import atomic_write

FORMAT = "nanguard-checkpoint-2"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; pass a run folder or checkpoints/step_*.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({tensor_file_problem(exc)}); use a file written by "
                        "`nanguard train`") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a nanguard checkpoint of this version (no '{FORMAT}' marker); for plain "
                        "weights use model.weights=PATH")
    return state


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """torch's RNG state: the CPU generator's and every CUDA device's; with a CUDA `device`, also that
    device's own ("cuda_device"), for a replay on another process's device (a distributed run's)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        if device is not None and device.type == "cuda":
            state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put back a `rng_state()`; with a CUDA `device` and the state of the device it was taken on,
    that state goes onto `device`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
        if device is not None and device.type == "cuda" and "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"], device)


def read_tensor_file(path: Path, what: str):
    """torch.load with weights_only=True; any failure is the user's file, reported on one line."""
    if not path.exists():
        raise UserError(f"{path}: no such file; check {what}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a file; check {what}")
    if not path.is_file():  # torch.load would wait on a FIFO forever, or read /dev/zero without end
        raise UserError(f"{path}: not a regular file (a pipe, a device or a socket); check {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({tensor_file_problem(exc)}); use a file written by "
                        "`nanguard train` or torch.save(state_dict)") from None


def tensor_file_problem(exc: BaseException) -> str:
    """A short, whole reason why torch.load failed (torch's own text is paragraphs long)."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError):
        return (exc.strerror or exc.__class__.__name__).lower()
    if "can still be loaded" in str(exc):  # weights_only met a pickled Python object
        return "it holds Python objects, not only tensors; weights_only=True refuses them"
    return "truncated or not a torch file"
