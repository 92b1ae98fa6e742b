"""Checkpoints: atomic writes, `weights_only=True` loads, and a clear error for anything else.

A checkpoint is `RUN_DIR/checkpoints/step_XXXXXXXX.pt`, a dict of tensors and plain data:
`model`, `optimizer`, `scheduler`, `scaler`, `step`, `config`, `rng`, `data` (the loader's cursor),
`guard`, `category_ids`, `format`. It is written to a temp file, fsynced and renamed, so a process
killed mid-write leaves the previous checkpoints intact and no torn file under a checkpoint's name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from nanguard.backends.torch.model import read_tensor_file
from nanguard.errors import UserError
from nanguard.fileio import atomic_write

FORMAT = "nanguard-checkpoint-1"
REQUIRED = ("model", "optimizer", "scheduler", "step", "config", "rng", "data", "guard", "category_ids")
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first (temp files are ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Write atomically, then drop all but the newest `keep` checkpoints and stale temp files."""
    path = checkpoint_path(run_dir, int(state["step"]))
    atomic_write(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for tmp in checkpoint_dir(run_dir).glob(".step_*.tmp"):
        tmp.unlink(missing_ok=True)  # left by a process killed mid-write
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = read_tensor_file(Path(path), "the checkpoint path")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a nanguard checkpoint (no '{FORMAT}' marker); for plain weights "
                        "use model.weights=PATH")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}; it is damaged or from another tool")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
