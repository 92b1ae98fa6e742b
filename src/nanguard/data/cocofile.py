"""Reading a COCO annotation file into Python objects: the one reader training, evaluation and the audit
share (`nanguard.audit.load` builds its numpy columns on top of it; data does not import the audit).

The file is decoded with msgspec from a memory map, with the cyclic GC paused (a decode makes millions
of containers and no cycles). Bare `NaN` / `Infinity` / `-Infinity` tokens, which msgspec rejects, are
swapped for sentinel numbers and put back after the decode (`nanguard.data.literals`). A file that is not
usable at all (missing, a folder, unreadable, empty, not JSON, truncated, not a COCO detection document)
raises `UserError` with one line naming the file and the fix.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from nanguard.data import literals
from nanguard.errors import UserError


def read_document(path: str | Path) -> dict[str, Any]:
    """The whole COCO dict (NaN / Infinity literals as floats): what training and evaluation read.
    `UserError` for a file that is missing, unreadable, not JSON or not COCO."""
    path = Path(path)
    with decoding(path):
        return check_document(path, decode_full(path, has_literals=False))


@contextmanager
def decoding(path: Path) -> Iterator[None]:
    """Around a decode of `path`: the cyclic GC paused (`gc_paused`), and JSON nested past Python's
    recursion limit (`[[[[...` a hundred thousand deep) refused in one line instead of a traceback."""
    try:
        with gc_paused():
            yield
    except RecursionError:
        raise UserError(f"{path}: JSON nested thousands of levels deep, which no COCO file is; re-export it") from None


@contextmanager
def gc_paused() -> Iterator[None]:
    """Millions of new containers trigger a cyclic-GC pass every few hundred allocations, each walking
    everything decoded so far: a full decode is far slower with the collector on. Decoded JSON holds no
    cycles, so there is nothing for it to find."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _open(path: Path):
    try:
        # a pipe may carry a file (`<(zcat x.json.gz)`); a device never ends (/dev/zero, /dev/urandom)
        if stat.S_ISCHR(path.stat().st_mode) or stat.S_ISBLK(path.stat().st_mode):
            raise UserError(f"{path}: a device, not a file; pass a COCO annotation .json file")
        return path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; pass the path of a COCO annotation file (e.g. instances_train2017.json)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a file; pass the COCO annotation .json file inside it") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable (chmod +r) or copy it somewhere readable") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err}); check the file and the disk") from None


def _empty(path: Path) -> UserError:
    return UserError(f"{path}: the file is empty; re-export the COCO annotations")


def read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    with _open(path) as handle:
        try:
            data = handle.read()
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror or err}); check the file and the disk") from None
    if not data.strip():
        raise _empty(path)
    return data


@contextmanager
def mapped(path: Path) -> Iterator[mmap.mmap | bytes]:
    """The file's bytes without copying them out of the page cache; a plain read where mapping is not
    possible (a pipe, some filesystems)."""
    with _open(path) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            view = None  # a pipe has no size to map; an empty file cannot be mapped
        else:
            try:
                view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                view = None
    if view is None:
        yield read_bytes(path)
        return
    try:
        yield view
    finally:
        view.close()


def not_json(path: Path, err: Exception) -> UserError:
    text = str(err)
    if "truncated" in text:
        return UserError(f"{path}: truncated JSON (the file ends early); re-export or re-download it")
    return UserError(f"{path}: not valid JSON ({text}); re-export it as a COCO detection file")


def check_document(path: Path, doc: Any) -> dict[str, Any]:
    """`doc` itself when it is an object with 'images', 'annotations' and 'categories' lists."""
    if not isinstance(doc, dict):
        kind = type(doc).__name__ if not isinstance(doc, list) else "list"
        raise UserError(
            f"{path}: not a COCO detection file (the top level is a JSON {kind}, expected an object with "
            f"'images', 'annotations' and 'categories'); pass the instances_*.json file"
        )
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(doc.get(key), list)]
    if missing:
        raise UserError(
            f"{path}: not a COCO detection file (no {', '.join(repr(k) for k in missing)} list); "
            f"pass a COCO instances file with 'images', 'annotations' and 'categories'"
        )
    return doc


def decode_loose(path: Path, data: bytes, has_literals: bool) -> Any:
    """Plain Python objects, whatever the records' types; the stdlib's reading where msgspec refuses."""
    if not has_literals:
        try:
            return msgspec.json.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass  # e.g. 1e999, which Python's json reads as inf: let the stdlib decide
    try:
        # The stdlib reads NaN / Infinity natively, so full records keep their real values.
        return json.loads(data)
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to be a COCO file; re-export it") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise not_json(path, err) from None


def decode_full(path: Path, has_literals: bool,
                literal_rows: tuple[int, np.ndarray, np.ndarray] | None = None) -> Any:
    """The whole file as Python objects, NaN / Infinity literals as float NaN / Inf. `literal_rows`
    (literals seen, image rows, annotation rows: the audit's typed decode found them) lets the literals
    be put back in just those records when that accounts for all of them."""
    if not has_literals:
        with mapped(path) as view:
            try:
                return msgspec.json.decode(view)
            except msgspec.DecodeError:  # e.g. 1e999: the stdlib below reads it as inf
                pass
    data = read_bytes(path)
    if has_literals:
        # The stdlib reads the literals natively but is much slower than msgspec on the rewritten
        # text plus a walk that puts the real values back.
        try:
            msgspec.json.decode(data)
        except msgspec.DecodeError as err:
            found = literals.literal_positions(data, literals.error_position(err))
            if found:
                replaced = literals.replace_literals(data, found)
                del data
                try:
                    doc = msgspec.json.decode(replaced)
                except msgspec.DecodeError:
                    data = replaced = None
                else:
                    del replaced
                    if literal_rows is not None and literal_rows[0] == len(found):
                        # Every literal is where the typed decode saw it: restore those records only.
                        literals.restore_in_records(doc, literal_rows[1], literal_rows[2])
                    else:
                        literals.restore_in_objects(doc, len(found))
                    return doc
        if data is None:
            data = read_bytes(path)
    return decode_loose(path, data, has_literals)
