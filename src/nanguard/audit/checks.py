"""The checks: each one a vectorised numpy expression over the columns, returning the rows it flags.

Boxes are COCO `xywh` as written; the image-relative checks convert to `xyxy` once. A box can be flagged
by several checks (a zero width and a negative height); a box that is malformed or not finite is not
looked at by the geometric checks, since its geometry means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanguard.audit.load import Columns
from nanguard.data.coco import escapes_folder

ERROR, WARNING, INFO = "error", "warning", "info"

# Above this, log(w / h) style regression targets get large enough to dominate the box loss.
EXTREME_ASPECT_RATIO = 50.0


@dataclass(frozen=True)
class Check:
    name: str
    severity: str
    target: str  # "annotation", "image" or "category"
    why: str  # shown in the table: what makes it dangerous


CHECKS: dict[str, Check] = {
    check.name: check
    for check in [
        # Annotation, error
        Check("malformed_annotation", ERROR, "annotation", "record is not an object, or its id / image_id / category_id is missing or not an integer"),
        Check("malformed_bbox", ERROR, "annotation", "bbox is missing or not a list of 4 numbers"),
        Check("nan_coord", ERROR, "annotation", "NaN in bbox: the regression target is NaN"),
        Check("inf_coord", ERROR, "annotation", "Inf in bbox: the regression target is Inf or NaN"),
        Check("zero_width", ERROR, "annotation", "width 0: log(0) in the regression target"),
        Check("zero_height", ERROR, "annotation", "height 0: log(0) in the regression target"),
        Check("negative_size", ERROR, "annotation", "negative width or height: log of a negative number is NaN"),
        Check("out_of_image", ERROR, "annotation", "box does not overlap its image"),
        Check("unknown_category", ERROR, "annotation", "category_id is not in categories"),
        Check("orphan_annotation", ERROR, "annotation", "image_id is not in images"),
        Check("duplicate_annotation_id", ERROR, "annotation", "annotation id used more than once"),
        # Annotation, warning
        Check("tiny_box", WARNING, "annotation", "width or height below --min-size"),
        Check("partially_out_of_image", WARNING, "annotation", "box extends past the image border"),
        Check("extreme_aspect_ratio", WARNING, "annotation", f"width/height or height/width above {EXTREME_ASPECT_RATIO:g}"),
        Check("nonfinite_area", WARNING, "annotation", "area is NaN, Inf or not a number: COCO evaluation mis-bins it"),
        # Image, error
        Check("malformed_image", ERROR, "image", "record is not an object, or its id is not an integer, or width / height is missing, not finite or not positive"),
        Check("duplicate_image_id", ERROR, "image", "image id used more than once"),
        Check("missing_image", ERROR, "image", "file not found under --images"),
        Check("unreadable_image", ERROR, "image", "file cannot be opened or decoded"),
        Check("size_mismatch", ERROR, "image", "file size differs from the json's width / height"),
        Check("unsafe_path", ERROR, "image", "file_name is absolute or climbs out of the image folder (..): never read"),
        # Image, warning / info
        Check("constant_image", WARNING, "image", "a channel has zero std: per-image normalisation divides by 0"),
        Check("crowd_only_image", WARNING, "image", "every annotation is a crowd box (iscrowd=1), which training skips: it trains as background"),
        Check("high_bit_depth", WARNING, "image", "16-bit (or float) pixels: training scales them to 8 bits"),
        Check("image_without_annotations", INFO, "image", "no annotation refers to it (a pure background image)"),
        # Category, error
        Check("malformed_category", ERROR, "category", "record is not an object, or its id is missing or not an integer"),
    ]
}

# Error checks whose annotation the fix drops: a repeated id is an error too, but the fix renumbers it.
ANNOTATION_ERRORS = [
    c.name for c in CHECKS.values()
    if c.target == "annotation" and c.severity == ERROR and c.name != "duplicate_annotation_id"
]


@dataclass
class Geometry:
    """Per-annotation quantities that checks and the fix share."""

    image_row: np.ndarray  # [N] int64, row of the annotation's image in `images` (first with that id), -1 if none
    image_width: np.ndarray  # [N] float64, NaN where the image is unknown or malformed
    image_height: np.ndarray  # [N] float64
    sane: np.ndarray  # [N] bool: well-formed, finite, positive size, on a known valid image


def later_duplicates(ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows (sorted) whose valid id already appeared in an earlier valid row."""
    rows = np.flatnonzero(valid)
    if rows.size < 2:
        return np.zeros(0, dtype=np.int64)
    order = rows[np.argsort(ids[rows], kind="stable")]
    sorted_ids = ids[order]
    repeat = np.empty(order.size, dtype=bool)
    repeat[0] = False
    repeat[1:] = sorted_ids[1:] == sorted_ids[:-1]
    return np.sort(order[repeat])


def gather(values: np.ndarray, rows: np.ndarray, fill) -> np.ndarray:
    """values[rows], with `fill` where a row is -1 (also when `values` is empty)."""
    padded = np.append(values, np.array([fill], dtype=values.dtype))
    return padded[np.where(rows >= 0, rows, values.shape[0])]


def image_record_ok(cols: Columns) -> np.ndarray:
    """[M] bool: an object with an integer id and finite positive width and height."""
    with np.errstate(invalid="ignore"):
        return (
            cols.image_is_object
            & cols.image_id_ok
            & np.isfinite(cols.widths) & (cols.widths > 0)
            & np.isfinite(cols.heights) & (cols.heights > 0)
        )


def _lookup_images(cols: Columns) -> np.ndarray:
    """[N] row of each annotation's image (its first record with that id), -1 where there is none."""
    rows = np.flatnonzero(cols.image_id_ok)
    if rows.size == 0 or cols.n_annotations == 0:
        return np.full(cols.n_annotations, -1, dtype=np.int64)
    # Stable sort + first of each run: the first record with an id is the one annotations belong to.
    order = rows[np.argsort(cols.image_ids[rows], kind="stable")]
    sorted_ids = cols.image_ids[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    unique_ids, unique_rows = sorted_ids[first], order[first]
    pos = np.searchsorted(unique_ids, cols.ann_image_ids)
    pos_clipped = np.minimum(pos, unique_ids.size - 1)
    found = (unique_ids[pos_clipped] == cols.ann_image_ids) & cols.ann_image_id_ok
    return np.where(found, unique_rows[pos_clipped], -1)


def run_annotation_checks(cols: Columns, min_size: float) -> tuple[dict[str, np.ndarray], Geometry]:
    """-> ({check: sorted annotation rows}, geometry). No Python loop over annotations."""
    hits: dict[str, np.ndarray] = {}
    boxes = cols.boxes
    x, y, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    formed = cols.box_ok

    hits["malformed_annotation"] = ~(cols.ann_is_object & cols.ann_id_ok & cols.ann_image_id_ok & cols.ann_category_ok)
    hits["malformed_bbox"] = cols.ann_is_object & ~formed
    has_nan = formed & np.isnan(boxes).any(axis=1)
    hits["nan_coord"] = has_nan
    hits["inf_coord"] = formed & np.isinf(boxes).any(axis=1)
    finite = formed & np.isfinite(boxes).all(axis=1)
    hits["zero_width"] = finite & (w == 0)
    hits["zero_height"] = finite & (h == 0)
    hits["negative_size"] = finite & ((w < 0) | (h < 0))
    positive = finite & (w > 0) & (h > 0)

    image_row = _lookup_images(cols)
    known = image_row >= 0
    hits["orphan_annotation"] = cols.ann_image_id_ok & ~known
    image_ok = image_record_ok(cols)
    on_valid_image = gather(image_ok, image_row, False)
    width = np.where(on_valid_image, gather(cols.widths, image_row, np.nan), np.nan)
    height = np.where(on_valid_image, gather(cols.heights, image_row, np.nan), np.nan)
    sane = positive & on_valid_image

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        x2, y2 = x + w, y + h
        # No overlap at all: not even a sliver of the box lies inside [0, W] x [0, H].
        outside = sane & ((x2 <= 0) | (y2 <= 0) | (x >= width) | (y >= height))
        hits["out_of_image"] = outside
        hits["partially_out_of_image"] = sane & ~outside & ((x < 0) | (y < 0) | (x2 > width) | (y2 > height))
        hits["tiny_box"] = positive & ((w < min_size) | (h < min_size))
        hits["extreme_aspect_ratio"] = positive & (np.maximum(w / h, h / w) > EXTREME_ASPECT_RATIO)

    if cols.category_ids.size:
        known_category = np.isin(cols.ann_category_ids, cols.category_ids)
    else:
        known_category = np.zeros(cols.n_annotations, dtype=bool)
    hits["unknown_category"] = cols.ann_category_ok & ~known_category
    hits["nonfinite_area"] = cols.area_bad & cols.ann_is_object

    rows = {name: np.flatnonzero(mask) for name, mask in hits.items()}
    rows["duplicate_annotation_id"] = later_duplicates(cols.ann_ids, cols.ann_id_ok & cols.ann_is_object)
    return rows, Geometry(image_row=image_row, image_width=width, image_height=height, sane=sane)


def unsafe_paths(cols: Columns) -> np.ndarray:
    """[M] bool: file_name is absolute or climbs out of the image folder (such a file is never opened)."""
    names = cols.file_names
    # One look at all the names together first: no '..', no ':', none starting with '/' or '\\' (what
    # every real split looks like) means no name can escape, without a Python call per name.
    blob = "\0".join(map(str, names))
    if ".." not in blob and ":" not in blob and not blob.startswith(("/", "\\")) and "\0/" not in blob \
            and "\0\\" not in blob:
        return np.zeros(len(names), dtype=bool)
    return np.array([name is not None and escapes_folder(name) for name in names], dtype=bool)


def run_image_checks(cols: Columns) -> dict[str, np.ndarray]:
    """Checks on the image records alone (the files are `images.inspect`'s business)."""
    hits = {
        "malformed_image": np.flatnonzero(~image_record_ok(cols)),
        "duplicate_image_id": later_duplicates(cols.image_ids, cols.image_id_ok & cols.image_is_object),
        "unsafe_path": np.flatnonzero(unsafe_paths(cols)),
    }
    referenced = np.isin(cols.image_ids, cols.ann_image_ids[cols.ann_image_id_ok])
    hits["image_without_annotations"] = np.flatnonzero(cols.image_id_ok & cols.image_is_object & ~referenced)
    hits["crowd_only_image"] = _crowd_only(cols)
    return hits


def _crowd_only(cols: Columns) -> np.ndarray:
    """Rows of images that have annotations, all of them crowd: the training index keeps no target."""
    if cols.ann_crowd is None or cols.n_annotations == 0:
        return np.zeros(0, dtype=np.int64)
    image_row = _lookup_images(cols)
    known = image_row >= 0
    total = np.bincount(image_row[known], minlength=cols.n_images)
    crowd = np.bincount(image_row[known & cols.ann_crowd], minlength=cols.n_images)
    return np.flatnonzero((total > 0) & (crowd == total))


def run_category_checks(cols: Columns) -> dict[str, np.ndarray]:
    ok = cols.category_record_ok
    return {"malformed_category": np.zeros(0, dtype=np.int64) if ok is None else np.flatnonzero(~ok)}
