"""Faster R-CNN models by name, built from torchvision's blocks, random init, nothing downloaded.

    model = build_model(cfg.model, num_classes=3)   # K foreground classes; background is added

- `tiny`: mobilenet_v3_large features with trainable BatchNorm, a 64-channel FPN on 5 levels (strides
  4, 8, 16, 32 and a max-pool level at 64), one anchor size per level (12 to 192 px, ratios 0.5, 1, 2),
  RoIAlign over the four conv levels, a 256-wide box head, few proposals: the CPU default. The stride-4
  level is what finds the ~10 px objects of the generated shapes: at stride 8 a 12 px anchor has no
  feature of its own.
- `mobilenet_v3_fpn`, `resnet50_fpn`: torchvision's architectures and state_dict names (for a GPU), so
  `model.weights=` can point at torchvision's own checkpoints.

Every model gets `SafeBoxCoder`: torchvision's encoding takes log(gt_width / anchor_width), so one
zero-width box that slipped past the audit turns the regression target into -inf.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from nanguard.backends.torch.checkpoint import read_tensor_file
from nanguard.config import ModelConfig
from nanguard.errors import UserError

MODEL_NAMES = ("tiny", "mobilenet_v3_fpn", "resnet50_fpn")


class SafeBoxCoder(det_utils.BoxCoder):
    """torchvision's BoxCoder with a finite encoding for degenerate boxes.

    Widths and heights are clamped to `min_size` pixels before the log: a zero-width ground truth box
    gives a large but finite target (and smooth-L1's gradient is bounded), instead of log(0) = -inf.
    Decoding is torchvision's (it already clamps dw/dh at log(1000/16)).
    """

    def __init__(self, weights, bbox_xform_clip: float = math.log(1000.0 / 16), min_size: float = 1e-2):
        super().__init__(weights, bbox_xform_clip)
        self.min_size = min_size

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """reference_boxes (ground truth), proposals: [N, 4] xyxy -> targets [N, 4] (dx, dy, dw, dh)."""
        dtype = reference_boxes.dtype
        wx, wy, ww, wh = (torch.as_tensor(w, dtype=dtype, device=reference_boxes.device) for w in self.weights)
        ex_w = (proposals[:, 2] - proposals[:, 0]).clamp(min=self.min_size)
        ex_h = (proposals[:, 3] - proposals[:, 1]).clamp(min=self.min_size)
        ex_cx = proposals[:, 0] + 0.5 * ex_w
        ex_cy = proposals[:, 1] + 0.5 * ex_h
        gt_w = (reference_boxes[:, 2] - reference_boxes[:, 0]).clamp(min=self.min_size)
        gt_h = (reference_boxes[:, 3] - reference_boxes[:, 1]).clamp(min=self.min_size)
        gt_cx = reference_boxes[:, 0] + 0.5 * gt_w
        gt_cy = reference_boxes[:, 1] + 0.5 * gt_h
        return torch.stack((
            wx * (gt_cx - ex_cx) / ex_w,
            wy * (gt_cy - ex_cy) / ex_h,
            ww * torch.log(gt_w / ex_w),
            wh * torch.log(gt_h / ex_h),
        ), dim=1)


def _tiny_backbone(channels: int, trainable_bn: bool) -> BackboneWithFPN:
    """mobilenet_v3_large features -> FPN maps "0".."3" at strides 4, 8, 16, 32 (`channels` wide each)
    and "pool" at stride 64."""
    norm = nn.BatchNorm2d if trainable_bn else None
    features = mobilenet_v3_large(weights=None, norm_layer=norm).features
    # The last block of each stage, i.e. the block before the next strided one: indices 3 (stride 4,
    # 24 ch), 6 (stride 8, 40 ch), 12 (stride 16, 112 ch) and the last conv (stride 32, 960 ch).
    strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    returned = [strided[1] - 1, strided[2] - 1, strided[3] - 1, len(features) - 1]
    return_layers = {str(i): str(k) for k, i in enumerate(returned)}
    in_channels = [features[i].out_channels for i in returned]
    return BackboneWithFPN(features, return_layers, in_channels, channels, extra_blocks=LastLevelMaxPool())


# One anchor size per FPN level of `tiny` ("0".."3", "pool"): the generated shapes are 10 to ~80 px.
TINY_ANCHOR_SIZES = ((12,), (24,), (48,), (96,), (192,))


def _torchvision_mobilenet_backbone(trainable_bn: bool) -> BackboneWithFPN:
    norm = nn.BatchNorm2d if trainable_bn else None
    features = mobilenet_v3_large(weights=None, norm_layer=norm).features
    strided = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    returned = [len(strided) - 2, len(strided) - 1]  # torchvision's fasterrcnn_mobilenet_v3_large_fpn
    return_layers = {str(strided[k]): str(v) for v, k in enumerate(returned)}
    in_channels = [features[strided[i]].out_channels for i in returned]
    return BackboneWithFPN(features, return_layers, in_channels, 256, extra_blocks=LastLevelMaxPool())


def build_model(cfg: ModelConfig, num_classes: int) -> FasterRCNN:
    """A Faster R-CNN for `num_classes` foreground classes (+1 background), random init."""
    common = dict(
        num_classes=num_classes + 1,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
    )
    if cfg.name == "tiny":
        backbone = _tiny_backbone(cfg.fpn_channels, cfg.trainable_bn)
        anchors = AnchorGenerator(sizes=TINY_ANCHOR_SIZES, aspect_ratios=((0.5, 1.0, 2.0),) * len(TINY_ANCHOR_SIZES))
        # torchvision's LevelMapper pools a box from level floor(4 + log2(sqrt(area) / 224)), clamped to
        # the maps given: every box under 112 px (all of the generated shapes) from the stride-4 map
        roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size)
        predictor = FastRCNNPredictor(cfg.representation_size, num_classes + 1)
        common.pop("num_classes")
        model = FasterRCNN(backbone, rpn_anchor_generator=anchors, box_roi_pool=roi_pool, box_head=head,
                           box_predictor=predictor, **common)
    elif cfg.name == "mobilenet_v3_fpn":
        backbone = _torchvision_mobilenet_backbone(cfg.trainable_bn)
        anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),) * 3, aspect_ratios=((0.5, 1.0, 2.0),) * 3)
        model = FasterRCNN(backbone, rpn_anchor_generator=anchors, **common)
    elif cfg.name == "resnet50_fpn":
        # trainable BN from random init; torchvision's recipe (frozen BN) is meaningful with pretrained weights
        from torchvision.ops.misc import FrozenBatchNorm2d

        trunk = resnet50(weights=None, norm_layer=nn.BatchNorm2d if cfg.trainable_bn else FrozenBatchNorm2d)
        backbone = _resnet_fpn_extractor(trunk, trainable_layers=5)
        model = FasterRCNN(backbone, **common)
    else:  # the config's Literal type already rejects this; kept for direct callers
        raise UserError(f"model.name={cfg.name!r} is unknown; choose one of {', '.join(MODEL_NAMES)}")
    model.rpn.box_coder = SafeBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    model.roi_heads.box_coder = SafeBoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    if cfg.weights:
        load_weights(model, cfg.weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state_dict (a nanguard checkpoint or torchvision's file). Tensors whose shapes differ
    (a classifier for another number of classes) are left at their random init; how many loaded goes to
    stderr. A file that leaves most of the backbone random (a `tiny` checkpoint for `resnet50_fpn`) is
    refused: it would train from scratch while the user believes it starts from the weights."""
    path = Path(path)
    state = read_tensor_file(path, "model.weights")
    if isinstance(state, dict) and isinstance(state.get("backend"), dict):
        state = state["backend"]  # a nanguard checkpoint: the model is one of the backend's parts
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state_dict of tensors; model.weights needs a model state_dict")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UserError(f"{path}: none of its tensors fit model '{type(model).__name__}'; "
                        "is it a checkpoint for another architecture (model.name)?")
    backbone = [k for k in own if k.startswith("backbone.")]
    backbone_loaded = sum(1 for k in backbone if k in usable)
    if backbone and backbone_loaded < len(backbone) / 2:
        raise UserError(f"{path}: only {backbone_loaded} of the model's {len(backbone)} backbone tensors fit; "
                        "it is a checkpoint for another model.name (or another layout): pick the matching "
                        "model.name or other weights")
    model.load_state_dict(usable, strict=False)
    print(f"model.weights: loaded {len(usable)} of the model's {len(own)} tensors from {path} "
          f"({backbone_loaded} of {len(backbone)} backbone, {len(own) - len(usable)} left at random init)",
          file=sys.stderr)
