"""The MindSpore box arithmetic equals torchvision's on the same inputs (anchors, IoU, matching, box
coding, the four losses), with static shapes: padded ground truth and masks instead of selections."""

from __future__ import annotations

import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="mindspore is not installed (make install installs it)")
torch = pytest.importorskip("torch")
from mindspore import Tensor  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torchvision.models.detection import _utils as det_utils  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.ops import box_iou as tv_box_iou  # noqa: E402

from nanguard.backends.mindspore import boxes as B  # noqa: E402
from nanguard.backends.torch.model import TINY_ANCHOR_SIZES, SafeBoxCoder  # noqa: E402


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


def random_boxes(rng, n, size=128.0, min_side=2.0, max_side=60.0):
    xy = rng.uniform(0, size - max_side, size=(n, 2))
    wh = rng.uniform(min_side, max_side, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_anchors_equal_torchvisions_for_the_tiny_model():
    ratios = ((0.5, 1.0, 2.0),) * len(TINY_ANCHOR_SIZES)
    feature_sizes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    generator = AnchorGenerator(sizes=TINY_ANCHOR_SIZES, aspect_ratios=ratios)
    images = ImageList(torch.zeros(1, 3, 128, 160), [(128, 160)])
    features = [torch.zeros(1, 8, h, w) for h, w in feature_sizes]
    [expected] = generator(images, features)
    got = B.grid_anchors((128, 160), feature_sizes, TINY_ANCHOR_SIZES, ratios)
    assert got.shape == tuple(expected.shape)
    np.testing.assert_array_equal(got, expected.numpy())


def test_iou_equals_torchvisions():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 50), random_boxes(rng, 7)
    np.testing.assert_allclose(B.box_iou(Tensor(a), Tensor(b)).asnumpy(),
                               tv_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), atol=1e-6)


@pytest.mark.parametrize("high, low, allow_low_quality", [(0.7, 0.3, True), (0.5, 0.5, False)])
def test_matching_equals_torchvisions_matcher_with_padded_ground_truth(high, low, allow_low_quality):
    rng = np.random.default_rng(1)
    anchors = B.grid_anchors((128, 128), [(16, 16), (8, 8)], ((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    gt = random_boxes(rng, 5, min_side=8)
    gt[2] = gt[1]  # a duplicate box: ties in the low-quality rule
    expected = det_utils.Matcher(high, low, allow_low_quality_matches=allow_low_quality)(
        tv_box_iou(torch.from_numpy(gt), torch.from_numpy(anchors)))
    padded = np.concatenate([gt, np.zeros((3, 4), np.float32)])  # 8 slots, 5 boxes
    valid = Tensor(np.arange(8) < 5)
    got = B.match(B.box_iou(Tensor(padded), Tensor(anchors)), valid, high, low, allow_low_quality)
    np.testing.assert_array_equal(got.asnumpy(), expected.numpy())


def test_matching_with_no_box_makes_every_anchor_background():
    anchors = Tensor(B.grid_anchors((64, 64), [(8, 8)], ((16,),), ((1.0,),)))
    got = B.match(B.box_iou(Tensor(np.zeros((4, 4), np.float32)), anchors), Tensor(np.zeros(4, bool)),
                  0.7, 0.3, True)
    assert (got.asnumpy() == B.BELOW_LOW_THRESHOLD).all()


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_and_decode_equal_the_torch_backends_box_coder(weights):
    rng = np.random.default_rng(2)
    gt, anchors = random_boxes(rng, 40), random_boxes(rng, 40)
    gt[0, 2] = gt[0, 0]  # a zero-width box: a large but finite target, not log(0)
    coder = SafeBoxCoder(weights)
    expected = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
    got = B.encode(Tensor(gt), Tensor(anchors), weights).asnumpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    deltas = rng.normal(size=(40, 12)).astype(np.float32) * 2
    deltas[0, 2] = 50.0  # clamped at log(1000/16)
    expected = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
    np.testing.assert_allclose(B.decode(Tensor(deltas), Tensor(anchors), weights).asnumpy(), expected,
                               rtol=1e-5, atol=1e-4)


def test_sampling_keeps_torchvisions_counts_in_fixed_slots():
    rng = np.random.default_rng(3)
    for positives, negatives, ignored in [(3, 100, 10), (200, 500, 0), (0, 20, 5), (40, 10, 0)]:
        labels = np.array([1] * positives + [0] * negatives + [-1] * ignored, np.int32)
        rng.shuffle(labels)
        noise = Tensor(rng.random(labels.size).astype(np.float32))
        pos, neg = B.sample(Tensor(labels), 256, 0.5, noise)
        pos, neg = pos.asnumpy(), neg.asnumpy()
        want_pos = min(128, positives)
        assert pos.sum() == want_pos and neg.sum() == min(256 - want_pos, negatives)
        assert (labels[pos] == 1).all() and (labels[neg] == 0).all()


def test_rpn_and_roi_losses_equal_torchvisions_on_the_sampled_slots():
    rng = np.random.default_rng(4)
    n, k = 60, 4
    objectness = rng.normal(size=n).astype(np.float32)
    deltas, targets = (rng.normal(size=(n, 4)).astype(np.float32) * 0.3 for _ in range(2))
    labels = rng.integers(-1, 2, size=n).astype(np.int32)
    noise = rng.random(n).astype(np.float32)
    pos, neg = (m.asnumpy() for m in B.sample(Tensor(labels), 32, 0.5, Tensor(noise)))
    sampled = np.flatnonzero(pos | neg)
    obj, box = B.rpn_losses(Tensor(objectness), Tensor(deltas), Tensor(labels), Tensor(targets), Tensor(pos),
                            Tensor(neg))
    t = {name: torch.from_numpy(v) for name, v in dict(objectness=objectness, deltas=deltas, targets=targets).items()}
    expected_obj = F.binary_cross_entropy_with_logits(t["objectness"][sampled],
                                                      torch.from_numpy((labels[sampled] >= 1).astype(np.float32)))
    expected_box = F.smooth_l1_loss(t["deltas"][pos], t["targets"][pos], beta=1 / 9, reduction="sum") / sampled.size
    assert float(obj) == pytest.approx(float(expected_obj), rel=1e-5)
    assert float(box) == pytest.approx(float(expected_box), rel=1e-5)

    from torchvision.models.detection.roi_heads import fastrcnn_loss

    logits = rng.normal(size=(n, k + 1)).astype(np.float32)
    regression = rng.normal(size=(n, 4 * (k + 1))).astype(np.float32) * 0.3
    roi_labels = rng.integers(0, k + 1, size=n).astype(np.int64)
    slots = np.arange(n) < 45  # 45 proposals in 60 slots
    cls, box = B.roi_losses(Tensor(logits), Tensor(regression), Tensor(roi_labels.astype(np.int32)),
                            Tensor(targets), Tensor(slots))
    expected_cls, expected_box = fastrcnn_loss(torch.from_numpy(logits[slots]), torch.from_numpy(regression[slots]),
                                               [torch.from_numpy(roi_labels[slots])],
                                               [torch.from_numpy(targets[slots])])
    assert float(cls) == pytest.approx(float(expected_cls), rel=1e-5)
    assert float(box) == pytest.approx(float(expected_box), rel=1e-5)
    assert math.isfinite(float(box))


def test_the_box_functions_compile_in_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        @ms.jit
        def targets(gt, valid, anchors, noise):
            matched = B.match(B.box_iou(gt, anchors), valid, 0.7, 0.3, True)
            index = ms.ops.clamp(matched, min=0)
            encoded = B.encode(gt[index], anchors, (1.0, 1.0, 1.0, 1.0))
            positive, negative = B.sample(ms.ops.cast(matched >= 0, ms.int32), 64, 0.25, noise)
            return matched, encoded, B.decode(encoded, anchors, (1.0, 1.0, 1.0, 1.0)), positive, negative

        rng = np.random.default_rng(5)
        anchors = B.grid_anchors((64, 64), [(8, 8)], ((16,),), ((0.5, 1.0, 2.0),))
        gt = np.concatenate([random_boxes(rng, 3, size=64, max_side=30), np.zeros((2, 4), np.float32)])
        noise = Tensor(rng.random(anchors.shape[0]).astype(np.float32))
        matched, encoded, decoded, positive, negative = targets(Tensor(gt), Tensor(np.arange(5) < 3),
                                                                Tensor(anchors), noise)
        assert encoded.shape == (anchors.shape[0], 4) and np.isfinite(encoded.asnumpy()).all()
        matched_gt = gt[np.clip(matched.asnumpy(), 0, None)]  # decoding the targets gives the boxes back
        np.testing.assert_allclose(decoded.asnumpy(), matched_gt, atol=1e-3)
        assert 0 < positive.asnumpy().sum() <= 16 and positive.asnumpy().sum() + negative.asnumpy().sum() == 64
        assert set(np.unique(matched.asnumpy())) <= {-2, -1, 0, 1, 2}
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
