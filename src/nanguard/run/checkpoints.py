"""Checkpoint files of a run: names, the keep-N cadence, and resuming from the newest loadable one.

`RUN/checkpoints/step_XXXXXXXX<suffix>` holds the state after XXXXXXXX steps; the backend writes and
reads the file (atomically; safely), this module decides which. A damaged newest checkpoint (a full
disk, a copy cut short) does not block a resume: it is renamed aside to `...<suffix>.damaged` (never
deleted), one line says so, and the run resumes from the newest one that loads.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from nanguard.errors import UserError

# Keys every checkpoint holds besides its stateful parts.
META_KEYS = ("config", "category_ids")


def check_world(run_state: dict[str, Any], world: int) -> None:
    """A checkpoint of several processes resumes on as many (each rank continues its own state); one of
    a single process may be continued on several. `run_state` is the checkpoint's "run" part (those
    written before it recorded `world` pass: the backend's own check remains)."""
    saved = run_state.get("world")
    if isinstance(saved, int) and saved > 1 and saved != world:
        raise UserError(f"the checkpoint was written by {saved} ranks, this run has {world}; "
                        f"resume with the same --nproc ({saved})")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path, suffix: str = ".pt") -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first (temp and damaged files are not)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    name = re.compile(r"^step_(\d{8,})" + re.escape(suffix) + "$")
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := name.match(p.name)))


class Checkpoints:
    def __init__(self, run_dir: Path, backend, keep: int, *, writer: bool = True) -> None:
        """`writer=False` (a distributed run's ranks but 0): reads the same checkpoint, writes nothing."""
        self.run_dir, self.backend, self.keep, self.writer = Path(run_dir), backend, keep, writer
        self.suffix = backend.checkpoint_suffix
        self.loaded_from: Path | None = None

    def path(self, step: int) -> Path:
        return checkpoint_dir(self.run_dir) / f"step_{step:08d}{self.suffix}"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write atomically, then drop all but the newest `keep` checkpoints and stale temp files."""
        path = self.path(step)
        if not self.writer:
            return path
        self.backend.save_checkpoint(path, state)
        for _, old in list_checkpoints(self.run_dir, self.suffix)[:-self.keep]:
            old.unlink(missing_ok=True)
        # left by a process killed mid-write: the atomic write's .tmp, a backend's own scratch file (MindSpore
        # writes `.step_N.ckpt.XXXX.ckpt` first: its save_checkpoint wants the suffix)
        for tmp in checkpoint_dir(self.run_dir).glob(f".step_*{self.suffix}.*"):
            tmp.unlink(missing_ok=True)
        return path

    def load_newest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads and holds every part (None: the run saved none yet). Newer
        ones that do not load are then renamed aside (`.damaged`, never deleted), and the fallback is
        said on stderr, --quiet or not: the user loses steps. When none loads, or the run's checkpoints
        are another backend's, nothing is renamed: a UserError, and the run is as it was."""
        found = list_checkpoints(self.run_dir, self.suffix)
        if not found:
            others = sorted(p.name for p in checkpoint_dir(self.run_dir).glob("step_*") if p.is_file()) \
                if checkpoint_dir(self.run_dir).is_dir() else []
            aside = [name for name in others if ".damaged" in name]
            foreign = [name for name in others if ".damaged" not in name]
            if foreign:
                raise UserError(f"{checkpoint_dir(self.run_dir)}: its checkpoints ({foreign[-1]}, ...) are not "
                                f"{self.suffix} files, the backend in config.yaml writes; set the backend "
                                "that wrote them (backend=...) in config.yaml, or start a new run with --out")
            if aside:  # trained, but every checkpoint was set aside: not a run that never saved one
                raise UserError(f"{checkpoint_dir(self.run_dir)}: every checkpoint was set aside as damaged "
                                f"({aside[-1]}, ...); nothing was changed: copy intact checkpoints back into it, "
                                "or start a new run with --out")
            return None
        problems: list[tuple[Path, str]] = []
        for _, path in reversed(found):
            try:
                if not path.is_file():  # a FIFO or a device: a reader would block or never end
                    raise UserError(f"{path}: not a regular file (a pipe, a device or a socket)")
                state = self.backend.load_checkpoint(path)
                missing = [k for k in ("run", "data", "backend", *META_KEYS) if k not in state]
                if missing:
                    raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
            except UserError as err:
                problems.append((path, str(err)))
                continue
            if self.writer:  # rank 0 says so and puts them aside; every rank falls back the same way
                for bad, err in problems:
                    print(f"nanguard: warning: {err} -- {_put_aside(bad)}; using an older checkpoint",
                          file=sys.stderr)
            self.loaded_from = path
            return state
        raise UserError(f"{checkpoint_dir(self.run_dir)}: none of its {len(found)} checkpoint(s) loads "
                        f"({problems[0][1].split('; ')[0]}); nothing was changed: copy intact checkpoints back "
                        "into it, or start a new run with --out")


def _put_aside(path: Path) -> str:
    """Rename a checkpoint that does not load to `<name>.damaged` (`.damaged.N` beside an earlier one)."""
    aside = path.with_name(path.name + ".damaged")
    for n in range(1, 1000):  # an earlier damaged copy of the same step is kept too
        if not aside.exists():
            break
        aside = path.with_name(f"{path.name}.damaged.{n}")
    try:
        path.rename(aside)
    except OSError as exc:
        return f"left in place (cannot rename it: {(exc.strerror or type(exc).__name__).lower()})"
    return f"kept aside as {aside.name}"
