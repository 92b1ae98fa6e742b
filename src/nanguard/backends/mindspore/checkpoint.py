"""Checkpoints in MindSpore's own format (.ckpt), written atomically, read without executing code.

    save_checkpoint(path, step.state_arrays(), {"steps_run": 120})
    arrays, meta = load_checkpoint(path)
    step.load_state_arrays(arrays)

A .ckpt holds named tensors (protobuf); `meta` (plain JSON: the policy's state, counters) rides along
as one string entry. The file is written next to `path` and renamed over it after an fsync
(`nanguard.fileio.atomic_write`), so a kill or a full disk leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np

from nanguard.errors import UserError
from nanguard.fileio import atomic_write_bytes, dumps

META_KEY = "nanguard_meta"


def checkpoint_bytes(arrays: dict[str, np.ndarray], meta: dict[str, Any], path: Path | None = None) -> bytes:
    """The bytes of a .ckpt holding `arrays` and `meta`. MindSpore writes to paths only: a scratch file
    beside `path` (the file they are for; None: the temp folder), removed again. UserError naming the
    file when it cannot be written."""
    where = path.parent if path is not None else None
    entries = [{"name": name, "data": ms.Tensor(np.ascontiguousarray(value))} for name, value in arrays.items()]
    fd, scratch = tempfile.mkstemp(prefix=f".{path.name}." if path is not None else ".nanguard-", suffix=".ckpt", dir=where)
    os.close(fd)
    try:
        ms.save_checkpoint(entries, scratch, append_dict={META_KEY: dumps(meta)})
        return Path(scratch).read_bytes()
    except (OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"{path or scratch}: the checkpoint could not be written ({exc}); free some "
                        "space or choose another --out") from None
    finally:
        Path(scratch).unlink(missing_ok=True)


def save_checkpoint(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, checkpoint_bytes(arrays, meta, path))


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays by name, meta); UserError naming the file for a damaged or foreign one."""
    path = Path(path)
    if not path.is_file():  # a FIFO or a device: MindSpore's reader would block or never end
        raise UserError(f"{path}: not a regular file; resume from another checkpoint or start the run again")
    try:
        loaded = ms.load_checkpoint(str(path))
        meta = json.loads(str(loaded.pop(META_KEY)))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        reason = "it is not a nanguard MindSpore checkpoint" if isinstance(exc, KeyError) else \
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read this checkpoint ({reason}); resume from another one or start "
                        "the run again") from None
    return {name: value.asnumpy() for name, value in loaded.items()}, meta
