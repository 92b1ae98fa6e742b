"""A host batch (`nanguard.data.loader.Batch`) as the static-shape arrays the MindSpore model takes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StaticBatch:
    images: np.ndarray  # [B, 3, H, W] float32 in [0, 1]
    boxes: np.ndarray  # [B, G, 4] float32 xyxy px (zeros where not valid)
    labels: np.ndarray  # [B, G] int32 (1..K; 0 where not valid)
    valid: np.ndarray  # [B, G] bool
    dropped: int  # boxes beyond G left out (the first G of an image are kept)


def to_static(images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray],
              image_size: tuple[int, int], max_boxes: int) -> StaticBatch:
    """Images ([H, W, 3] uint8) resized to `image_size` (bilinear; boxes scaled with them) and ground
    truth padded to `max_boxes` per image."""
    from PIL import Image

    h, w = image_size
    batch = len(images)
    out = StaticBatch(np.zeros((batch, 3, h, w), np.float32), np.zeros((batch, max_boxes, 4), np.float32),
                      np.zeros((batch, max_boxes), np.int32), np.zeros((batch, max_boxes), bool), 0)
    for i, (pixels, image_boxes, image_labels) in enumerate(zip(images, boxes, labels, strict=True)):
        ih, iw = pixels.shape[:2]
        if (ih, iw) != (h, w):
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR))
        out.images[i] = pixels.transpose(2, 0, 1).astype(np.float32) / 255.0
        scaled = np.asarray(image_boxes, np.float32).reshape(-1, 4) * np.array([w / iw, h / ih] * 2, np.float32)
        n = min(len(scaled), max_boxes)
        out.dropped += len(scaled) - n
        out.boxes[i, :n] = scaled[:n]
        out.labels[i, :n] = np.asarray(image_labels[:n], np.int32)
        out.valid[i, :n] = True
    return out
