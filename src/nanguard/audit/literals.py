"""The NaN / Infinity literal helpers moved to `nanguard.data.literals` (the training data reader uses
them too, and data does not import the audit); re-exported here for the audit's older importers."""

from nanguard.data.literals import (
    SENTINEL_TEXT,
    SENTINEL_VALUE,
    error_position,
    literal_positions,
    replace_literals,
    restore_in_column,
    restore_in_objects,
    restore_in_records,
)

__all__ = [
    "SENTINEL_TEXT",
    "SENTINEL_VALUE",
    "error_position",
    "literal_positions",
    "replace_literals",
    "restore_in_column",
    "restore_in_objects",
    "restore_in_records",
]
