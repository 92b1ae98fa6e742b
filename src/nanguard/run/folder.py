"""The run folder: created once, written by one process at a time, resumed, its logs truncated.

    folder = RunFolder.create(Path("runs/a"), cfg)     # refuses a folder that holds anything else
    folder = RunFolder.open(Path("runs/a"))            # for --resume; folder.config is the saved config

Both take an exclusive lock (`.nanguard.lock`, `fcntl.flock`): a second writer, a `--resume` of a run
that is still training, or two `train --out SAME` at once exit 2 naming the process that holds it. The
kernel drops the lock when the process dies, so a `kill -9` never leaves a stale lock behind.

nanguard never writes into a folder it did not create: `--out` must be new, empty, or a run.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Any

from nanguard.errors import UserError
from nanguard.fileio import append_jsonl, atomic_write_text, dumps, read_jsonl, read_regular

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".nanguard.lock"
LOG_FILES = ("metrics.jsonl", "incidents.jsonl", "injections.jsonl")


def io_error(path: Path | str, exc: OSError, what: str) -> UserError:
    """One line for an OSError: the path, the cause in words, and what to do."""
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = {errno.ENOSPC: "free some space", errno.EROFS: "pick a writable folder",
            errno.EACCES: "check its permissions", errno.EPERM: "check its permissions (chattr/ownership)",
            errno.ENOTDIR: "a parent of it is a file", errno.EEXIST: "pick another path"}.get(exc.errno, "check it")
    return UserError(f"{path}: cannot {what} ({cause.lower()}); {hint}")


class RunFolder:
    """An open, locked run folder. Use `create` or `open`; `close` releases the lock."""

    writer = True  # this process writes the run's files (rank 0 of a distributed run)

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path, self._lock_fd = path, lock_fd

    # ---------------------------------------------------------------------------------------------
    # Opening

    @classmethod
    def create(cls, path: Path, config_text: str) -> RunFolder:
        """A new run in `path` (created if missing). Refuses a file, a run, and a non-empty folder that
        is not a run; writes config.yaml first, so a run killed in its first second can be resumed."""
        path = Path(path)
        cls.check_new(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error(path, exc, "create the run folder") from None
        folder = cls(path, _lock(path))
        try:
            cls.check_new(path)  # again, under the lock: another process may have started a run in it
            folder.write_config(config_text)
        except BaseException:
            folder.close()
            raise
        return folder

    @staticmethod
    def check_new(path: Path) -> None:
        """Refuses what `create` refuses, and writes nothing: a file, a run, a folder that holds files
        nanguard did not write (`--nproc` asks before it starts the ranks)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path}: is a file, not a folder; pick a folder for the run")
        if not path.is_dir():
            return
        if (path / CONFIG_FILE).exists():
            raise UserError(f"--out {path}: already holds a run; resume it with --resume {path} or pick "
                            "another --out")
        try:
            # the lock, and the temp file of a config.yaml being written (another process creating a
            # run here this instant: its lock then answers "in use by"), are nanguard's own
            others = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE
                            and not (p.name.startswith(f".{CONFIG_FILE}.") and p.name.endswith(".tmp")))
        except OSError as exc:
            raise io_error(path, exc, "read the run folder") from None
        if others:
            raise UserError(f"--out {path}: the folder holds files that are not a nanguard run "
                            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); nanguard "
                            "never writes into it: pick a new or empty folder")

    @classmethod
    def open(cls, path: Path, *, wait: float = 0.0) -> RunFolder:
        """An existing run, for --resume. `wait`: seconds to wait for a holder to let go (a job that
        torchrun restarts: its previous process may still be exiting)."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"--resume {path}: not a run folder (no {CONFIG_FILE}); start a run with --out")
        deadline = time.monotonic() + wait
        while True:
            try:
                return cls(path, _lock(path))
            except UserError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    @classmethod
    def follower(cls, path: Path) -> RunFolder:
        """The run as a distributed run's other ranks see it: no lock, and every write a no-op (rank 0
        is the one writer)."""
        return _Follower(Path(path), -1)

    @classmethod
    def open_if_free(cls, path: Path) -> RunFolder | None:
        """The run, locked, for a command that writes into it on the side (diagnose); None while another
        process holds it (a run still training): such a command must not write then."""
        try:
            return cls.open(path)
        except UserError:
            if not (Path(path) / CONFIG_FILE).is_file():
                raise
            return None

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------
    # Files

    def read_config(self) -> dict[str, Any]:
        import yaml

        from nanguard.config import MAX_CONFIG_BYTES, load_yaml

        path = self.path / CONFIG_FILE
        try:
            data = load_yaml(read_regular(path, "a run config", MAX_CONFIG_BYTES).decode("utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            raise UserError(f"{path}: unreadable run config; the run folder is damaged") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: not a run config (a YAML mapping); the run folder is damaged")
        return data

    def write_config(self, text: str) -> None:
        self.write_text(CONFIG_FILE, text)

    def write_text(self, name: str, text: str) -> Path:
        try:
            return atomic_write_text(self.path / name, text)
        except OSError as exc:
            raise io_error(self.path / name, exc, f"write {name}") from None

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, dumps(data, indent=2) + "\n")

    def append(self, name: str, record: dict[str, Any]) -> None:
        try:
            append_jsonl(self.path / name, record)
        except OSError as exc:
            raise io_error(self.path / name, exc, f"append to {name}") from None

    def truncate_logs(self, steps_done: int) -> None:
        """Drop log lines of steps at or after `steps_done` (a resumed run writes them again)."""
        for name in LOG_FILES:
            path = self.path / name
            if path.exists():
                kept = [r for r in read_jsonl(path) if int(r.get("step", -1)) < steps_done]
                self.write_text(name, "".join(dumps(r) + "\n" for r in kept))


def _lock(path: Path) -> int:
    """An exclusive, non-blocking flock on PATH/.nanguard.lock, with our pid written in it."""
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise io_error(path, exc, "lock the run folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            pass
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise UserError(f"{path}: the run folder is in use by {who} (a run folder has one writer); wait "
                            "for it to finish or stop it, then --resume") from None
        raise io_error(path, exc, "lock the run folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _Follower(RunFolder):
    writer = False

    def write_text(self, name: str, text: str) -> Path:
        return self.path / name

    def append(self, name: str, record: dict[str, Any]) -> None:
        pass

    def truncate_logs(self, steps_done: int) -> None:
        pass
