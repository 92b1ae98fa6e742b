"""The --fix rules, decided for every record at once, then applied to the full COCO dict.

Rules (issue #11): drop annotations with an error-level finding; drop images whose file is missing,
unreadable or of another size (and malformed image records), with their annotations; drop later records
that repeat an image id (their annotations stay with the first); clip partially-out boxes to the image;
drop boxes under --min-size (after clipping); give repeated annotation ids new unique ids; set a
non-finite area to the box's w*h; drop images whose file_name leaves the image folder and category
records without an integer id. Everything else is kept as it was, segmentation included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nanguard.audit.checks import ANNOTATION_ERRORS, Geometry, gather
from nanguard.audit.load import Columns

# Image checks whose image (and its annotations) the fix drops.
IMAGE_DROPPING = ("malformed_image", "missing_image", "unreadable_image", "size_mismatch", "unsafe_path")

KEPT, IMAGE_DROPPED, UNDER_MIN_SIZE, UNDER_MIN_SIZE_AFTER_CLIP = 0, 1, 2, 3
# Drop reason codes above these name the error check, in ANNOTATION_ERRORS order.
_FIRST_ERROR_CODE = 4


@dataclass
class FixPlan:
    drop_reason: np.ndarray  # [N] int8 code: KEPT, or why the annotation is dropped
    clip_rows: np.ndarray  # annotation rows whose box is clipped (and kept)
    clipped_boxes: np.ndarray  # [len(clip_rows), 4] xywh float64
    renumber_rows: np.ndarray  # annotation rows given a new id
    new_ids: np.ndarray  # [len(renumber_rows)] int64
    area_rows: np.ndarray  # kept annotation rows whose non-finite area becomes w*h
    drop_image: np.ndarray  # [M] bool: record and its annotations dropped
    drop_image_record: np.ndarray  # [M] bool: only the record dropped (a repeated id)
    drop_category: np.ndarray | None = None  # [K] bool: malformed category records (None: keep all)

    def reason_text(self, code: int) -> str:
        if code == IMAGE_DROPPED:
            return "dropped (its image was dropped)"
        if code == UNDER_MIN_SIZE:
            return "dropped (under --min-size)"
        if code == UNDER_MIN_SIZE_AFTER_CLIP:
            return "dropped (under --min-size after clipping to the image)"
        return f"dropped ({ANNOTATION_ERRORS[code - _FIRST_ERROR_CODE]})"

    @property
    def annotations_dropped(self) -> int:
        return int(np.count_nonzero(self.drop_reason))

    @property
    def images_dropped(self) -> int:
        return int(np.count_nonzero(self.drop_image | self.drop_image_record))


def _clip(boxes: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """boxes: [K, 4] xywh float64 -> [K, 4] xywh, inside [0, W] x [0, H] as the checks compute it."""
    x1 = np.maximum(boxes[:, 0], 0.0)
    y1 = np.maximum(boxes[:, 1], 0.0)
    x2 = np.minimum(boxes[:, 0] + boxes[:, 2], width)
    y2 = np.minimum(boxes[:, 1] + boxes[:, 3], height)
    w, h = x2 - x1, y2 - y1
    # x1 + (x2 - x1) can round to just above x2: step down an ulp so a re-audit sees the box inside.
    for _ in range(4):
        over_w, over_h = x1 + w > width, y1 + h > height
        if not (over_w.any() or over_h.any()):
            break
        w = np.where(over_w, np.nextafter(w, -np.inf), w)
        h = np.where(over_h, np.nextafter(h, -np.inf), h)
    return np.stack([x1, y1, w, h], axis=1)


def plan_fix(
    cols: Columns,
    ann_hits: dict[str, np.ndarray],
    img_hits: dict[str, np.ndarray],
    geometry: Geometry,
    min_size: float,
    cat_hits: dict[str, np.ndarray] | None = None,
) -> FixPlan:
    n, m = cols.n_annotations, cols.n_images
    drop_image = np.zeros(m, dtype=bool)
    for name in IMAGE_DROPPING:
        if name in img_hits:
            drop_image[img_hits[name]] = True
    drop_image_record = np.zeros(m, dtype=bool)
    drop_image_record[img_hits.get("duplicate_image_id", np.zeros(0, dtype=np.int64))] = True

    reason = np.zeros(n, dtype=np.int8)
    # Reverse order so that the first error check in the contract's order is the reason named.
    for index in reversed(range(len(ANNOTATION_ERRORS))):
        reason[ann_hits[ANNOTATION_ERRORS[index]]] = _FIRST_ERROR_CODE + index
    on_dropped_image = gather(drop_image, geometry.image_row, False)
    reason[(reason == KEPT) & on_dropped_image] = IMAGE_DROPPED
    tiny = np.zeros(n, dtype=bool)
    tiny[ann_hits["tiny_box"]] = True
    reason[(reason == KEPT) & tiny] = UNDER_MIN_SIZE

    partial = np.zeros(n, dtype=bool)
    partial[ann_hits["partially_out_of_image"]] = True
    clip_rows = np.flatnonzero(partial & (reason == KEPT))
    clipped = _clip(cols.boxes[clip_rows], geometry.image_width[clip_rows], geometry.image_height[clip_rows])
    too_small = (clipped[:, 2] < min_size) | (clipped[:, 3] < min_size)
    reason[clip_rows[too_small]] = UNDER_MIN_SIZE_AFTER_CLIP
    clip_rows, clipped = clip_rows[~too_small], clipped[~too_small]

    duplicates = ann_hits["duplicate_annotation_id"]
    renumber_rows = duplicates[reason[duplicates] == KEPT]
    valid_ids = cols.ann_ids[cols.ann_id_ok]
    start = int(valid_ids.max()) + 1 if valid_ids.size else 1
    new_ids = np.arange(start, start + renumber_rows.size, dtype=np.int64)

    area_rows = ann_hits["nonfinite_area"]
    area_rows = area_rows[reason[area_rows] == KEPT]
    drop_category = None
    if cat_hits and cols.category_record_ok is not None:
        drop_category = np.zeros(cols.category_record_ok.shape[0], dtype=bool)
        drop_category[cat_hits.get("malformed_category", np.zeros(0, dtype=np.int64))] = True
    return FixPlan(
        drop_reason=reason, clip_rows=clip_rows, clipped_boxes=clipped, renumber_rows=renumber_rows,
        new_ids=new_ids, area_rows=area_rows, drop_image=drop_image, drop_image_record=drop_image_record,
        drop_category=drop_category,
    )


def apply_fix(document: dict[str, Any], plan: FixPlan, boxes: np.ndarray) -> dict[str, Any]:
    """The cleaned COCO dict. Kept records are the original objects (shared, not copied) unless the fix
    changes them, in which case they are shallow copies with the changed fields. `boxes`: [N, 4] xywh."""
    images = document["images"]
    keep_images = ~(plan.drop_image | plan.drop_image_record)
    annotations = document["annotations"]
    kept_rows = np.flatnonzero(plan.drop_reason == KEPT)
    clean_annotations = [annotations[i] for i in kept_rows.tolist()]

    changes: dict[int, dict[str, Any]] = {}
    for row, box in zip(plan.clip_rows.tolist(), plan.clipped_boxes.tolist()):
        changes.setdefault(row, {})["bbox"] = box
    for row, new_id in zip(plan.renumber_rows.tolist(), plan.new_ids.tolist()):
        changes.setdefault(row, {})["id"] = new_id
    final_boxes = boxes.copy()
    final_boxes[plan.clip_rows] = plan.clipped_boxes
    for row in plan.area_rows.tolist():
        changes.setdefault(row, {})["area"] = float(final_boxes[row, 2] * final_boxes[row, 3])
    if changes:
        rows = np.array(sorted(changes), dtype=np.int64)
        positions = np.searchsorted(kept_rows, rows)
        for row, position in zip(rows.tolist(), positions.tolist()):
            clean_annotations[position] = {**annotations[row], **changes[row]}

    clean = dict(document)  # info, licenses, categories and any other key, as they were
    clean["images"] = [images[i] for i in np.flatnonzero(keep_images).tolist()]
    clean["annotations"] = clean_annotations
    if plan.drop_category is not None and plan.drop_category.any():
        # a category without an integer id names no class; its annotations are unknown_category already
        clean["categories"] = [c for c, drop in zip(document["categories"], plan.drop_category.tolist()) if not drop]
    return clean
