"""Inference over the validation split and COCO mAP (faster-coco-eval)."""

from __future__ import annotations

from typing import Any

import torch

from nanguard.data.coco import CocoIndex
from nanguard.data.loader import load_image
from nanguard.errors import UserError
from nanguard.evaluation.coco import evaluate_boxes


@torch.no_grad()
def predict(model: torch.nn.Module, index: CocoIndex, *, batch_size: int, device: torch.device,
            max_images: int = 0, progress=None) -> list[dict[str, Any]]:
    """COCO-format detections (bbox xywh, category ids of the dataset) for the images of `index`."""
    was_training = model.training
    model.eval()
    records = index.records[:max_images] if max_images else index.records
    detections: list[dict[str, Any]] = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = []
            for record in chunk:
                try:
                    array = load_image(record.path)
                except (OSError, ValueError) as exc:
                    raise UserError(f"{record.path}: cannot read image id {record.image_id} "
                                    f"({exc.__class__.__name__}); run `nanguard audit` on the split") from None
                images.append(torch.from_numpy(array.copy()).to(device).permute(2, 0, 1).float() / 255.0)
            outputs = model(images)
            for record, out in zip(chunk, outputs):
                boxes = out["boxes"].float().cpu()
                boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh (COCO)
                for box, score, label in zip(boxes.tolist(), out["scores"].float().cpu().tolist(),
                                             out["labels"].cpu().tolist()):
                    detections.append({"image_id": record.image_id,
                                       "category_id": index.category_ids[label - 1],
                                       "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return detections


def evaluate(model, index: CocoIndex, document: dict[str, Any], *, batch_size: int, device,
             max_images: int = 0, progress=None) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    detections = predict(model, index, batch_size=batch_size, device=device, max_images=max_images,
                         progress=progress)
    image_ids = [r.image_id for r in index.records[:max_images]] if max_images else None
    metrics, table = evaluate_boxes(document, detections, image_ids)
    return metrics, table, detections
