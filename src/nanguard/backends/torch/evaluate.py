"""Inference over the validation split: COCO-format detections for `nanguard.run.evaluate`."""

from __future__ import annotations

import sys
from typing import Any

import torch

from nanguard.data.coco import CocoIndex
from nanguard.data.loader import load_image
from nanguard.backends.torch.step import image_tensor
from nanguard.errors import UserError


def resized_short_side(model: torch.nn.Module, height: int, width: int) -> float:
    """The short side, in pixels, of an image after the model's own resize (torchvision's
    GeneralizedRCNNTransform: scale to min_size, capped so the long side stays within max_size)."""
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "min_size"):
        return float(min(height, width))
    min_size, max_size = float(transform.min_size[-1]), float(transform.max_size)
    short, long = float(min(height, width)), float(max(height, width))
    if short <= 0:
        return 0.0
    scale = min(min_size / short, max_size / long)
    return short * scale


# An image whose short side the resize takes below this many pixels makes torchvision's interpolate
# fail ("output (H: 0, ...)"): 2 rather than 1, since torch floors a float size of 0.99999.
_MIN_RESIZED_SIDE = 2.0


@torch.no_grad()
def predict(model: torch.nn.Module, index: CocoIndex, *, batch_size: int, device: torch.device,
            max_images: int = 0, progress=None, skipped: list | None = None) -> list[dict[str, Any]]:
    """COCO-format detections (bbox xywh, category ids of the dataset) for the images of `index`.

    An image the model cannot take (so long and thin that the resize leaves under 2 pixels of its
    short side, e.g. 20000x20 at max_size 128) is skipped with a warning line on stderr: it gets no
    detections, so its objects count as missed; its id is appended to `skipped`."""
    was_training = model.training
    model.eval()
    records = index.records[:max_images] if max_images else index.records
    detections: list[dict[str, Any]] = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images, kept = [], []
            for record in chunk:
                try:
                    array = load_image(record.path)
                except (OSError, ValueError) as exc:
                    raise UserError(f"{record.path}: cannot read image id {record.image_id} "
                                    f"({exc.__class__.__name__}); run `nanguard audit` on the split") from None
                height, width = array.shape[:2]
                if resized_short_side(model, height, width) < _MIN_RESIZED_SIDE:
                    print(f"nanguard: warning: {record.path}: image id {record.image_id} is {width}x{height}; "
                          "resized to model.min_size/max_size its short side is under 2 px, skipped (no "
                          "detections)", file=sys.stderr)
                    if skipped is not None:
                        skipped.append(record.image_id)
                    continue
                kept.append(record)
                images.append(image_tensor(array, device))
            outputs = model(images) if images else []
            for record, out in zip(kept, outputs):
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
