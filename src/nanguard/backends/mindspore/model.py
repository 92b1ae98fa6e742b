"""The Faster R-CNN models of the PyTorch backend, written for MindSpore with static shapes.

    model = FasterRCNN(ModelConfig(), num_classes=3, image_size=(128, 128))
    losses = model(images, gt_boxes, gt_labels, gt_valid, noise)   # 4 scalars, graph mode or PyNative
    boxes, scores, labels, valid = model.detect(images)            # fixed slots + a mask

The same architectures and parameter paths as `nanguard.backends.torch.model.build_model`:
- `tiny`: mobilenet_v3_large features with BatchNorm, a 5-level FPN, one anchor size per level (12 to
  192 px), RoIAlign over the four conv levels, a two-layer box head;
- `resnet50_fpn`: torchvision's fasterrcnn_resnet50_fpn (ResNet-50 with BatchNorm, or FrozenBatchNorm2d's
  fixed statistics with model.trainable_bn=false; a 256-wide FPN; anchors 32 to 512 px; a 1024-wide box
  head). Random init, as in the PyTorch backend (nothing is downloaded).
`convert.py` moves weights between the two by renaming. The rest (anchors on the five levels, RPN,
proposals, RoI heads) is shared: both FPNs have strides 4 to 64. Static shapes throughout, so that one
train step compiles once:
- the images of a batch share one size (`image_size`, fixed when the model is built: the host resizes and
  pads, as torchvision's transform would for images of one size);
- ground truth is padded to G boxes per image with a validity mask;
- proposals: a fixed top-k per level, NMS with a mask (`NMSWithMask` on score-sorted boxes is
  torchvision's `nms`), a fixed number of slots per image with a validity mask;
- RoI sampling: `box_batch_size_per_image` slots per image, those it could not fill masked;
- RoIAlign as two matrix products a level (`roi_align`): each box from its own level, the gradient exact.
Random choices (the samplers) read `noise`, uniform numbers the host draws from the run's RNG, so a
replayed step samples the same.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Normal, initializer

from nanguard.backends.mindspore import boxes as B
from nanguard.backends.mindspore.backbones import Backbone
from nanguard.config import ModelConfig

TINY_ANCHOR_SIZES = ((12,), (24,), (48,), (96,), (192,))
RESNET_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))  # torchvision's default for resnet50_fpn
MODEL_NAMES = ("tiny", "resnet50_fpn")
ASPECT_RATIOS = (0.5, 1.0, 2.0)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class RPNHead(nn.Cell):
    def __init__(self, channels: int, anchors: int) -> None:
        super().__init__()
        self.conv = nn.SequentialCell([nn.SequentialCell([
            nn.Conv2d(channels, channels, 3, pad_mode="pad", padding=1, has_bias=True, weight_init=Normal(0.01)),
            nn.ReLU()])])
        self.cls_logits = nn.Conv2d(channels, anchors, 1, has_bias=True, weight_init=Normal(0.01))
        self.bbox_pred = nn.Conv2d(channels, anchors * 4, 1, has_bias=True, weight_init=Normal(0.01))

    def construct(self, features):
        logits, deltas = (), ()
        for x in features:
            t = self.conv(x)
            logits = logits + (_flatten(self.cls_logits(t), 1),)
            deltas = deltas + (_flatten(self.bbox_pred(t), 4),)
        objectness = ops.concat(logits, axis=1)
        return objectness.reshape(objectness.shape[0], -1), ops.concat(deltas, axis=1)


def _flatten(x: Tensor, c: int) -> Tensor:
    """torchvision's permute_and_flatten: [N, A*C, H, W] -> [N, H*W*A, C] (location-major)."""
    n, ac, h, w = x.shape
    return x.reshape(n, ac // c, c, h, w).transpose(0, 3, 4, 1, 2).reshape(n, -1, c)


class Dense(nn.Dense):
    """torch.nn.Linear's default init (kaiming-uniform a=sqrt(5), bias uniform in ±1/sqrt(fan_in))."""

    def __init__(self, cin: int, cout: int) -> None:
        bound = 1 / math.sqrt(cin)
        super().__init__(cin, cout, weight_init=HeUniform(negative_slope=math.sqrt(5)),
                         bias_init=initializer(ms.common.initializer.Uniform(bound), [cout]))


class BoxHead(nn.Cell):
    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.fc6, self.fc7 = Dense(cin, width), Dense(width, width)

    def construct(self, x):
        return ops.relu(self.fc7(ops.relu(self.fc6(x.reshape(x.shape[0], -1)))))


class BoxPredictor(nn.Cell):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.cls_score, self.bbox_pred = Dense(width, classes), Dense(width, classes * 4)

    def construct(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class RPN(nn.Cell):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = RPNHead(channels, len(ASPECT_RATIOS))


class ROIHeads(nn.Cell):
    def __init__(self, channels: int, width: int, classes: int) -> None:
        super().__init__()
        self.box_head = BoxHead(channels * 7 * 7, width)
        self.box_predictor = BoxPredictor(width, classes)


class FasterRCNN(nn.Cell):
    """See the module docstring. `num_classes` foreground classes (background is class 0)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, image_size: tuple[int, int], max_boxes: int = 16) -> None:
        super().__init__()
        if cfg.name not in MODEL_NAMES:
            raise ValueError(f"the MindSpore backend builds model.name={' or '.join(MODEL_NAMES)}, not {cfg.name!r}")
        self.image_size, self.max_boxes = tuple(image_size), int(max_boxes)
        self.classes = num_classes + 1
        # tiny's widths are settings; resnet50_fpn is torchvision's (FPN 256 wide, a 1024-wide box head)
        channels, width = (cfg.fpn_channels, cfg.representation_size) if cfg.name == "tiny" else (256, 1024)
        anchor_sizes = TINY_ANCHOR_SIZES if cfg.name == "tiny" else RESNET_ANCHOR_SIZES
        self.backbone = Backbone(cfg.name, channels, cfg.trainable_bn)
        self.rpn = RPN(channels)
        self.roi_heads = ROIHeads(channels, width, self.classes)
        h, w = self.image_size
        feature_sizes = [_stride_size(h, w, s) for s in (4, 8, 16, 32)]
        feature_sizes.append(((feature_sizes[-1][0] + 1) // 2, (feature_sizes[-1][1] + 1) // 2))
        self.feature_sizes = feature_sizes
        anchors = B.grid_anchors(self.image_size, feature_sizes, anchor_sizes, (ASPECT_RATIOS,) * 5)
        self.anchors = Tensor(anchors)
        counts = [fh * fw * len(ASPECT_RATIOS) for fh, fw in feature_sizes]
        self.level_starts = tuple(int(v) for v in np.cumsum([0] + counts[:-1]))
        self.level_counts = tuple(counts)
        self.pre_nms_train, self.post_nms_train = cfg.rpn_pre_nms_top_n_train, cfg.rpn_post_nms_top_n_train
        self.pre_nms_test, self.post_nms_test = cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test
        self.box_batch = cfg.box_batch_size_per_image
        self.detections = cfg.box_detections_per_img
        self.score_thresh = float(cfg.box_score_thresh)
        self.rpn_nms = ops.NMSWithMask(0.7)
        self.box_nms = ops.NMSWithMask(0.5)
        self.mean = Tensor(np.array(IMAGE_MEAN, np.float32).reshape(1, 3, 1, 1))
        self.std = Tensor(np.array(IMAGE_STD, np.float32).reshape(1, 3, 1, 1))

    # -- the shared pieces ------------------------------------------------------------------------

    def normalize(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] at `image_size` -> torchvision's normalisation."""
        return (images - self.mean) / self.std

    def proposals(self, objectness: Tensor, deltas: Tensor, pre_nms: int, post_nms: int) -> tuple[Tensor, Tensor]:
        """torchvision's RPN filter_proposals for each image, static: (boxes [B, post_nms, 4], valid
        [B, post_nms])."""
        objectness = ops.stop_gradient(objectness)
        deltas = ops.stop_gradient(deltas)
        batch = objectness.shape[0]
        h, w = self.image_size
        out_boxes, out_valid = [], []
        for b in range(batch):
            decoded = B.decode(deltas[b], self.anchors, (1.0, 1.0, 1.0, 1.0))
            picked_boxes, picked_scores, picked_levels = [], [], []
            for level, (start, count) in enumerate(zip(self.level_starts, self.level_counts)):
                k = min(pre_nms, count)
                scores, index = ops.topk(objectness[b, start:start + count], k)
                picked_boxes.append(ops.gather(decoded[start:start + count], index, 0))
                picked_scores.append(scores)
                picked_levels.append(ops.full((k,), float(level), dtype=ms.float32))
            boxes = ops.concat(picked_boxes, axis=0)
            boxes = B.clip_to_image(boxes, h, w)
            prob = ops.sigmoid(ops.concat(picked_scores, axis=0))
            levels = ops.concat(picked_levels, axis=0)
            big = ops.logical_and(boxes[:, 2] - boxes[:, 0] >= 1e-3, boxes[:, 3] - boxes[:, 1] >= 1e-3)
            chosen, _, valid = self._nms(boxes, ops.select(big, prob, ops.full_like(prob, -1.0)), levels,
                                         self.rpn_nms, post_nms, float(max(h, w) + 1))
            out_boxes.append(ops.select(ops.broadcast_to(valid[:, None], (post_nms, 4)), boxes[chosen],
                                        ops.zeros((post_nms, 4), boxes.dtype)))
            out_valid.append(valid)
        return ops.stack(out_boxes), ops.stack(out_valid)

    @staticmethod
    def _nms(boxes: Tensor, scores: Tensor, groups: Tensor, nms, keep: int, offset: float):
        """torchvision's batched_nms (a box suppresses only boxes of its group) then the `keep` best; a
        score < 0 marks a removed box. Returns (index [keep] into the inputs, score [keep], valid [keep])."""
        order = ops.sort(scores, descending=True)[1]
        sorted_scores = scores[order]
        shifted = boxes[order] + (groups[order] * offset)[:, None]
        _, index, mask = nms(ops.concat([shifted, sorted_scores[:, None]], axis=1))
        kept = ops.logical_and(mask, sorted_scores[index] >= 0)
        ranked = ops.select(kept, sorted_scores[index], ops.full_like(scores, -2.0))
        top, slot = ops.topk(ranked, min(keep, boxes.shape[0]))
        chosen, valid = order[index[slot]], top > -1.5
        if keep > boxes.shape[0]:  # fewer candidates than slots
            pad = keep - boxes.shape[0]
            chosen = ops.concat([chosen, ops.zeros((pad,), chosen.dtype)], axis=0)
            top = ops.concat([top, ops.zeros((pad,), top.dtype)], axis=0)
            valid = ops.concat([valid, ops.zeros((pad,), ms.bool_)], axis=0)
        return chosen, ops.select(valid, top, ops.zeros_like(top)), valid

    def pool(self, features, boxes: Tensor) -> Tensor:
        """torchvision's MultiScaleRoIAlign over levels 0..3 (7x7, sampling ratio 2, aligned=False):
        boxes [B, R, 4] xyxy px -> [B * R, C, 7, 7], each box pooled from its own level (LevelMapper)."""
        area = B.box_area(boxes)
        level = ops.floor(4 + ops.log2(ops.sqrt(ops.clamp(area, min=1e-12)) / 224) + 1e-6)
        level = ops.clamp(level, 2, 5) - 2
        pooled = 0
        for k, stride in enumerate((4, 8, 16, 32)):
            pooled = pooled + roi_align(features[k], boxes, 1.0 / stride, ops.cast(level == k, ms.float32))
        return pooled

    # -- training ---------------------------------------------------------------------------------

    def construct(self, images: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
                  noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four losses of a training step (torchvision's names and order: loss_classifier,
        loss_box_reg, loss_objectness, loss_rpn_box_reg).

        images [B, 3, H, W] in [0, 1]; gt_boxes [B, G, 4] xyxy px; gt_labels [B, G] (1..K); gt_valid [B, G]
        bool; noise [B, A + P] uniform in [0, 1) (A anchors, P = post_nms + G: the samplers' order)."""
        features = self.backbone(self.normalize(images))
        objectness, deltas = self.rpn.head(features)
        proposals, proposal_valid = self.proposals(objectness, deltas, self.pre_nms_train, self.post_nms_train)
        batch = images.shape[0]
        anchors_n = self.anchors.shape[0]
        # RPN targets: anchors matched to the ground truth (0.7 / 0.3, low-quality matches kept)
        rpn_labels, rpn_targets, rpn_pos, rpn_neg = [], [], [], []
        for b in range(batch):
            matched = B.match(B.box_iou(gt_boxes[b], self.anchors), gt_valid[b], 0.7, 0.3, True)
            labels = ops.select(matched >= 0, ops.ones_like(matched),
                                ops.select(matched == B.BELOW_LOW_THRESHOLD, ops.zeros_like(matched),
                                           ops.full_like(matched, -1)))
            targets = B.encode(gt_boxes[b][ops.clamp(matched, min=0)], self.anchors, (1.0, 1.0, 1.0, 1.0))
            pos, neg = B.sample(labels, 256, 0.5, noise[b, :anchors_n])
            rpn_labels.append(labels)
            rpn_targets.append(targets)
            rpn_pos.append(pos)
            rpn_neg.append(neg)
        loss_objectness, loss_rpn_box_reg = B.rpn_losses(
            objectness.reshape(-1), deltas.reshape(-1, 4), ops.concat(rpn_labels), ops.concat(rpn_targets),
            ops.concat(rpn_pos), ops.concat(rpn_neg))
        # RoI targets: proposals and the ground truth itself (torchvision's add_gt_proposals), 0.5 / 0.5
        rois, roi_labels, roi_targets, roi_valid = [], [], [], []
        for b in range(batch):
            candidates = ops.concat([proposals[b], gt_boxes[b]], axis=0)
            candidate_valid = ops.concat([proposal_valid[b], gt_valid[b]], axis=0)
            iou = B.box_iou(gt_boxes[b], candidates)
            matched = B.match(iou, gt_valid[b], 0.5, 0.5, False)
            index = ops.clamp(matched, min=0)
            labels = ops.select(matched >= 0, ops.cast(gt_labels[b][index], ms.int32), ops.zeros_like(matched))
            labels = ops.select(candidate_valid, labels, ops.full_like(labels, -1))  # empty slots: never sampled
            pos, neg = B.sample(labels, self.box_batch, 0.25, noise[b, anchors_n:anchors_n + candidates.shape[0]])
            chosen = ops.logical_or(pos, neg)
            slots = min(self.box_batch, candidates.shape[0])
            rank = ops.cast(chosen, ms.float32) + 0.5 * noise[b, anchors_n:anchors_n + candidates.shape[0]]
            _, pick = ops.topk(rank, slots)
            picked = candidates[pick]
            rois.append(picked)
            roi_labels.append(ops.select(chosen[pick], labels[pick], ops.zeros_like(labels[pick])))
            roi_targets.append(B.encode(gt_boxes[b][index[pick]], picked, (10.0, 10.0, 5.0, 5.0)))
            roi_valid.append(chosen[pick])
        rois = ops.stop_gradient(ops.stack(rois))
        class_logits, box_regression = self.roi_heads.box_predictor(self.roi_heads.box_head(self.pool(features, rois)))
        loss_classifier, loss_box_reg = B.roi_losses(class_logits, box_regression, ops.concat(roi_labels),
                                                     ops.concat(roi_targets), ops.concat(roi_valid))
        return loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg

    def noise_size(self) -> int:
        """Uniform numbers per image that `construct`'s samplers read."""
        return int(self.anchors.shape[0]) + self.post_nms_train + self.max_boxes

    # -- inference --------------------------------------------------------------------------------

    def detect(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections per image in fixed slots: boxes [B, D, 4] xyxy px, scores [B, D], labels [B, D]
        (1..K), valid [B, D] (torchvision's postprocess_detections: softmax, per-class boxes clipped to the
        image, score > box_score_thresh, boxes of at least 1e-2 px, NMS 0.5 per class, the D best)."""
        features = self.backbone(self.normalize(images))
        objectness, deltas = self.rpn.head(features)
        proposals, proposal_valid = self.proposals(objectness, deltas, self.pre_nms_test, self.post_nms_test)
        batch, slots = proposals.shape[0], proposals.shape[1]
        class_logits, box_regression = self.roi_heads.box_predictor(self.roi_heads.box_head(self.pool(features, proposals)))
        scores = ops.softmax(class_logits, axis=-1).reshape(batch, slots, self.classes)
        decoded = B.decode(box_regression, proposals.reshape(-1, 4), (10.0, 10.0, 5.0, 5.0)).reshape(batch, slots, self.classes, 4)
        h, w = self.image_size
        out = ([], [], [], [])
        classes = self.classes - 1
        for b in range(batch):
            bx = decoded[b, :, 1:, :].reshape(-1, 4)
            bx = B.clip_to_image(bx, h, w)
            sc = scores[b, :, 1:].reshape(-1)
            labels = ops.broadcast_to(ops.arange(1, self.classes, dtype=ms.float32)[None, :], (slots, classes)).reshape(-1)
            ok = ops.logical_and(sc > self.score_thresh, ops.broadcast_to(proposal_valid[b][:, None], (slots, classes)).reshape(-1))
            ok = ops.logical_and(ok, ops.logical_and(bx[:, 2] - bx[:, 0] >= 1e-2, bx[:, 3] - bx[:, 1] >= 1e-2))
            chosen, top, valid = self._nms(bx, ops.select(ok, sc, ops.full_like(sc, -1.0)), labels, self.box_nms,
                                           self.detections, float(max(h, w) + 1))
            out[0].append(ops.select(ops.broadcast_to(valid[:, None], (self.detections, 4)), bx[chosen],
                                     ops.zeros((self.detections, 4), bx.dtype)))
            out[1].append(top)
            out[2].append(ops.select(valid, ops.cast(labels[chosen], ms.int32), ops.zeros((self.detections,), ms.int32)))
            out[3].append(valid)
        return tuple(ops.stack(part) for part in out)


def roi_align(feature: Tensor, boxes: Tensor, scale: float, weight: Tensor, bins: int = 7, samples: int = 2) -> Tensor:
    """torchvision's `roi_align(feature, boxes, bins, scale, samples, aligned=False)` with static shapes,
    each box's result times its `weight` [B, R] (0 for a box of another level): feature [B, C, H, W],
    boxes [B, R, 4] xyxy px -> [B * R, C, bins, bins].

    Bilinear sampling is separable: a bin's value (the mean of samples x samples bilinear samples) is
    `Py @ feature @ Px.T` with one interpolation matrix per axis (`_interpolation`), so RoIAlign is two
    matrix products and its gradient is the products' own. MindSpore 2.10's ops.ROIAlign is not used: on
    the CPU its gradient differs from the derivative of its own forward by up to ~3 % (checked against
    finite differences, which agree with torchvision's gradient), and it is slow there."""
    batch, channels, height, width = feature.shape
    rois = boxes.shape[1]
    boxes = ops.stop_gradient(boxes) * scale
    py = _interpolation(boxes[..., 1], boxes[..., 3], height, bins, samples) * weight[..., None, None]
    px = _interpolation(boxes[..., 0], boxes[..., 2], width, bins, samples)
    # along x: [B, R*bins, W] @ [B, W, C*H] -> [B*R, bins(x)*C, H] (the products' layouts are chosen so
    # that the one transpose is of the small result: MindSpore's CPU transpose is slow on big tensors)
    along_x = ops.bmm(px.reshape(batch, rois * bins, width),
                      feature.transpose(0, 3, 1, 2).reshape(batch, width, channels * height))
    # along y: [B*R, bins(x)*C, H] @ [B*R, H, bins(y)] -> [B*R, bins(x), C, bins(y)]
    out = ops.bmm(along_x.reshape(batch * rois, bins * channels, height),
                  py.reshape(batch * rois, bins, height).transpose(0, 2, 1))
    return out.reshape(batch * rois, bins, channels, bins).transpose(0, 2, 3, 1)


def _interpolation(start: Tensor, end: Tensor, length: int, bins: int, samples: int) -> Tensor:
    """[..., bins, length]: row p averages the `samples` bilinear samples of bin p of [start, end) (in
    feature pixels) over positions 0..length-1, as torchvision's bilinear_interpolate weighs them: a
    sample beyond [-1, length] counts 0, one in [-1, 0] reads position 0, one past length - 1 reads
    length - 1 (aligned=False: the box is at least 1 pixel long)."""
    size = ops.maximum(end - start, ops.ones_like(end))
    offsets = (np.arange(bins)[:, None] + (np.arange(samples)[None, :] + 0.5) / samples).reshape(-1) / bins
    at = start[..., None] + size[..., None] * Tensor(offsets.astype(np.float32))  # [..., bins * samples]
    inside = ops.cast(ops.logical_and(at >= -1.0, at <= float(length)), ms.float32)
    at = ops.clamp(at, 0.0, float(length - 1))
    positions = Tensor(np.arange(length, dtype=np.float32))
    hat = ops.relu(1.0 - ops.abs(at[..., None] - positions)) * inside[..., None]  # [..., bins * samples, length]
    shape = hat.shape
    return hat.reshape(shape[:-2] + (bins, samples, length)).mean(axis=-2)


def _stride_size(h: int, w: int, stride: int) -> tuple[int, int]:
    """The size of a feature map after log2(stride) stride-2 convs with padding k//2 (ceil each time)."""
    for _ in range(int(math.log2(stride))):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w
