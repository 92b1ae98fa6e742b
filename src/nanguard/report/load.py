"""Read a run folder for the report, tolerating what a crash or a run in progress leaves behind.

Every file but config.yaml is optional; a missing, torn or unreadable one becomes a line in `notes`
instead of an exception, so a report can always be written, even of a run killed in its first minute.
Numbers are normalised once here: the strings "nan", "inf", "-inf" and null (how strict JSON carries a
non-finite number) become float NaN/Inf, so the plots and tables see floats only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanguard.errors import UserError
from nanguard.config import MAX_CONFIG_BYTES, load_yaml
from nanguard.fileio import read_jsonl, read_regular

CONFIG_FILE = "config.yaml"
OPTIONAL_FILES = ("metrics.jsonl", "incidents.jsonl", "audit.json", "final.json")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
              "infinity": math.inf, "-infinity": -math.inf}


def number(value: Any) -> float | None:
    """A float for a logged number: NaN/Inf for "nan", "inf", "-inf" and null; None when `value` is not a
    number at all (a bool, a list, another string), so a malformed field is a gap, not a crash."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return _NONFINITE.get(value.strip().lower())
    return None


@dataclass
class RunData:
    """What the report shows of one run folder."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    incidents: list[dict[str, Any]] = field(default_factory=list)
    audit: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # one line per missing, torn or unreadable file

    def setting(self, section: str, *keys: str) -> Any:
        """The first of `keys` present in config section `section` (None when none is)."""
        block = self.config.get(section)
        if isinstance(block, dict):
            for key in keys:
                if key in block:
                    return block[key]
        return None

    def loss_components(self) -> list[str]:
        """Every `loss_*` key in the metrics, in first-seen order."""
        names: dict[str, None] = {}
        for record in self.metrics:
            for key in record:
                if key.startswith("loss_") and key != "loss_scale":
                    names.setdefault(key, None)
        return list(names)

    def series(self, key: str) -> list[tuple[float, float | None]]:
        """(step, value) of every metrics line that has `key`; non-finite values stay NaN/Inf."""
        return [(record["step"], number(record[key])) for record in self.metrics if key in record]


def check_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path, or a UserError naming it and the fix when it holds no nanguard run."""
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"{path}: no such folder; pass a run folder written by `nanguard train --out RUN_DIR`")
    if not path.is_dir():
        raise UserError(f"{path}: is a file, not a run folder; pass the folder given to `nanguard train --out`")
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path}: holds no nanguard run (no {CONFIG_FILE}); pass the folder given to "
                        "`nanguard train --out`")
    return path


def _valid_step(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)


def _read_lines(path: Path, notes: list[str], missing: str | None = "") -> list[dict[str, Any]]:
    """The records of a JSONL log, sorted by step; `missing` is the note for an absent file (None: no note)."""
    if not path.exists():
        if missing is not None:
            notes.append(missing or f"{path.name} is missing")
        return []
    try:
        records = read_jsonl(path)
        lines = sum(1 for line in read_regular(path, "a run log").decode("utf-8", "replace").splitlines() if line.strip())
    except (UserError, OSError) as err:
        notes.append(f"{path.name} could not be read ({err})")
        return []
    valid = [record for record in records if _valid_step(record)]
    if len(valid) < lines:  # a torn last line (a crash mid-append) or lines without a step
        notes.append(f"{path.name}: {lines - len(valid)} of {lines} lines could not be read and are left out")
    return sorted(valid, key=lambda record: record["step"])


def _read_json(path: Path, notes: list[str], missing: str = "") -> dict[str, Any] | None:
    """A JSON object file, or None with a note: `missing` for an absent file, the cause for a torn one."""
    if not path.exists():
        notes.append(missing or f"{path.name} is missing")
        return None
    try:
        document = json.loads(read_regular(path, "a run file").decode("utf-8", "replace"))
    except (OSError, ValueError, UserError, RecursionError) as err:
        notes.append(f"{path.name} could not be read ({err.__class__.__name__}: {err})")
        return None
    if not isinstance(document, dict):
        notes.append(f"{path.name} is not a JSON object; left out")
        return None
    return document


def load_run(run_dir: str | Path) -> RunData:
    """Read `run_dir` (checked with `check_run_dir`); never raises for an optional file."""
    path = check_run_dir(run_dir)
    data = RunData(path=path)
    try:
        data.config_text = read_regular(path / CONFIG_FILE, "a run config", MAX_CONFIG_BYTES).decode("utf-8", "replace")
        config = load_yaml(data.config_text)
        data.config = config if isinstance(config, dict) else {}
        if not isinstance(config, dict):
            data.notes.append(f"{CONFIG_FILE} holds no settings; the spike band and settings are left out")
    except (OSError, yaml.YAMLError, UserError) as err:
        data.notes.append(f"{CONFIG_FILE} could not be read ({err.__class__.__name__}); the spike band is left out")
    data.metrics = _read_lines(path / "metrics.jsonl", data.notes)
    audit_off = data.setting("data", "audit") in ("off", False)  # YAML 1.1 reads a bare off as false
    data.audit = _read_json(path / "audit.json", data.notes,
                            "audit.json is missing: data.audit=off" if audit_off else "")
    data.final = _read_json(path / "final.json", data.notes,
                            "final.json is missing: the run is still training, or it stopped before its end")
    # A run writes incidents.jsonl at its first incident: no file is no incident, unless final.json counts some.
    counted = (data.final or {}).get("incidents")
    quiet = not (isinstance(counted, int) and counted > 0)
    data.incidents = _read_lines(path / "incidents.jsonl", data.notes,
                                 None if quiet else "incidents.jsonl is missing, though final.json counts incidents")
    return data
