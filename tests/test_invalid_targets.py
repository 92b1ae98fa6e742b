"""One bad box costs one box: non-finite and degenerate target boxes are dropped on the host before the
batch reaches the device, reported in the step's observation and as an `invalid_target` incident, and the
rest of the step's update is applied (torchvision's detector would raise on the batch, or train on a NaN)."""

from __future__ import annotations

import json
import math

import numpy as np

from conftest import tiny_args
from nanguard.cli import main
from nanguard.data.loader import Batch, BatchKey
from nanguard.data.targets import drop_invalid_targets


def make_batch(boxes_per_image):
    boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes_per_image]
    labels = [np.arange(1, len(b) + 1, dtype=np.int64) for b in boxes]
    ann_ids = tuple(tuple(100 * (i + 1) + j for j in range(len(b))) for i, b in enumerate(boxes))
    images = [np.zeros((8, 8, 3), np.uint8) for _ in boxes]
    return Batch(BatchKey(0, 0, tuple(range(len(boxes)))), images, boxes, labels, tuple(range(1, len(boxes) + 1)),
                 ann_ids)


def test_only_the_bad_boxes_are_dropped():
    batch = make_batch([[[0, 0, 4, 4], [2, 2, 2, 6], [1, 1, 3, math.nan]], [[0, 0, 5, 5]], []])
    clean, dropped = drop_invalid_targets(batch)
    assert [len(b) for b in clean.boxes] == [1, 1, 0] and clean.labels[0].tolist() == [1]
    assert clean.annotation_ids == ((100,), (200,), ())
    assert dropped == ((1, 101, "zero or negative width or height"), (1, 102, "non-finite coordinate"))
    same, none = drop_invalid_targets(make_batch([[[0, 0, 4, 4]]]))
    assert none == () and same.boxes[0].shape == (1, 4)


def test_a_zero_width_box_costs_one_box_in_training(shapes, tmp_path):
    """With the audit off, a degenerate box reaches the trainer: the step trains on the other boxes."""
    data = tmp_path / "data"
    import shutil

    shutil.copytree(shapes, data)
    ann_file = data / "annotations" / "instances_train.json"
    document = json.loads(ann_file.read_text())
    bad = document["annotations"][0]
    bad["bbox"][2] = 0.0  # zero width
    ann_file.write_text(json.dumps(document))
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(data), "data.audit=off", "train.steps=12",
                 "train.eval_at_end=false", "data.hflip=false"]) == 0
    final = json.loads((run / "final.json").read_text())
    assert final["status"] == "completed" and final["weights_finite"] and final["skipped_steps"] == 0
    lines = [json.loads(line) for line in (run / "incidents.jsonl").read_text().splitlines()]
    assert lines and all(line["kind"] == "invalid_target" and line["applied"] for line in lines)
    assert {(t["image_id"], t["annotation_id"]) for line in lines for t in line["invalid_targets"]} == {
        (bad["image_id"], bad["id"])}
    assert all(line["action"] == "none" and line["batch"] is not None for line in lines)


def test_the_zero_box_fault_is_dropped_and_reported(shapes, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), "data.audit=off", "train.steps=6",
                 "train.eval_at_end=false", "--inject", "zero_box@2"]) == 0
    [line] = [json.loads(line) for line in (run / "incidents.jsonl").read_text().splitlines()]
    [injected] = [json.loads(line) for line in (run / "injections.jsonl").read_text().splitlines()]
    assert line["step"] == 2 and line["kind"] == "invalid_target" and line["applied"] is True
    assert line["invalid_targets"][0]["image_id"] == injected["detail"]["image_id"]
