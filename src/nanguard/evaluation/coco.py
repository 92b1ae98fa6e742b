"""COCO box mAP from plain detections (framework-free), with faster-coco-eval as the evaluator.

    metrics, table = evaluate_boxes(gt_document, detections)

`detections`: COCO results, `[{"image_id", "category_id", "bbox": [x, y, w, h] (xywh), "score"}]`.
Returns the 12 standard numbers by name (`mAP`, `mAP50`, `mAP75`, `mAP_small`, ... `AR100_large`) and the
usual 12-line table as text. Non-finite detections never reach the evaluator: they are dropped and
counted (`dropped_nonfinite`), since one NaN box would make every number meaningless.
"""

from __future__ import annotations

import copy
import io
import math
from contextlib import redirect_stdout
from typing import Any

STAT_NAMES = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
              "AR1", "AR10", "AR100", "AR100_small", "AR100_medium", "AR100_large")

_LINES = (
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {:.3f}",
    " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = {:.3f}",
    " Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ] = {:.3f}",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = {:.3f}",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = {:.3f}",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = {:.3f}",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = {:.3f}",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ] = {:.3f}",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {:.3f}",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = {:.3f}",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = {:.3f}",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = {:.3f}",
)


def format_table(metrics: dict[str, float]) -> str:
    return "\n".join(line.format(metrics[name]) for line, name in zip(_LINES, STAT_NAMES))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_image_ids(gt_document: dict[str, Any], detections: list[dict[str, Any]], image_ids: list | None):
    """faster-coco-eval takes int(image id), which fails on "img_001"; pycocotools (and the index) take
    any id. Where an id is not an integer, every image id is renumbered 1..n, on copies, consistently in
    the ground truth, the detections and `image_ids`; the metrics do not depend on the numbering."""
    images, annotations = gt_document["images"], gt_document["annotations"]
    if all(_is_int(image["id"]) for image in images) and all(_is_int(a["image_id"]) for a in annotations):
        return gt_document, detections, image_ids
    number: dict[Any, int] = {}
    for image_id in [image["id"] for image in images] + [a["image_id"] for a in annotations]:
        number.setdefault(image_id, len(number) + 1)

    def renumbered(image_id: Any) -> int:
        return number.setdefault(image_id, len(number) + 1)

    gt = dict(gt_document)
    gt["images"] = [{**image, "id": renumbered(image["id"])} for image in images]
    gt["annotations"] = [{**a, "image_id": renumbered(a["image_id"])} for a in annotations]
    detections = [{**d, "image_id": renumbered(d["image_id"])} for d in detections]
    if image_ids is not None:
        image_ids = [renumbered(i) for i in image_ids]
    return gt, detections, image_ids


def evaluate_boxes(gt_document: dict[str, Any], detections: list[dict[str, Any]],
                   image_ids: list | None = None) -> tuple[dict[str, Any], str]:
    """mAP of `detections` against the ground truth `gt_document` (a COCO dict). `image_ids` limits the
    evaluation to those images (eval.max_images)."""
    from faster_coco_eval import COCO, COCOeval_faster  # imported here: only eval needs it

    finite = [d for d in detections if all(math.isfinite(v) for v in (*d["bbox"], d["score"]))]
    gt_document, finite, image_ids = _integer_image_ids(gt_document, finite, image_ids)
    gt = copy.copy(gt_document)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    coco_gt = COCO(gt)
    metrics: dict[str, Any] = {"images": len(image_ids) if image_ids is not None else len(gt["images"]),
                               "detections": len(finite),
                               "dropped_nonfinite": len(detections) - len(finite)}
    if not finite:
        metrics.update({name: 0.0 for name in STAT_NAMES})
        return metrics, format_table(metrics)
    coco_dt = coco_gt.loadRes(finite)
    evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a, **k: None)
    if image_ids is not None:
        evaluator.params.imgIds = list(image_ids)
    with redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    for name, value in zip(STAT_NAMES, evaluator.stats[:12]):
        # COCO writes -1 where a number is undefined (no ground truth of that size): keep it, it is
        # what every COCO table shows.
        metrics[name] = round(float(value), 6)
    return metrics, format_table(metrics)
