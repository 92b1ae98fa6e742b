"""Host images and boxes as the static-shape arrays the MindSpore model takes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def canvas_size(min_size: int, max_size: int) -> tuple[int, int]:
    """The fixed (H, W) every image is placed on: the largest size torchvision's resize can give
    (max_size), rounded up to a multiple of 32 as its batching pads."""
    side = int(math.ceil(max(min_size, max_size) / 32) * 32)
    return side, side


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """torchvision's GeneralizedRCNNTransform: scale the short side to min_size unless the long side
    would pass max_size."""
    short, long = float(min(height, width)), float(max(height, width))
    return min(min_size / short, max_size / long)


@dataclass
class StaticBatch:
    images: np.ndarray  # [B, 3, H, W] float32 in [0, 1], each image at the canvas's top left
    boxes: np.ndarray  # [B, G, 4] float32 xyxy in canvas pixels (zeros where not valid)
    labels: np.ndarray  # [B, G] int32 (1..K; 0 where not valid)
    valid: np.ndarray  # [B, G] bool
    scales: np.ndarray  # [B] the resize factor of each image (canvas px per image px)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of each image on the canvas
    overflow: list[tuple[int, int]] = field(default_factory=list)  # (image index, box index) beyond G


def to_static(images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray],
              min_size: int, max_size: int, max_boxes: int) -> StaticBatch:
    """Images ([H, W, 3] uint8) resized as torchvision's transform does (bilinear) and placed on the
    canvas; their boxes scaled with them and padded to `max_boxes` per image (those beyond are listed in
    `overflow`, never dropped in silence)."""
    from PIL import Image

    h, w = canvas_size(min_size, max_size)
    batch = len(images)
    out = StaticBatch(np.zeros((batch, 3, h, w), np.float32), np.zeros((batch, max_boxes, 4), np.float32),
                      np.zeros((batch, max_boxes), np.int32), np.zeros((batch, max_boxes), bool),
                      np.ones(batch, np.float32))
    for i, (pixels, image_boxes, image_labels) in enumerate(zip(images, boxes, labels, strict=True)):
        ih, iw = pixels.shape[:2]
        scale = resize_scale(ih, iw, min_size, max_size)
        rh, rw = min(h, max(1, int(ih * scale))), min(w, max(1, int(iw * scale)))
        if (rh, rw) != (ih, iw):
            pixels = np.asarray(Image.fromarray(pixels).resize((rw, rh), Image.BILINEAR))
        out.images[i, :, :rh, :rw] = pixels.transpose(2, 0, 1).astype(np.float32) / 255.0
        out.sizes.append((rh, rw))
        out.scales[i] = scale
        scaled = np.asarray(image_boxes, np.float32).reshape(-1, 4) * np.float32(scale)
        n = min(len(scaled), max_boxes)
        out.overflow += [(i, j) for j in range(n, len(scaled))]
        out.boxes[i, :n] = scaled[:n]
        out.labels[i, :n] = np.asarray(image_labels[:n], np.int32)
        out.valid[i, :n] = True
    return out
