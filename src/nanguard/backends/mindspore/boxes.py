"""Faster R-CNN's box arithmetic for MindSpore with static shapes: anchors, IoU, matching, box coding,
balanced sampling and the four losses, each equal to torchvision's (`AnchorGenerator`, `box_iou`,
`Matcher`, `BoxCoder`, `fastrcnn_loss`, the RPN's losses) on the same inputs — tests hold them to 1e-5.

Static shapes, so that a whole train step compiles once (graph mode) and a future fast static-shape
PyTorch model can share the design:
- ground truth is padded to a fixed box count per image, with a validity mask (`valid`, bool [G]);
- nothing is indexed by a data-dependent count: where torchvision selects (`boxes[mask]`), these
  functions weight by a 0/1 mask and divide by the count the selection would have had;
- sampling keeps a fixed number of slots and masks those it could not fill.

Anchors depend only on the image and feature-map sizes, so they are computed once on the host (numpy).
Widths are floored before the log (`min_size`): torchvision's encoding — and MindSpore's
`BoundingBoxEncode`, which also adds 1 to every width (the old Caffe convention, not torchvision's) —
turns a zero-width box into log(0) = -inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


# ---------------------------------------------------------------------------------------------------
# Anchors (host, once per image size)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """torchvision's `AnchorGenerator.generate_anchors`: [len(ratios) * len(sizes), 4], zero-centred,
    rounded (ratio-major order)."""
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / 2).astype(np.float32)


def grid_anchors(image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]],
                 sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]]) -> np.ndarray:
    """All anchors of one image, level by level, location-major (y, then x), as torchvision orders them:
    [sum over levels of H*W*A, 4] xyxy, float32. `image_size` is the padded batch size (H, W)."""
    out = []
    for (fh, fw), level_sizes, ratios in zip(feature_sizes, sizes, aspect_ratios, strict=True):
        stride_h, stride_w = image_size[0] // fh, image_size[1] // fw
        shift_x = np.arange(fw, dtype=np.int64) * stride_w
        shift_y = np.arange(fh, dtype=np.int64) * stride_h
        sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = np.stack([sx.reshape(-1), sy.reshape(-1)] * 2, axis=1).astype(np.float32)
        base = cell_anchors(level_sizes, ratios)
        out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    return np.concatenate(out, axis=0)


# ---------------------------------------------------------------------------------------------------
# IoU and matching


def clip_to_image(boxes: Tensor, height: int, width: int) -> Tensor:
    """torchvision's clip_boxes_to_image: [N, 4] xyxy clamped to [0, width] x [0, height]."""
    return ops.stack([ops.clamp(boxes[:, 0], 0, width), ops.clamp(boxes[:, 1], 0, height),
                      ops.clamp(boxes[:, 2], 0, width), ops.clamp(boxes[:, 3], 0, height)], axis=1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[N, 4] x [M, 4] xyxy -> [N, M] (torchvision's `box_iou`)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = ops.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = ops.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = ops.clamp(rb - lt, min=0.0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match(iou: Tensor, valid: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """torchvision's `Matcher` on a padded IoU matrix [G, A] (`valid` [G] masks the padding): for each
    anchor the index of its ground truth box, -1 (below `low`) or -2 (between the thresholds). With no
    valid box every anchor is -1 (torchvision: all background)."""
    iou = ops.select(ops.broadcast_to(valid[:, None], iou.shape), iou, ops.full_like(iou, -1.0))
    matched_vals = iou.max(axis=0)
    matches = ops.cast(iou.argmax(axis=0), ms.int32)
    all_matches = matches
    below = matched_vals < low
    between = ops.logical_and(matched_vals >= low, matched_vals < high)
    matches = ops.select(below, ops.full_like(matches, BELOW_LOW_THRESHOLD), matches)
    matches = ops.select(between, ops.full_like(matches, BETWEEN_THRESHOLDS), matches)
    if allow_low_quality:  # every valid box keeps the anchors it overlaps most, ties included
        best = iou.max(axis=1, keepdims=True)
        is_best = ops.logical_and(iou == best, valid[:, None])
        matches = ops.select(is_best.any(axis=0), all_matches, matches)
    return matches


# ---------------------------------------------------------------------------------------------------
# Box coding


def encode(gt: Tensor, anchors: Tensor, weights: Sequence[float], min_size: float = 1e-2) -> Tensor:
    """Regression targets [N, 4] (dx, dy, dw, dh) of ground truth `gt` for `anchors` (both [N, 4] xyxy):
    nanguard's `SafeBoxCoder.encode_single` (torchvision's with widths and heights floored at
    `min_size`)."""
    wx, wy, ww, wh = (float(w) for w in weights)
    ex_w = ops.clamp(anchors[:, 2] - anchors[:, 0], min=min_size)
    ex_h = ops.clamp(anchors[:, 3] - anchors[:, 1], min=min_size)
    ex_cx = anchors[:, 0] + 0.5 * ex_w
    ex_cy = anchors[:, 1] + 0.5 * ex_h
    gt_w = ops.clamp(gt[:, 2] - gt[:, 0], min=min_size)
    gt_h = ops.clamp(gt[:, 3] - gt[:, 1], min=min_size)
    gt_cx = gt[:, 0] + 0.5 * gt_w
    gt_cy = gt[:, 1] + 0.5 * gt_h
    return ops.stack([wx * (gt_cx - ex_cx) / ex_w, wy * (gt_cy - ex_cy) / ex_h,
                      ww * ops.log(gt_w / ex_w), wh * ops.log(gt_h / ex_h)], axis=1)


def decode(deltas: Tensor, boxes: Tensor, weights: Sequence[float], clip: float = BBOX_XFORM_CLIP) -> Tensor:
    """torchvision's `BoxCoder.decode_single`: deltas [N, 4 * K] applied to boxes [N, 4] -> [N, 4 * K]."""
    wx, wy, ww, wh = (float(w) for w in weights)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = ops.clamp(deltas[:, 2::4] / ww, max=clip)
    dh = ops.clamp(deltas[:, 3::4] / wh, max=clip)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    half_w = 0.5 * (ops.exp(dw) * widths[:, None])
    half_h = 0.5 * (ops.exp(dh) * heights[:, None])
    out = ops.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], axis=2)
    return out.reshape(deltas.shape[0], -1)


# ---------------------------------------------------------------------------------------------------
# Balanced sampling with a fixed number of slots


def sample(labels: Tensor, batch_size: int, positive_fraction: float, noise: Tensor) -> tuple[Tensor, Tensor]:
    """torchvision's `BalancedPositiveNegativeSampler` for one image, static: of the candidates with
    label >= 1 keep min(int(batch_size * positive_fraction), their count) at random, then of those with
    label 0 min(batch_size - positives kept, their count); -1 is never sampled. `noise` ([N], uniform in
    [0, 1), from the caller's RNG) orders the random choice. Returns (positive, negative) bool masks [N]."""
    cap = int(batch_size * positive_fraction)
    positive = _keep_first(labels >= 1, noise, cap, Tensor(cap, ms.int32))
    kept = ops.cast(positive, ms.int32).sum()
    negative = _keep_first(labels == 0, noise, batch_size, batch_size - kept)
    return positive, negative


def _keep_first(candidates: Tensor, noise: Tensor, slots: int, limit: Tensor) -> Tensor:
    """The (at most `limit` <= `slots`) candidates with the largest noise, as a mask."""
    slots = min(slots, candidates.shape[0])
    score = ops.select(candidates, noise, ops.full_like(noise, -1.0))
    top, index = ops.topk(score, slots)
    chosen = ops.logical_and(top >= 0, ops.arange(slots) < limit)
    mask = ops.zeros(candidates.shape, ms.float32)
    mask = ops.tensor_scatter_elements(mask, ops.cast(index, ms.int32), ops.cast(chosen, ms.float32), axis=0)
    return mask > 0.5


# ---------------------------------------------------------------------------------------------------
# Losses (means over the sampled slots, as torchvision divides by the sampled count)


def smooth_l1(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """Elementwise smooth L1 (torch.nn.functional.smooth_l1_loss, reduction none)."""
    diff = ops.abs(x - y)
    return ops.select(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def rpn_losses(objectness: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, positive: Tensor,
               negative: Tensor) -> tuple[Tensor, Tensor]:
    """torchvision's `RegionProposalNetwork.compute_loss` over masks: objectness [N] logits, deltas and
    targets [N, 4], labels [N] (1, 0, -1), positive / negative sampled masks [N] (all images flattened).
    Returns (objectness loss, box loss)."""
    labels, targets = ops.stop_gradient(labels), ops.stop_gradient(targets)
    positive, negative = ops.stop_gradient(positive), ops.stop_gradient(negative)
    sampled = ops.cast(ops.logical_or(positive, negative), ms.float32)
    count = ops.maximum(sampled.sum(), 1.0)
    target = ops.cast(labels >= 1, ms.float32)
    bce = ops.binary_cross_entropy_with_logits(objectness, target, ops.ones_like(target), ops.ones_like(target),
                                               reduction="none")
    box = (smooth_l1(deltas, targets, 1.0 / 9).sum(axis=1) * ops.cast(positive, ms.float32)).sum() / count
    return (bce * sampled).sum() / count, box


def roi_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor, targets: Tensor,
               sampled: Tensor) -> tuple[Tensor, Tensor]:
    """torchvision's `fastrcnn_loss` over a mask: class_logits [N, K+1], box_regression [N, 4 * (K+1)],
    labels [N] (0 background), targets [N, 4], `sampled` [N] bool (the slots that hold a proposal).
    Returns (classifier loss, box loss)."""
    weight = ops.cast(sampled, ms.float32)
    count = ops.maximum(weight.sum(), 1.0)
    labels = ops.cast(labels, ms.int32)
    ce = ops.cross_entropy(class_logits, labels, reduction="none")
    per_class = box_regression.reshape(box_regression.shape[0], -1, 4)
    picked = ops.gather_elements(per_class, 1, ops.broadcast_to(labels[:, None, None], (labels.shape[0], 1, 4)))
    positive = ops.cast(labels > 0, ms.float32) * weight
    box = (smooth_l1(picked[:, 0, :], targets, 1.0 / 9).sum(axis=1) * positive).sum() / count
    return (ce * weight).sum() / count, box
