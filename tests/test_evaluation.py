"""Known-answer mAP: nanguard's evaluation (faster-coco-eval underneath) against pycocotools' COCOeval
on the same tiny ground truth and detections, and against values worked out by hand."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest

from nanguard.evaluation.coco import STAT_NAMES, evaluate_boxes


def box(x, y, w, h):
    return [float(x), float(y), float(w), float(h)]


def ground_truth(boxes: list[tuple[int, int, list[float]]], sizes: dict[int, int]) -> dict:
    """A COCO dict from (image_id, category_id, xywh) triples; `sizes`: image id -> side in px."""
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": side, "height": side} for i, side in sizes.items()],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}],
        "annotations": [{"id": n + 1, "image_id": image, "category_id": category, "bbox": xywh,
                         "area": xywh[2] * xywh[3], "iscrowd": 0}
                        for n, (image, category, xywh) in enumerate(boxes)],
    }


# Three images, two categories, every COCO size range: small < 32^2 <= medium < 96^2 <= large.
SIZES = {1: 100, 2: 100, 3: 200}
A, B = box(10, 10, 40, 40), box(60, 60, 30, 30)  # image 1: square (medium), disc (medium)
C, D = box(5, 5, 80, 80), box(70, 10, 20, 20)  # image 2: two squares (medium, small)
E, F = box(20, 20, 100, 100), box(150, 150, 20, 20)  # image 3: two discs (large, small)
GT = ground_truth([(1, 1, A), (1, 2, B), (2, 1, C), (2, 1, D), (3, 2, E), (3, 2, F)], SIZES)


def det(image, category, xywh, score):
    return {"image_id": image, "category_id": category, "bbox": list(xywh), "score": score}


def shifted(xywh, dx):
    """The same box moved right by dx: IoU (w - dx) / (w + dx)."""
    x, y, w, h = xywh
    return box(x + dx, y, w, h)


MIXED = [
    det(1, 1, A, 0.9),  # exact
    det(1, 2, B, 0.8),  # exact
    det(2, 1, shifted(C, 20), 0.7),  # IoU 60/100 = 0.6: a match at 0.50 and 0.55 only
    det(2, 1, shifted(D, 10), 0.6),  # IoU 10/30 = 0.33: never a match
    det(3, 2, E, 0.95),  # exact
    det(3, 1, box(0, 0, 10, 10), 0.85),  # a false positive (nothing of category 1 in image 3)
    # F (image 3, disc, small) is missed
]


def pycocotools_stats(gt: dict, detections: list[dict]) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def nanguard_stats(gt: dict, detections: list[dict]) -> dict[str, float]:
    metrics, table = evaluate_boxes(copy.deepcopy(gt), copy.deepcopy(detections))
    assert len(table.splitlines()) == 12
    return metrics


@pytest.mark.parametrize("detections", [MIXED, MIXED[:3], MIXED[::-1]], ids=["mixed", "partial", "reversed"])
def test_all_twelve_stats_agree_with_pycocotools(detections):
    ours = nanguard_stats(GT, detections)
    reference = pycocotools_stats(GT, detections)
    assert len(reference) == len(STAT_NAMES) == 12
    for name, expected in zip(STAT_NAMES, reference):
        assert ours[name] == pytest.approx(expected, abs=1e-6), name
    assert ours["detections"] == len(detections) and ours["dropped_nonfinite"] == 0


def test_the_mixed_set_by_hand():
    """AP50 per category, by hand (101-point interpolated precision):
    square: 3 boxes (A, C, D); by score: A tp (0.9), false positive (0.85), C tp (0.7), D fp (0.6).
      precision 1 up to recall 1/3, then 2/3 up to recall 2/3, never recall 1:
      (34 * 1 + 33 * 2/3) / 101 = 56 / 101.
    disc: 3 boxes (B, E, F); E tp (0.95), B tp (0.8): precision 1 up to recall 2/3: 67 / 101."""
    ours = nanguard_stats(GT, MIXED)
    assert ours["mAP50"] == pytest.approx((56 / 101 + 67 / 101) / 2, abs=1e-6)
    # at IoU 0.75 the shifted C no longer matches: square finds only A, before the false positive
    assert ours["mAP75"] == pytest.approx((34 / 101 + 67 / 101) / 2, abs=1e-6)


def test_perfect_detections_score_one():
    boxes = [(a["image_id"], a["category_id"], a["bbox"]) for a in GT["annotations"]]
    perfect = [det(image, category, xywh, 1.0) for image, category, xywh in boxes]
    ours = nanguard_stats(GT, perfect)
    for name in ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
                 "AR10", "AR100", "AR100_small", "AR100_medium", "AR100_large"):
        assert ours[name] == pytest.approx(1.0, abs=1e-6), name
    # at most one detection per image and category: the two squares of image 2 and the two discs of
    # image 3 each lose one box, so each category recalls 2 of its 3
    assert ours["AR1"] == pytest.approx(2 / 3, abs=1e-6)


def test_half_of_the_boxes_found_gives_ap_51_of_101():
    """Two boxes per image and category; exactly one of each pair found, exactly. Precision is 1 up to
    recall 0.5 and there is no detection beyond: the 51 recall thresholds 0, 0.01, ..., 0.50 have
    precision 1, the other 50 have 0, so AP = 51/101 at every IoU threshold."""
    gt_boxes = [(1, 1, box(5, 5, 40, 40)), (1, 1, box(55, 55, 40, 40)),
                (2, 2, box(5, 5, 40, 40)), (2, 2, box(55, 55, 40, 40))]
    gt = ground_truth(gt_boxes, {1: 100, 2: 100})
    found = [det(1, 1, box(5, 5, 40, 40), 0.9), det(2, 2, box(55, 55, 40, 40), 0.8)]
    ours = nanguard_stats(gt, found)
    assert ours["mAP50"] == pytest.approx(51 / 101, abs=1e-6)
    assert ours["mAP"] == pytest.approx(51 / 101, abs=1e-6)
    assert ours["AR100"] == pytest.approx(0.5, abs=1e-6)
    assert ours["mAP_small"] == -1.0 and ours["mAP_large"] == -1.0  # no ground truth of those sizes
    reference = pycocotools_stats(gt, found)
    assert [ours[name] for name in STAT_NAMES] == pytest.approx(reference, abs=1e-6)


def test_no_detections_and_nonfinite_detections():
    assert nanguard_stats(GT, [])["mAP"] == 0.0
    poisoned = MIXED + [det(1, 1, box(float("nan"), 0, 10, 10), 0.99), det(2, 2, box(0, 0, 5, 5), float("inf"))]
    ours = nanguard_stats(GT, poisoned)
    assert ours["dropped_nonfinite"] == 2 and ours["detections"] == len(MIXED)
    assert [ours[name] for name in STAT_NAMES] == pytest.approx(pycocotools_stats(GT, MIXED), abs=1e-6)
