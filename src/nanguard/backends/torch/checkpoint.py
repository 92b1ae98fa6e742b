"""Checkpoints: atomic writes, `weights_only=True` loads, and a clear error for anything else.

A checkpoint is `RUN_DIR/checkpoints/step_XXXXXXXX.pt`, a dict of tensors and plain data:
`model`, `optimizer`, `scheduler`, `scaler`, `step`, `config`, `rng`, `data` (the loader's cursor),
`guard`, `category_ids`, `format`. It is written to a temp file, fsynced and renamed, so a process
killed mid-write leaves the previous checkpoints intact and no torn file under a checkpoint's name.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

from nanguard.backends.torch.model import tensor_file_problem
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
    """(step, path) of the complete checkpoints of a run, oldest first (temp files and files set aside
    as `*.pt.damaged` are ignored)."""
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
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; pass a run folder or checkpoints/step_*.pt")
    state, problem = _read(path)
    if problem is not None:
        raise UserError(f"{path}: {problem}")
    return state


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None), or (None, "what is wrong; the fix") for a file that is not a usable checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        return None, (f"not a readable checkpoint ({tensor_file_problem(exc)}); use a file written by "
                      "`nanguard train`")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None, (f"not a nanguard checkpoint (no '{FORMAT}' marker); for plain weights use "
                      "model.weights=PATH")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        return None, f"checkpoint lacks {', '.join(missing)}; it is damaged or from another tool"
    return state, None


def load_newest(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(path, state) of the newest checkpoint of `run_dir` that loads.

    A damaged newer checkpoint (a disk error, a copy cut short) must not block a resume or an eval while
    an older one is intact: it is renamed aside to `step_XXXXXXXX.pt.damaged` (never deleted: it may be
    the only copy someone wants to inspect), one line on stderr says so, and the next older one is
    tried. `UserError` when there is none, or none loads."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no checkpoints/step_*.pt; not a run folder, or the run saved none yet")
    first_problem = None
    for _, path in reversed(found):
        state, problem = _read(path)
        if problem is None:
            return path, state
        first_problem = first_problem or f"{path.name}: {problem.split(';')[0]}"
        aside = path.with_name(path.name + ".damaged")
        for n in range(1, 1000):  # an earlier damaged copy of the same step is kept too
            if not aside.exists():
                break
            aside = path.with_name(f"{path.name}.damaged.{n}")
        try:
            path.rename(aside)
            where = f"renamed to {aside.name}"
        except OSError as exc:
            where = f"left in place (cannot rename: {(exc.strerror or exc.__class__.__name__).lower()})"
        print(f"nanguard: warning: {path}: {problem.split(';')[0]}; {where}; trying the one before", file=sys.stderr)
    raise UserError(f"{checkpoint_dir(run_dir)}: none of its {len(found)} checkpoint(s) loads ({first_problem}); "
                    "start a new run")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
