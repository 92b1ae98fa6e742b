"""Target boxes a detector can learn from, checked on the host before a batch goes to the device.

One non-finite or degenerate box must cost one box, not the batch: torchvision's detectors raise on a
degenerate box (after a host sync per image) and let a NaN coordinate through. The batch's boxes are
numpy arrays on the host already, so checking them here costs the device nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from nanguard.data.loader import Batch


def drop_invalid_targets(batch: Batch) -> tuple[Batch, tuple[tuple, ...]]:
    """(the batch without invalid target boxes, (image id, annotation id, why) of each box dropped).

    Invalid: a non-finite coordinate, or x2 <= x1 or y2 <= y1 (boxes are [N, 4] xyxy)."""
    boxes, labels, annotation_ids, dropped = [], [], [], []
    for image_id, b, lab, ann_ids in zip(batch.image_ids, batch.boxes, batch.labels, batch.annotation_ids):
        finite = np.isfinite(b).all(axis=1)
        with np.errstate(invalid="ignore"):
            positive = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        keep = finite & positive
        if keep.all():
            boxes.append(b), labels.append(lab), annotation_ids.append(ann_ids)
            continue
        for j in np.flatnonzero(~keep):
            why = "non-finite coordinate" if not finite[j] else "zero or negative width or height"
            dropped.append((image_id, ann_ids[j] if j < len(ann_ids) else None, why))
        boxes.append(b[keep]), labels.append(lab[keep])
        annotation_ids.append(tuple(a for a, k in zip(ann_ids, keep) if k))
    if not dropped:
        return batch, ()
    return replace(batch, boxes=boxes, labels=labels, annotation_ids=tuple(annotation_ids)), tuple(dropped)
