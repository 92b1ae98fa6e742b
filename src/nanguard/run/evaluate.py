"""COCO mAP of a backend's model on a validation split (framework-neutral): load the images, skip
those the model cannot take, have the backend predict raw boxes, turn them into COCO detections, score."""

from __future__ import annotations

import sys
from typing import Any

from nanguard.data.coco import CocoIndex
from nanguard.data.loader import load_image
from nanguard.evaluation.coco import evaluate_boxes

# An image whose short side the resize takes below this many pixels makes torchvision's interpolate
# fail ("output (H: 0, ...)"): 2 rather than 1, since torch floors a float size of 0.99999.
MIN_RESIZED_SIDE = 2.0


def resized_short_side(height: int, width: int, min_size: int, max_size: int) -> float:
    """The short side, in pixels, of an image after a detector's resize (torchvision's
    GeneralizedRCNNTransform, which both backends follow: the short side to min_size, capped so the long
    side stays within max_size)."""
    short, long = float(min(height, width)), float(max(height, width))
    if short <= 0:
        return 0.0
    return short * min(min_size / short, max_size / long)


def predict(backend, index: CocoIndex, *, batch_size: int, min_size: int, max_size: int, max_images: int = 0,
            skipped: list | None = None) -> list[dict[str, Any]]:
    """COCO-format detections (bbox xywh, the dataset's category ids) for the images of `index`.

    An image that cannot be read (a truncated file), or one the model cannot take (so long and thin that the resize leaves under 2 pixels of its short
    side, e.g. 20000x20 at max_size 128) is skipped with a warning line on stderr: it gets no detections,
    so its objects count as missed; its id is appended to `skipped`."""
    records = index.records[:max_images] if max_images else index.records
    detections: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        kept, images = [], []
        for record in records[start:start + batch_size]:
            try:
                array = load_image(record.path)
            except (OSError, ValueError) as exc:  # an evaluation never costs the training before it
                print(f"nanguard: warning: {record.path}: cannot read image id {record.image_id} "
                      f"({exc.__class__.__name__}), skipped (no detections: its objects count as missed); "
                      "run `nanguard audit --images` on the split", file=sys.stderr)
                if skipped is not None:
                    skipped.append(record.image_id)
                continue
            height, width = array.shape[:2]
            if resized_short_side(height, width, min_size, max_size) < MIN_RESIZED_SIDE:
                print(f"nanguard: warning: {record.path}: image id {record.image_id} is {width}x{height}; "
                      "resized to model.min_size/max_size its short side is under 2 px, skipped (no "
                      "detections)", file=sys.stderr)
                if skipped is not None:
                    skipped.append(record.image_id)
                continue
            kept.append(record)
            images.append(array)
        for record, (boxes, scores, labels) in zip(kept, backend.predict(images) if images else []):
            for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                detections.append({"image_id": record.image_id, "category_id": index.category_ids[int(label) - 1],
                                   "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)],
                                   "score": round(float(score), 5)})
    return detections


def evaluate(backend, index: CocoIndex, document: dict[str, Any], *, batch_size: int, min_size: int,
             max_size: int, max_images: int = 0) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """(metrics incl. `skipped_images`, the 12-line table, the COCO detections)."""
    skipped: list = []
    detections = predict(backend, index, batch_size=batch_size, min_size=min_size, max_size=max_size,
                         max_images=max_images, skipped=skipped)
    image_ids = [r.image_id for r in index.records[:max_images]] if max_images else None
    metrics, table = evaluate_boxes(document, detections, image_ids)
    metrics["skipped_images"] = len(skipped)
    return metrics, table, detections
