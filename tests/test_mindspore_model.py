"""The MindSpore `tiny` Faster R-CNN: the PyTorch backend's weights convert both ways and give the same
outputs (backbone + FPN, RPN head, RoIAlign + box head), its four losses are the same in PyNative and in
graph mode, and it learns under `GuardedTrainStep` in graph mode."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="mindspore is not installed (make install installs it)")
torch = pytest.importorskip("torch")
from mindspore import Tensor, nn  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from nanguard.backends.mindspore import GuardedTrainStep, StepReader  # noqa: E402
from nanguard.backends.mindspore.convert import (  # noqa: E402
    load_arrays,
    mindspore_arrays,
    mindspore_to_torch,
    torch_to_mindspore,
)
from nanguard.backends.mindspore.model import FasterRCNN  # noqa: E402
from nanguard.backends.torch.model import build_model  # noqa: E402
from nanguard.config import ModelConfig  # noqa: E402
from nanguard.guard import STEP_FIELDS, GuardConfig  # noqa: E402

CFG = ModelConfig(min_size=64, max_size=64, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                  rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=30, box_batch_size_per_image=32)


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def pair():
    """A torch tiny model with random weights and statistics, and the MindSpore model converted from it."""
    torch.manual_seed(0)
    t = build_model(CFG, 3)
    with torch.no_grad():  # BatchNorm statistics that are not 0 / 1, so that their conversion is tested
        for module in t.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    ms.set_seed(0)
    m = FasterRCNN(CFG, 3, (64, 64), max_boxes=4)
    load_arrays(m, torch_to_mindspore({k: v.numpy() for k, v in t.state_dict().items()}))
    return t, m


def images(seed=0, batch=2):
    return np.random.default_rng(seed).random((batch, 3, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_converted_weights_give_the_same_features_and_rpn_outputs(pair, train):
    t, m = pair
    t.train(train)
    m.set_train(train)
    x = images()
    with torch.no_grad():
        normalized = (torch.from_numpy(x) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        expected = list(t.backbone(normalized).values())
        objectness, deltas = t.rpn.head(expected)
    got = m.backbone(m.normalize(Tensor(x)))
    assert len(got) == len(expected) == 5
    for level, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a.asnumpy(), b.numpy(), rtol=1e-3, atol=2e-4, err_msg=f"level {level}")
    ms_objectness, ms_deltas = m.rpn.head(got)
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
    np.testing.assert_allclose(ms_objectness.asnumpy().reshape(-1), flat_objectness.numpy().reshape(-1),
                               rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(ms_deltas.asnumpy().reshape(-1, 4), flat_deltas.numpy(), rtol=1e-3, atol=2e-4)
    t.eval()


@pytest.mark.parametrize("trainable_bn", [True, False], ids=["batchnorm", "frozen"])
def test_resnet50_fpn_converts_and_gives_the_same_features_rpn_and_box_head(trainable_bn):
    """torchvision's fasterrcnn_resnet50_fpn layout (the PyTorch backend's resnet50_fpn): converted
    weights give the same FPN maps, RPN outputs and box-head outputs (train mode: batch statistics, or
    FrozenBatchNorm2d's fixed ones), and convert back exactly."""
    cfg = ModelConfig(name="resnet50_fpn", min_size=64, max_size=64, trainable_bn=trainable_bn)
    torch.manual_seed(0)
    t = build_model(cfg, 3).train()
    with torch.no_grad():  # statistics that are not 0 / 1, so that their conversion is tested
        for name, buffer in t.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.2, 0.2)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    m = FasterRCNN(cfg, 3, (64, 64), max_boxes=4)
    m.set_train(True)
    load_arrays(m, torch_to_mindspore({k: v.numpy() for k, v in t.state_dict().items()}))
    back = mindspore_to_torch(mindspore_arrays(m))  # loads strictly (FrozenBatchNorm2d drops num_batches_tracked)
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()})
    trainable = {n for n, p in m.parameters_and_names() if p.requires_grad}
    assert ("backbone.body.bn1.gamma" in trainable) == trainable_bn
    x = images()
    with torch.no_grad():
        normalized = (torch.from_numpy(x) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        expected = t.backbone(normalized)
        objectness, deltas = t.rpn.head(list(expected.values()))
        boxes = torch.tensor([[2, 3, 30, 40], [10, 10, 20, 60], [0, 0, 63, 63], [5.5, 7.25, 9, 12]])
        pooled = t.roi_heads.box_roi_pool(expected, [boxes[:2], boxes[2:]], [(64, 64)] * 2)
        logits, _ = t.roi_heads.box_predictor(t.roi_heads.box_head(pooled))
    got = m.backbone(m.normalize(Tensor(x)))
    for level, (a, b) in enumerate(zip(got, expected.values())):
        np.testing.assert_allclose(a.asnumpy(), b.numpy(), rtol=1e-3, atol=5e-3, err_msg=f"level {level}")
    # the same backbone compiled, as a graph-mode train step compiles it (the rest of that step is the
    # tiny model's, compiled in test_mindspore_backend's runs; the whole resnet50_fpn step takes ~60 s)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        compiled = m.backbone(m.normalize(Tensor(x)))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    for level, (a, b) in enumerate(zip(compiled, got)):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-4, err_msg=f"graph mode, level {level}")
    ms_objectness, _ = m.rpn.head(got)
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    flat_objectness, _ = concat_box_prediction_layers(objectness, deltas)
    np.testing.assert_allclose(ms_objectness.asnumpy().reshape(-1), flat_objectness.numpy().reshape(-1),
                               rtol=1e-3, atol=1e-3)
    ms_logits, _ = m.roi_heads.box_predictor(m.roi_heads.box_head(m.pool(got, Tensor(boxes.numpy().reshape(2, 2, 4)))))
    np.testing.assert_allclose(ms_logits.asnumpy(), logits.numpy(), rtol=1e-3, atol=1e-3)
    t.eval()
    # the evaluation path of this backbone (nanguard eval on a resnet50_fpn run): boxes, best first
    m.set_train(False)
    found, scores, _, ok = (v.asnumpy() for v in m.detect(Tensor(x)))
    assert np.isfinite(found[ok]).all() and (np.diff(scores, axis=1) <= 0).all()


def test_roi_align_and_the_box_head_match_on_the_same_rois(pair):
    t, m = pair
    t.eval()
    m.set_train(False)
    x = images(1)
    rois = np.array([[0, 2, 3, 30, 40], [0, 10, 10, 20, 60], [1, 0, 0, 63, 63], [1, 5.5, 7.25, 9, 12]], np.float32)
    with torch.no_grad():
        normalized = (torch.from_numpy(x) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        features = t.backbone(normalized)
        boxes = [torch.from_numpy(rois[rois[:, 0] == b, 1:]) for b in (0, 1)]
        pooled = t.roi_heads.box_roi_pool(features, boxes, [(64, 64)] * 2)
        logits, regression = t.roi_heads.box_predictor(t.roi_heads.box_head(pooled))
    assert isinstance(t.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    ms_features = m.backbone(m.normalize(Tensor(x)))
    ms_pooled = m.pool(ms_features, Tensor(rois[:, 1:].reshape(2, 2, 4)))
    np.testing.assert_allclose(ms_pooled.asnumpy(), pooled.numpy(), rtol=1e-3, atol=2e-4)
    ms_logits, ms_regression = m.roi_heads.box_predictor(m.roi_heads.box_head(ms_pooled))
    np.testing.assert_allclose(ms_logits.asnumpy(), logits.numpy(), rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(ms_regression.asnumpy(), regression.numpy(), rtol=1e-3, atol=2e-4)


def test_rois_of_every_size_pool_from_their_own_level_as_in_torchvision():
    """At 512 px a box's size picks any of the four levels; `pool` equals torchvision's
    MultiScaleRoIAlign there, forward and in the gradient the features get, the edges included."""
    m = FasterRCNN(ModelConfig(min_size=512, max_size=512), 3, (500, 512), max_boxes=4)
    rng = np.random.default_rng(3)
    feats = [rng.standard_normal((2, 8, h, w)).astype(np.float32) for h, w in [(125, 128), (63, 64), (32, 32), (16, 16)]]
    x0, y0 = rng.uniform(-20, 400, 40), rng.uniform(0, 400, 40)
    side = np.exp(rng.uniform(np.log(0.5), np.log(600), 40))
    boxes = np.stack([x0, y0, np.minimum(x0 + side, 512), np.minimum(y0 + side * 0.7, 500)], 1)
    edges = [[0, 0, 512, 500], [500, 490, 512, 500], [0, 0, 3, 3], [511.5, 499.5, 512, 500]]
    boxes = np.concatenate([boxes, edges]).astype(np.float32).reshape(2, 22, 4)
    weight = rng.standard_normal((44, 8, 7, 7)).astype(np.float32)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    assert set(np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224) + 1e-6), 2, 5).ravel()) == {2, 3, 4, 5}, \
        "the boxes must reach every level"

    t_feats = {str(k): torch.from_numpy(f).requires_grad_() for k, f in enumerate(feats)}
    expected = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(t_feats, [torch.from_numpy(b) for b in boxes],
                                                               [(500, 512)] * 2)
    (expected * torch.from_numpy(weight)).sum().backward()
    got = m.pool([Tensor(f) for f in feats], Tensor(boxes))
    np.testing.assert_allclose(got.asnumpy(), expected.detach().numpy(), rtol=1e-4, atol=1e-4)
    grads = ms.grad(lambda *f: (m.pool(f, Tensor(boxes)) * Tensor(weight)).sum(), grad_position=(0, 1, 2, 3))(
        *(Tensor(f) for f in feats))
    for k, g in enumerate(grads):
        np.testing.assert_allclose(g.asnumpy(), t_feats[str(k)].grad.numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=f"level {k}")


def test_weights_convert_back_to_the_torch_model_exactly():
    torch.manual_seed(1)
    t = build_model(CFG, 3)
    m = FasterRCNN(CFG, 3, (64, 64), max_boxes=4)
    load_arrays(m, torch_to_mindspore({k: v.numpy() for k, v in t.state_dict().items()}))
    back = mindspore_to_torch(mindspore_arrays(m))
    state = t.state_dict()
    assert set(back) == set(state)
    for name, value in state.items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[name], value.numpy(), err_msg=name)
    fresh = build_model(CFG, 3)
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()})


def test_a_misfit_checkpoint_is_refused_by_name(pair):
    _, m = pair
    arrays = mindspore_arrays(m)
    arrays.pop("rpn.head.cls_logits.bias")
    with pytest.raises(ValueError, match="missing.*rpn.head.cls_logits.bias"):
        load_arrays(m, arrays)
    arrays = mindspore_arrays(m)
    arrays["rpn.head.cls_logits.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError, match=r"rpn.head.cls_logits.bias is \(7,\)"):
        load_arrays(m, arrays)


def targets(batch=2, boxes=4):
    gt = np.zeros((batch, boxes, 4), np.float32)
    labels = np.zeros((batch, boxes), np.int32)
    valid = np.zeros((batch, boxes), bool)
    gt[0, :2] = [[5, 5, 30, 40], [34, 10, 60, 30]]
    labels[0, :2] = [1, 2]
    valid[0, :2] = True
    gt[1, 0], labels[1, 0], valid[1, 0] = [10, 12, 26, 28], 3, True
    return Tensor(gt), Tensor(labels), Tensor(valid)


def draw(batch=2):
    """The boxes of `targets` painted on a dark background, one colour per class."""
    x = np.full((batch, 3, 64, 64), 0.1, np.float32)
    colours = {1: (0.9, 0.2, 0.2), 2: (0.2, 0.9, 0.2), 3: (0.2, 0.2, 0.9)}
    gt, labels, valid = (t.asnumpy() for t in targets(batch))
    for b in range(batch):
        for box, label, ok in zip(gt[b], labels[b], valid[b]):
            if ok:
                x1, y1, x2, y2 = box.astype(int)
                x[b, :, y1:y2, x1:x2] = np.array(colours[int(label)], np.float32)[:, None, None]
    return Tensor(x)


def test_it_learns_under_the_guard_in_graph_mode_and_its_losses_equal_pynative():
    """The whole detector compiles in graph mode under `GuardedTrainStep` (the weights checked outside
    the step, as `nanguard train` does; the in-step check and its flags: test_mindspore_step), its
    first step's four losses equal the same forward's in PyNative, and in graph mode it learns. (A
    PyNative train step of the detector, backward included, is test_mindspore_vs_torch_smoke's.)"""
    x, (gt, labels, valid) = draw(), targets()
    names = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
    ms.set_seed(0)
    m = FasterRCNN(CFG, 3, (64, 64), max_boxes=4)
    rng = np.random.default_rng(0)
    first_noise = Tensor(rng.random((2, m.noise_size())).astype(np.float32))
    m.set_train(True)
    pynative_losses = np.array([loss.asnumpy() for loss in m(x, gt, labels, valid, first_noise)])

    ms.set_context(mode=ms.GRAPH_MODE)
    opt = nn.Momentum(m.trainable_params(), learning_rate=0.02, momentum=0.9, weight_decay=1e-4)
    step = GuardedTrainStep(m, opt, GuardConfig(clip_norm=10.0), param_check_every=10)
    reader = StepReader(names)
    seen = []
    for i in range(30):  # the last 5 losses' mean: 0.16-0.34 of the first from step 20 to 60 here
        noise = first_noise if i == 0 else Tensor(rng.random((2, m.noise_size())).astype(np.float32))
        components, vector = step(x, gt, labels, valid, noise)
        if i == 0:
            assert np.isfinite(components.asnumpy()).all() and len(components.asnumpy()) == 4
            np.testing.assert_allclose(components.asnumpy(), pynative_losses, rtol=1e-4)
        seen += reader.push(i, components, vector)
    seen += reader.flush()
    assert all(o.applied for o in seen)
    checked = dict(zip(STEP_FIELDS, step.check_weights(vector).asnumpy()))  # the run's out-of-step check
    assert checked["nonfinite_param"] == 0 and checked["wild_param"] == 0
    first, last = seen[0].total_loss, np.mean([o.total_loss for o in seen[-5:]])
    assert last < 0.5 * first, [round(o.total_loss, 3) for o in seen]
    # detect with batch statistics: after 30 steps on two 64-px images the deepest maps are 2x2, and
    # BatchNorm's moving statistics do not describe them yet (eval mode is the demo's business)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    boxes, scores, classes, ok = (t.asnumpy() for t in m.detect(x))
    assert np.isfinite(boxes[ok]).all() and (scores[ok] > CFG.box_score_thresh).all()
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    from nanguard.backends.mindspore.boxes import box_iou

    for b in range(2):  # every box is found (IoU > 0.3 after 60 steps), with its class, among its image's 3 best
        for box, label, real in zip(gt.asnumpy()[b], labels.asnumpy()[b], valid.asnumpy()[b]):
            if real:
                iou = box_iou(Tensor(box[None]), Tensor(boxes[b, :3])).asnumpy()[0]
                assert any(iou[j] > 0.3 and classes[b, j] == label and ok[b, j] for j in range(3)), (box, boxes[b, :3])
