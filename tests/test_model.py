"""Models by name, the finite box coding, local weights."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from nanguard.backends.torch.model import MODEL_NAMES, SafeBoxCoder, build_model, load_weights
from nanguard.config import load_config
from nanguard.errors import UserError


def test_zero_width_box_encodes_to_a_finite_target():
    gt = torch.tensor([[10.0, 10.0, 10.0, 30.0], [5.0, 5.0, 25.0, 5.0], [0.0, 0.0, 20.0, 20.0]])
    anchors = torch.tensor([[8.0, 8.0, 24.0, 24.0]] * 3)
    plain = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(gt, anchors)
    assert not torch.isfinite(plain).all()  # torchvision's coding: log(0) = -inf
    safe = SafeBoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(gt, anchors)
    assert torch.isfinite(safe).all()
    assert torch.allclose(safe[2], plain[2])  # a normal box encodes exactly as torchvision's


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_trains_a_step_and_predicts(name):
    torch.manual_seed(0)
    cfg = load_config("demo", [f"model.name={name}", "model.min_size=64", "model.max_size=64"]).model
    model = build_model(cfg, num_classes=2)
    assert isinstance(model.rpn.box_coder, SafeBoxCoder) and isinstance(model.roi_heads.box_coder, SafeBoxCoder)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_local_weights_load_and_mismatched_heads_stay_random(tmp_path):
    cfg = load_config("demo").model
    torch.manual_seed(1)
    source = build_model(cfg, num_classes=5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(2)
    target = build_model(cfg, num_classes=3)
    load_weights(target, tmp_path / "w.pt")
    key = "backbone.fpn.inner_blocks.0.0.weight"
    assert torch.equal(target.state_dict()[key], source.state_dict()[key])
    assert target.roi_heads.box_predictor.cls_score.weight.shape[0] == 4  # 3 classes + background
    torch.save({"something": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="none of its tensors fit"):
        load_weights(target, tmp_path / "foreign.pt")


def test_tiny_has_a_stride_4_level_with_small_anchors():
    """The demo's objects go down to ~10 px: `tiny` needs the stride-4 map, a 12 px anchor on it, and RoIs
    pooled from it."""
    model = build_model(load_config("demo").model, num_classes=3)
    model.eval()
    with torch.no_grad():
        maps = model.backbone(torch.zeros(1, 3, 128, 128))
    assert {name: tuple(m.shape[-2:]) for name, m in maps.items()} == {
        "0": (32, 32), "1": (16, 16), "2": (8, 8), "3": (4, 4), "pool": (2, 2)}
    assert model.rpn.anchor_generator.sizes == ((12,), (24,), (48,), (96,), (192,))
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
