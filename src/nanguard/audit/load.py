"""Reading a COCO detection file into numpy columns, fast when the file is clean, tolerant when it is not.

A 500 MB file decoded into Python dicts costs 3+ GB and 15-25 s, so the decoders are tried in order:
1. msgspec typed decode of only the fields the checks read (segmentation is skipped, never built), with
   the cyclic GC paused (millions of new containers, no cycles).
2. The same, after rewriting bare `NaN` / `Infinity` / `-Infinity` tokens outside strings (Python's json
   writes them, msgspec rejects them) into finite sentinel numbers that the columns map back.
3. A loose decode into plain Python objects, when a record has the wrong type (a string where a number
   belongs), which a typed decode rejects for the whole file. The columns are then built record by
   record, and a bad record becomes a `malformed_*` finding instead of an exit 2.
The full document (for --fix and for training) is a separate untyped decode, made after the typed one
is freed; with literals, of the rewritten text, after which the sentinels are put back as NaN / Inf.
That decode, and the file reading underneath both, is `nanguard.data.cocofile`: training reads its
annotation files with it too, and data does not import the audit.

A file that is not usable at all (missing, a folder, unreadable, not JSON, truncated, not a COCO
detection document) raises `UserError` with one line naming the file and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from nanguard.data import literals
# read_document is re-exported for its older importers: the shared reader is data's now
from nanguard.data.cocofile import check_document, decode_full, decoding, mapped, not_json, read_bytes
from nanguard.data.cocofile import read_document  # noqa: F401

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

class _Image(msgspec.Struct, gc=False):
    id: int | None = None
    width: float | None = None
    height: float | None = None
    file_name: str | None = None


class _Annotation(msgspec.Struct, gc=False):
    id: int | None = None
    image_id: int | None = None
    category_id: int | None = None
    # A tuple decodes faster than a list and any length still decodes (a 3-number bbox is a finding).
    bbox: tuple[float, ...] | None = None
    area: float | None = None
    iscrowd: Any = None  # any type: a `true` must not push the whole file off the typed path


class _Category(msgspec.Struct, gc=False):
    id: int | None = None


class _Document(msgspec.Struct):
    images: list[_Image] | None = None
    annotations: list[_Annotation] | None = None
    categories: list[_Category] | None = None


_TYPED_DECODER = msgspec.json.Decoder(_Document)


@dataclass
class Columns:
    """The fields the checks need, one numpy array per field, one row per record in file order.

    A value that is missing or of the wrong type has `*_ok = False` (and 0 / NaN in the value array);
    `raw_*_ids` keeps such ids as written, so findings can name them.
    """

    image_ids: np.ndarray  # [M] int64
    image_id_ok: np.ndarray  # [M] bool
    widths: np.ndarray  # [M] float64, NaN where missing or not a number
    heights: np.ndarray  # [M] float64
    file_names: list[str | None]  # [M]
    image_is_object: np.ndarray  # [M] bool: the record is a JSON object at all
    ann_ids: np.ndarray  # [N] int64
    ann_id_ok: np.ndarray  # [N] bool
    ann_image_ids: np.ndarray  # [N] int64
    ann_image_id_ok: np.ndarray  # [N] bool
    ann_category_ids: np.ndarray  # [N] int64
    ann_category_ok: np.ndarray  # [N] bool
    boxes: np.ndarray  # [N, 4] xywh float64 as written (NaN / Inf kept); NaN rows where malformed
    box_ok: np.ndarray  # [N] bool: a list of exactly 4 numbers
    area_bad: np.ndarray  # [N] bool: `area` present but NaN / Inf / not a number
    ann_is_object: np.ndarray  # [N] bool
    category_ids: np.ndarray  # [C] int64, the valid ones
    # [K] bool per category record: an object with an integer id (None: all of them, the typed path)
    category_record_ok: np.ndarray | None = None
    raw_category_ids: dict[int, Any] = field(default_factory=dict)  # row -> id as written, bad rows only
    ann_crowd: np.ndarray | None = None  # [N] bool: iscrowd set (truthy), as the training index reads it
    raw_image_ids: dict[int, Any] = field(default_factory=dict)  # row -> id as written, bad rows only
    raw_ann_ids: dict[int, Any] = field(default_factory=dict)
    raw_ann_image_ids: dict[int, Any] = field(default_factory=dict)
    raw_ann_category_ids: dict[int, Any] = field(default_factory=dict)
    nonstandard_literals: int = 0  # NaN / Infinity tokens found in the file
    # Rows whose width / height (images) or bbox / area (annotations) held a literal, and how many
    # literals that accounts for: the full decode restores just those records when it is all of them.
    literal_image_rows: np.ndarray | None = None
    literal_annotation_rows: np.ndarray | None = None
    literals_in_columns: int = 0

    @property
    def n_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def n_annotations(self) -> int:
        return int(self.ann_ids.shape[0])


@dataclass
class Loaded:
    path: Path
    columns: Columns
    document: dict[str, Any] | None  # the full COCO dict, only when asked for (the --fix writer needs it)


# -- columns from typed structs (the fast path: types already validated by msgspec) -------------------


def _int_array(values: list) -> tuple[np.ndarray, np.ndarray]:
    if None not in values:
        return np.array(values, dtype=np.int64), np.ones(len(values), dtype=bool)
    ok = np.array([v is not None for v in values], dtype=bool)
    return np.array([0 if v is None else v for v in values], dtype=np.int64), ok


def _float_array(values: list) -> np.ndarray:
    if None in values:
        values = [math.nan if v is None else v for v in values]
    return np.array(values, dtype=np.float64).reshape(len(values))


def _boxes_from_lists(boxes: list, n: int) -> tuple[np.ndarray, np.ndarray]:
    """boxes: list of lists of numbers (or None) -> ([n, 4] float64, ok [n] bool)."""
    lengths = np.fromiter(map(len if None not in boxes else _len_or_minus_one, boxes), dtype=np.int64, count=n)
    ok = lengths == 4
    if ok.all():
        flat = np.fromiter(chain.from_iterable(boxes), dtype=np.float64, count=4 * n)
        return flat.reshape(n, 4), ok
    out = np.full((n, 4), np.nan)
    rows = np.flatnonzero(ok)
    if rows.size:
        picked = [boxes[i] for i in rows.tolist()]
        out[rows] = np.fromiter(chain.from_iterable(picked), dtype=np.float64, count=4 * rows.size).reshape(-1, 4)
    return out, ok


def _len_or_minus_one(value: Any) -> int:
    return len(value) if type(value) in (tuple, list) else -1


def _int_column(records: list, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The int field `name` of every struct, straight into an array; the list path only when a value
    is missing (None) or beyond int64."""
    get = attrgetter(name)
    try:
        return np.fromiter(map(get, records), dtype=np.int64, count=len(records)), np.ones(len(records), dtype=bool)
    except (TypeError, OverflowError):
        return _int_array(list(map(get, records)))


def _float_column(records: list, name: str) -> np.ndarray:
    get = attrgetter(name)
    try:
        return np.fromiter(map(get, records), dtype=np.float64, count=len(records))
    except TypeError:  # a None: NaN
        return _float_array(list(map(get, records)))


def _columns_from_typed(doc: _Document, literal_count: int) -> Columns:
    images, anns, cats = doc.images, doc.annotations, doc.categories
    image_ids, image_id_ok = _int_column(images, "id")
    widths = _float_column(images, "width")
    heights = _float_column(images, "height")
    ann_ids, ann_id_ok = _int_column(anns, "id")
    ann_image_ids, ann_image_id_ok = _int_column(anns, "image_id")
    ann_category_ids, ann_category_ok = _int_column(anns, "category_id")
    boxes, box_ok = _boxes_from_lists(list(map(attrgetter("bbox"), anns)), len(anns))
    areas = _float_column(anns, "area")
    image_rows = annotation_rows = None
    in_columns = 0
    if literal_count:
        in_widths, in_heights = literals.restore_in_column(widths), literals.restore_in_column(heights)
        in_boxes, in_areas = literals.restore_in_column(boxes), literals.restore_in_column(areas)
        in_columns = int(in_widths.sum() + in_heights.sum() + in_boxes.sum() + in_areas.sum())
        image_rows = np.flatnonzero(in_widths | in_heights)
        annotation_rows = np.flatnonzero(in_boxes.any(axis=1) | in_areas)
    area_bad = np.isinf(areas)
    # NaN means "absent" too (None was mapped to NaN): look back at the records, for those rows only.
    nan_rows = np.flatnonzero(np.isnan(areas))
    area_bad[nan_rows] = np.array([anns[i].area is not None for i in nan_rows.tolist()], dtype=bool)
    category_ids = np.array([c.id for c in cats if c.id is not None], dtype=np.int64)
    category_record_ok = np.array([c.id is not None for c in cats], dtype=bool)
    ann_crowd = np.fromiter(map(bool, map(attrgetter("iscrowd"), anns)), dtype=bool, count=len(anns))
    return Columns(
        image_ids=image_ids, image_id_ok=image_id_ok, widths=widths, heights=heights,
        file_names=[im.file_name for im in images], image_is_object=np.ones(len(images), dtype=bool),
        ann_ids=ann_ids, ann_id_ok=ann_id_ok, ann_image_ids=ann_image_ids, ann_image_id_ok=ann_image_id_ok,
        ann_category_ids=ann_category_ids, ann_category_ok=ann_category_ok, boxes=boxes, box_ok=box_ok,
        area_bad=area_bad, ann_is_object=np.ones(len(anns), dtype=bool), category_ids=category_ids,
        category_record_ok=category_record_ok, ann_crowd=ann_crowd,
        nonstandard_literals=literal_count, literal_image_rows=image_rows, literal_annotation_rows=annotation_rows,
        literals_in_columns=in_columns,
    )


# -- columns from plain Python objects (tolerant: any record may be of any type) ----------------------


def _is_int(value: Any) -> bool:
    return type(value) is int and _INT64_MIN <= value <= _INT64_MAX


def _is_number(value: Any) -> bool:
    # bool is an int subclass: `true` is not a coordinate.
    return type(value) is float or type(value) is int


def _field(records: list, key: str, all_objects: bool) -> list:
    if all_objects:
        return [r.get(key) for r in records]
    return [r.get(key) if type(r) is dict else None for r in records]


def _loose_int_column(records: list, key: str, all_objects: bool) -> tuple[np.ndarray, np.ndarray, dict[int, Any]]:
    values = _field(records, key, all_objects)
    if set(map(type, values)) <= {int}:
        try:
            return np.array(values, dtype=np.int64), np.ones(len(values), dtype=bool), {}
        except OverflowError:
            pass
    ok = np.array([_is_int(v) for v in values], dtype=bool)
    out = np.array([v if good else 0 for v, good in zip(values, ok.tolist())], dtype=np.int64)
    raw = {i: values[i] for i in np.flatnonzero(~ok).tolist()}
    return out, ok, raw


def _loose_float_column(records: list, key: str, all_objects: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (values, NaN where absent or not a number; present mask; present-but-not-a-number mask)."""
    values = _field(records, key, all_objects)
    n = len(values)
    types = set(map(type, values))
    if types <= {float, int}:
        try:
            return np.array(values, dtype=np.float64).reshape(n), np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
        except OverflowError:
            pass
    present = np.array([v is not None for v in values], dtype=bool)
    numbers = [float(v) if _is_number(v) else math.nan for v in values]
    wrong = present & np.array([not _is_number(v) for v in values], dtype=bool)
    return np.array(numbers, dtype=np.float64).reshape(n), present, wrong


def _loose_boxes(records: list, all_objects: bool) -> tuple[np.ndarray, np.ndarray]:
    boxes = _field(records, "bbox", all_objects)
    n = len(boxes)
    # The common case, checked with C-level iteration: every bbox a list of 4 ints / floats.
    if n and set(map(type, boxes)) == {list} and set(map(len, boxes)) == {4}:
        if set(map(type, chain.from_iterable(boxes))) <= {int, float}:
            return _boxes_from_lists(boxes, n)
    return _boxes_from_lists(
        [b if type(b) is list and len(b) == 4 and all(map(_is_number, b)) else None for b in boxes], n
    )


def _columns_from_loose(doc: dict[str, Any], literal_count: int) -> Columns:
    images, anns, cats = doc["images"], doc["annotations"], doc["categories"]
    image_is_object = np.array([type(r) is dict for r in images], dtype=bool)
    ann_is_object = np.array([type(r) is dict for r in anns], dtype=bool)
    images_objects, anns_objects = bool(image_is_object.all()), bool(ann_is_object.all())
    image_ids, image_id_ok, raw_image_ids = _loose_int_column(images, "id", images_objects)
    widths, _, _ = _loose_float_column(images, "width", images_objects)
    heights, _, _ = _loose_float_column(images, "height", images_objects)
    ann_ids, ann_id_ok, raw_ann_ids = _loose_int_column(anns, "id", anns_objects)
    ann_image_ids, ann_image_id_ok, raw_ann_image_ids = _loose_int_column(anns, "image_id", anns_objects)
    ann_category_ids, ann_category_ok, raw_ann_category_ids = _loose_int_column(anns, "category_id", anns_objects)
    boxes, box_ok = _loose_boxes(anns, anns_objects)
    areas, area_present, area_wrong = _loose_float_column(anns, "area", anns_objects)
    category_ids, cat_ok, raw_category_ids = _loose_int_column(cats, "id", all(type(c) is dict for c in cats))
    cat_ok &= np.array([type(c) is dict for c in cats], dtype=bool)
    ann_crowd = np.array([bool(v) for v in _field(anns, "iscrowd", anns_objects)], dtype=bool)
    file_names = _field(images, "file_name", images_objects)
    return Columns(
        image_ids=image_ids, image_id_ok=image_id_ok, widths=widths, heights=heights,
        file_names=[name if type(name) is str else None for name in file_names],
        image_is_object=image_is_object,
        ann_ids=ann_ids, ann_id_ok=ann_id_ok, ann_image_ids=ann_image_ids, ann_image_id_ok=ann_image_id_ok,
        ann_category_ids=ann_category_ids, ann_category_ok=ann_category_ok, boxes=boxes, box_ok=box_ok,
        area_bad=area_wrong | (area_present & ~np.isfinite(areas)),
        ann_is_object=ann_is_object,
        category_ids=category_ids[cat_ok], category_record_ok=cat_ok, raw_category_ids=raw_category_ids,
        ann_crowd=ann_crowd,
        raw_image_ids=raw_image_ids, raw_ann_ids=raw_ann_ids, raw_ann_image_ids=raw_ann_image_ids,
        raw_ann_category_ids=raw_ann_category_ids, nonstandard_literals=literal_count,
    )


def load(path: str | Path, *, keep_document: bool = False) -> Loaded:
    """Read `path` into columns; with `keep_document`, also the full COCO dict (slower, more memory)."""
    with decoding(Path(path)):
        return _load(Path(path), keep_document)


def _load(path: Path, keep_document: bool) -> Loaded:
    typed, count = _decode_typed(path)
    if typed is not None and None not in (typed.images, typed.annotations, typed.categories):
        # Columns from compact structs are several times faster to build than from a million dicts
        # scattered among their segmentation lists (benchmarks/audit_speed.py). So even with the full
        # document wanted, the typed decode builds the columns, and is freed before the full decode.
        columns = _columns_from_typed(typed, count)
        del typed
        if not keep_document:
            return Loaded(path, columns, None)
        rows = (columns.literals_in_columns, columns.literal_image_rows, columns.literal_annotation_rows)
        return Loaded(path, columns, check_document(path, decode_full(path, count > 0, rows)))
    del typed
    # A record of the wrong type, or not a COCO document at all: the loose path says which.
    doc = check_document(path, decode_full(path, count > 0))
    return Loaded(path, _columns_from_loose(doc, count), doc if keep_document else None)


def _decode_typed(path: Path) -> tuple[_Document | None, int]:
    """-> (the typed document, or None when a record has the wrong type; number of NaN / Inf literals).

    Reads the file itself so that its text dies here: the columns never need it."""
    with mapped(path) as view:
        try:
            return _TYPED_DECODER.decode(view), 0
        except msgspec.ValidationError:  # a DecodeError subclass: caught first
            return None, 0
        except msgspec.DecodeError as err:
            error = err
    data = read_bytes(path)
    # Everything before the first error is valid JSON without literals: scan only from there.
    found = literals.literal_positions(data, literals.error_position(error))
    if not found:
        raise not_json(path, error) from None
    replaced = literals.replace_literals(data, found)
    # Two copies of the text exist while replacing, never during the decode (peak memory).
    del data
    try:
        return _TYPED_DECODER.decode(replaced), len(found)
    except msgspec.ValidationError:
        return None, len(found)
    except msgspec.DecodeError as err:
        raise not_json(path, err) from None
