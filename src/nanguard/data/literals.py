"""Python's json writes NaN, Infinity and -Infinity as bare tokens, and real exporters do too; msgspec
(like orjson and the JSON spec) rejects them. These helpers find such tokens outside strings, swap them
for finite sentinel numbers a fast decoder accepts, and put NaN / +-Inf back after decoding.

All scanning is `bytes.find` / `bytes.count`, which run at memory speed (a regex alternation is far slower).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

# Finite stand-ins for the non-standard literals: distinct, and far from any coordinate a file holds.
SENTINEL_TEXT = {
    b"NaN": b"-1.0203040506070809e-300",
    b"Infinity": b"1.1213141516171819e-300",
    b"-Infinity": b"-1.1213141516171819e-300",
}
SENTINEL_VALUE = {
    float(SENTINEL_TEXT[b"NaN"]): math.nan,
    float(SENTINEL_TEXT[b"Infinity"]): math.inf,
    float(SENTINEL_TEXT[b"-Infinity"]): -math.inf,
}


def _find_all(data: bytes, token: bytes, begin: int = 0, end: int | None = None) -> list[int]:
    # bytes.find runs at memory speed; a regex alternation is far slower.
    end = len(data) if end is None else end
    found, pos = [], data.find(token, begin, end)
    while pos != -1:
        found.append(pos)
        pos = data.find(token, pos + 1, end)
    return found


def literal_positions(data: bytes, start: int = 0) -> list[tuple[int, bytes]]:
    """(position, token) of every bare NaN / Infinity / -Infinity outside JSON strings, from `start`,
    which must lie outside a string (the decoder's first error position does)."""
    candidates = [(pos, b"NaN") for pos in _find_all(data, b"NaN", start)]
    for pos in _find_all(data, b"Infinity", start):
        candidates.append((pos - 1, b"-Infinity") if pos and data[pos - 1] == 0x2D else (pos, b"Infinity"))
    candidates.sort()
    found, quotes, scanned = [], 0, start
    for pos, token in candidates:
        if pos < scanned:  # the "-" of a -Infinity found at `start`
            found.append((pos, token))
            continue
        quotes += data.count(b'"', scanned, pos)
        if data.find(b'\\"', scanned, pos) != -1:  # rare: escaped quotes neither open nor close a string
            quotes -= _escaped_quotes(data, scanned, pos)
        scanned = pos
        if quotes % 2 == 0:
            found.append((pos, token))
    return found


def _escaped_quotes(data: bytes, begin: int, end: int) -> int:
    """Quotes in data[begin:end] preceded by an odd run of backslashes."""
    return sum(_backslash_run(data, pos) % 2 for pos in _find_all(data, b'\\"', begin, end))


def _backslash_run(data: bytes, last: int) -> int:
    """Length of the run of backslashes ending at `last`."""
    start = last
    while start >= 0 and data[start] == 0x5C:
        start -= 1
    return last - start


def error_position(err: Exception) -> int:
    match = re.search(r"\(byte (\d+)\)", str(err))
    return max(int(match.group(1)) - 1, 0) if match else 0


def replace_literals(data: bytes, positions: list[tuple[int, bytes]]) -> bytes:
    # memoryview slices: a bytes slice would copy, and a third copy of a 500 MB file is the peak.
    view = memoryview(data)
    pieces, start = [], 0
    for pos, token in positions:
        pieces.append(view[start:pos])
        pieces.append(SENTINEL_TEXT[token])
        start = pos + len(token)
    pieces.append(view[start:])
    return b"".join(pieces)


def restore_in_column(values: np.ndarray) -> np.ndarray:
    """Put NaN / +-Inf back in place; -> the mask of restored entries (same shape as `values`)."""
    restored = np.zeros(values.shape, dtype=bool)
    for sentinel, meant in SENTINEL_VALUE.items():
        hit = values == sentinel
        values[hit] = meant
        restored |= hit
    return restored


def restore_in_records(doc: dict[str, Any], image_rows: np.ndarray, annotation_rows: np.ndarray) -> None:
    """Put NaN / +-Inf back in the image width / height and annotation bbox / area fields that the typed
    decode found literals in (same file, same order: the rows match)."""
    sentinels = SENTINEL_VALUE
    for records, rows, keys in (
        (doc["images"], image_rows, ("width", "height")),
        (doc["annotations"], annotation_rows, ("bbox", "area")),
    ):
        for row in rows.tolist():
            record = records[row]
            for key in keys:
                value = record.get(key)
                if type(value) is float and value in sentinels:
                    record[key] = sentinels[value]
                elif type(value) is list:
                    record[key] = [sentinels.get(v, v) if type(v) is float else v for v in value]


def restore_in_objects(doc: Any, count: int) -> None:
    """Put NaN / +-Inf back where `replace_literals` left sentinels, in place; stops after `count`."""
    sentinels = SENTINEL_VALUE
    restored, stack = 0, [doc]
    while stack and restored < count:
        item = stack.pop()
        if type(item) is dict:
            children = []
            for key, value in item.items():
                kind = type(value)
                if kind is float and value in sentinels:
                    item[key] = sentinels[value]
                    restored += 1
                elif kind is list or kind is dict:
                    children.append(value)
            stack.extend(reversed(children))  # file order, so that early literals end the walk early
            continue
        # A list: C-level scans first; a Python loop only where a sentinel or a container is.
        kinds = set(map(type, item))
        if float in kinds and any(sentinel in item for sentinel in sentinels):
            for index, value in enumerate(item):
                if type(value) is float and value in sentinels:
                    item[index] = sentinels[value]
                    restored += 1
        if list in kinds or dict in kinds:
            stack.extend(reversed([value for value in item if type(value) is list or type(value) is dict]))
