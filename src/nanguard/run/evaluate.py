"""COCO mAP of a backend's model on a validation split (framework-neutral): predict, then score."""

from __future__ import annotations

from typing import Any

from nanguard.data.coco import CocoIndex
from nanguard.evaluation.coco import evaluate_boxes


def evaluate(backend, index: CocoIndex, document: dict[str, Any], *, batch_size: int,
             max_images: int = 0) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """(metrics incl. `skipped_images`, the 12-line table, the COCO detections)."""
    skipped: list = []
    detections = backend.predict(index, batch_size=batch_size, max_images=max_images, skipped=skipped)
    image_ids = [r.image_id for r in index.records[:max_images]] if max_images else None
    metrics, table = evaluate_boxes(document, detections, image_ids)
    metrics["skipped_images"] = len(skipped)
    return metrics, table, detections
