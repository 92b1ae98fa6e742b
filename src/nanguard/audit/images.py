"""Image file checks: existence, header (format, size) and, unless --no-decode, a full decode.

Files are independent, so they are spread over processes; a file is one task (its decode dominates any
dispatch cost). Results come back as plain tuples so that nothing but the path crosses the pipe.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanguard.audit.checks import image_record_ok, later_duplicates, unsafe_paths
from nanguard.audit.load import Columns
from nanguard.errors import UserError

# Below this many files a process pool costs more than it saves.
_POOL_MIN_FILES = 16


@dataclass
class ImageFacts:
    """What the files said, for the findings' messages. Keyed by image row."""

    hits: dict[str, np.ndarray]
    folder: Path
    actual_size: dict[int, tuple[int, int]] = field(default_factory=dict)  # row -> (width, height)
    error: dict[int, str] = field(default_factory=dict)  # row -> why it could not be read
    constant_channels: dict[int, list[int]] = field(default_factory=dict)  # row -> channels with zero std
    mode: dict[int, str] = field(default_factory=dict)  # row -> Pillow mode, for high_bit_depth rows
    checked: int = 0


def _usable_cores() -> int:
    # The cores this process may run on (a container or taskset can allow fewer than the machine has).
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def inspect_file(path: str, decode: bool) -> tuple[str, int, int, str, list[int], str]:
    """-> (status, width, height, error message, constant channels, Pillow mode); status: ok, missing,
    unreadable."""
    from PIL import Image  # only the image checks need Pillow

    if not os.path.isfile(path):
        return "missing", 0, 0, "", [], ""
    try:
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
            if not decode:
                return "ok", width, height, "", [], mode
            image.load()
            if image.mode not in ("L", "RGB", "RGBA", "I", "F", "I;16"):
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except Exception as err:  # noqa: BLE001 - any decoder failure means the loader would fail too
        return "unreadable", 0, 0, f"{type(err).__name__}: {err}", [], ""
    channels = pixels.reshape(pixels.shape[0] * pixels.shape[1], -1)
    # min == max is zero std, exactly, without a float sum over the image.
    constant = np.flatnonzero(channels.min(axis=0) == channels.max(axis=0)).tolist() if channels.size else [0]
    return "ok", width, height, "", constant, mode


def _inspect_star(task: tuple[str, bool]) -> tuple[str, int, int, str, list[int], str]:
    return inspect_file(*task)


def inspect(
    cols: Columns,
    images_dir: str | os.PathLike[str],
    *,
    decode: bool = True,
    jobs: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ImageFacts:
    """Check the file of every well-formed, first-of-its-id image record under `images_dir`."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found; pass the folder that holds the files named in 'file_name'")
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: must be at least 1 (or leave it out to use all cores)")
    eligible = image_record_ok(cols)
    eligible[later_duplicates(cols.image_ids, cols.image_id_ok & cols.image_is_object)] = False
    eligible &= ~unsafe_paths(cols)  # a path outside the folder is reported, never opened
    missing_name = [row for row in np.flatnonzero(eligible).tolist() if not cols.file_names[row]]
    rows = [row for row in np.flatnonzero(eligible).tolist() if cols.file_names[row]]
    tasks = [(str(folder / cols.file_names[row]), decode) for row in rows]

    facts = ImageFacts(hits={}, folder=folder)
    found: dict[str, list[int]] = {"missing_image": [], "unreadable_image": [], "size_mismatch": [],
                                   "constant_image": [], "high_bit_depth": []}
    found["missing_image"].extend(missing_name)

    workers = min(jobs or _usable_cores(), max(len(tasks), 1))
    if workers > 1 and len(tasks) >= _POOL_MIN_FILES:
        from concurrent.futures import ProcessPoolExecutor  # only --images with --jobs > 1: not every audit's start

        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_inspect_star, tasks, chunksize=max(1, min(32, len(tasks) // (workers * 8))))
    else:
        pool, results = None, map(_inspect_star, tasks)
    try:
        from nanguard.data.loader import WIDE_MODES

        for done, (row, (status, width, height, message, constant, mode)) in enumerate(zip(rows, results), 1):
            if status == "missing":
                found["missing_image"].append(row)
            elif status == "unreadable":
                found["unreadable_image"].append(row)
                facts.error[row] = message
            else:
                facts.actual_size[row] = (width, height)
                if width != cols.widths[row] or height != cols.heights[row]:
                    found["size_mismatch"].append(row)
                if constant:
                    found["constant_image"].append(row)
                    facts.constant_channels[row] = constant
                if mode in WIDE_MODES:
                    found["high_bit_depth"].append(row)
                    facts.mode[row] = mode
            if on_progress is not None:
                on_progress(done, len(tasks))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    facts.checked = len(tasks)
    facts.hits = {name: np.array(sorted(rows_), dtype=np.int64) for name, rows_ in found.items()}
    return facts
