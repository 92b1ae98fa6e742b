"""Atomic file writes and strict JSON.

Every file nanguard writes goes through `atomic_write`: a temp file in the same folder, fsync, rename,
fsync of the folder. A reader (or a process killed mid-write) sees the old file or the new one, never
half of one. JSON is written with allow_nan=False; `json_safe` turns non-finite floats into the strings
"nan", "inf", "-inf" for fields documented as such.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from nanguard.errors import UserError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def io_error_reason(exc: BaseException) -> str | None:
    """A short cause for a failed read or write ("no space left on device"), or None when `exc` is not an
    I/O failure. torch.save reports a full disk as a RuntimeError ("... unexpected pos ...") from its zip
    writer, not as an OSError."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on device"
        if exc.errno == errno.EDQUOT:
            return "disk quota exceeded"
        if exc.errno == errno.EROFS:
            return "read-only file system"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if exc.strerror:
            return exc.strerror.lower()
        return exc.__class__.__name__
    if isinstance(exc, RuntimeError):
        text = str(exc)
        if any(marker in text for marker in ("unexpected pos", "file write failed", "PytorchStreamWriter failed")):
            return "the write failed part-way (disk full?)"
    return None


class _RecordingFile:
    """The temp file as `write` sees it: remembers an OSError from a write, because torch.save swallows
    it and raises its own RuntimeError ("unexpected pos ..."), which would lose "no space left on device"."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _file_mode() -> int:
    """0666 less the process's umask: the mode `open()` would give a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(fileobj)` on a temp file next to `path`, fsync it, and rename it over `path`.

    An I/O failure (a full disk, a read-only folder, no permission) raises `UserError` naming the path
    and the cause; the temp file is removed and a previous file at `path` is left as it was."""
    path = Path(path)
    tmp = recording = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would hide a run's files from the user's team
        with os.fdopen(fd, "wb") as handle:
            recording = _RecordingFile(handle)
            write(recording)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, Exception) and recording is not None and recording.error is not None:
            reason = io_error_reason(recording.error)  # whatever torch turned it into
        else:
            reason = io_error_reason(exc)
        if reason is None:
            raise
        raise UserError(f"{path}: cannot write it ({reason}); free space or pick a writable folder") from None
    _fsync_dir(path.parent)
    return path


def read_regular(path: str | os.PathLike[str], what: str, limit: int | None = None) -> bytes:
    """The bytes of `path`, a regular file (of at most `limit` bytes). `UserError` otherwise: a FIFO or
    a device (/dev/zero) as a config or a run file would block or never end, and a file far larger than
    `what` can be is not one. Other I/O errors are the caller's to word (OSError)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, and is then refused
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise UserError(f"{path}: not a regular file (a pipe, a device or a socket); pass {what} file")
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise UserError(f"{path}: larger than {limit:,} bytes, far too large for {what}; check the path")
    return data


# What nanguard writes outside a run folder (audit --json, audit --fix, eval.json beside a checkpoint)
# begins with this key, so that a later command can tell its own file, which it may replace, from a
# user's, which it never overwrites.
OUTPUT_MARK = "nanguard"
_MARKED = re.compile(rb'^\s*\{\s*"' + OUTPUT_MARK.encode() + rb'"\s*:')


def check_output_path(path: str | os.PathLike[str], flag: str, inputs: tuple = ()) -> Path:
    """`path`, when it may be written: a new file, or one nanguard wrote before (it begins with
    {"nanguard": ...}). `UserError` for any of `inputs`, a folder, or an existing file nanguard did not
    write: nanguard never overwrites a file it did not create."""
    path = Path(path)
    for source in inputs:
        if source is not None and (path.resolve() == Path(source).resolve() or _same(path, Path(source))):
            raise UserError(f"{flag} {path}: that is an input of this command ({source}); nanguard never "
                            "overwrites its input, pass a new path")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name a new file")
    if path.exists() or path.is_symlink():
        if not _MARKED.match(_head(path)):
            raise UserError(f"{flag} {path}: the file exists and nanguard did not write it; nanguard never "
                            "overwrites a file it did not create: pick a new path or remove it")
    return path


def _head(path: Path) -> bytes:
    """The first bytes of a regular file; b"" for anything else (a FIFO is never waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as handle:
        return handle.read(256) if stat.S_ISREG(os.fstat(handle.fileno()).st_mode) else b""


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """A copy of `value` with non-finite floats replaced by "nan", "inf", "-inf" (recursively)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON (allow_nan=False): a NaN that reaches here is a bug, not a value to write."""
    return json.dumps(obj, allow_nan=False, indent=indent, sort_keys=False)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, dumps(obj, indent=indent) + "\n")


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one strict-JSON line and fsync it. A line is written in one `write` call, so a crash
    leaves at most a torn last line, which `read_jsonl` skips."""
    line = (dumps(record) + "\n").encode("utf-8")
    try:
        with open(path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:  # a torn last line is what read_jsonl already skips
        raise UserError(f"{path}: cannot append to it ({io_error_reason(exc)}); free space or make the "
                        "folder writable, then resume the run") from None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a crash mid-append) is ignored."""
    records = []
    try:
        text = read_regular(path, "a run log").decode("utf-8", errors="replace")
    except FileNotFoundError:
        return records
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({io_error_reason(exc)}); check the run folder") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError):  # torn, or nested past any record's depth
            continue
    return records
