"""COCO detection data as plain numpy records (framework-free: both backends read it).

`CocoIndex` holds one `ImageRecord` per image: the file, its size, its boxes in xyxy (float32), the
contiguous labels 1..K (0 is background), and the annotation ids, so every batch can say exactly which
images and annotations it carried. Crowd boxes are excluded from the training targets, as torchvision's
references do; images with no boxes stay (they teach the background).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nanguard.errors import UserError


@dataclass(frozen=True)
class ImageRecord:
    image_id: Any  # as written in the json (int for COCO)
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] xyxy float32, pixels
    labels: np.ndarray  # [N] int64, contiguous 1..K
    annotation_ids: tuple  # [N] ids as written in the json


@dataclass(frozen=True)
class CocoIndex:
    records: tuple[ImageRecord, ...]
    category_ids: tuple[int, ...]  # label k (1-based) is category_ids[k - 1]
    category_names: tuple[str, ...]
    ann_file: Path
    image_dir: Path

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        """Foreground classes; the model adds one for background."""
        return len(self.category_ids)


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """Read a COCO detection file; Python's NaN/Infinity literals are accepted (the audit reports them)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such annotation file; check the path (data.*_ann)")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a COCO json file; point at annotations/instances_*.json")
    try:
        with open(path, "rb") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"{path}: not valid JSON{where} (truncated?); re-export the annotation file") from None
    check_coco_document(document, path)
    return document


def check_coco_document(document: Any, path: Path | str) -> None:
    if not isinstance(document, dict) or not isinstance(document.get("images"), list) \
            or not isinstance(document.get("annotations"), list):
        raise UserError(f"{path}: not a COCO detection file (needs 'images' and 'annotations' lists)")
    if not isinstance(document.get("categories"), list) or not document["categories"]:
        raise UserError(f"{path}: has no 'categories' list; a detection file must name its classes")


def build_index(document: dict[str, Any], ann_file: str | Path, image_dir: str | Path,
                category_ids: tuple[int, ...] | None = None) -> CocoIndex:
    """Index a (validated or audited) COCO dict. `category_ids` fixes the label mapping (the training
    split's), so that validation labels mean the same classes."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: no such image folder; check data.*_images or data.root")
    check_coco_document(document, ann_file)
    categories = sorted(document["categories"], key=lambda c: c["id"])
    names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
    if category_ids is None:
        category_ids = tuple(int(c["id"]) for c in categories)
    label_of = {cid: k + 1 for k, cid in enumerate(category_ids)}

    per_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in document["annotations"]:
        per_image.setdefault(ann.get("image_id"), []).append(ann)

    records = []
    for image in document["images"]:
        anns = [a for a in per_image.get(image["id"], []) if not a.get("iscrowd", 0)]
        boxes, labels, ann_ids = [], [], []
        for ann in anns:
            bbox = ann.get("bbox")
            if ann.get("category_id") not in label_of or not _is_box(bbox):
                continue  # the audit reports these; training never sees them
            x, y, w, h = (float(v) for v in bbox)
            boxes.append((x, y, x + w, y + h))
            labels.append(label_of[ann["category_id"]])
            ann_ids.append(ann.get("id"))
        records.append(ImageRecord(
            image_id=image["id"],
            path=image_dir / str(image["file_name"]),
            width=int(image.get("width", 0) or 0),
            height=int(image.get("height", 0) or 0),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64),
            annotation_ids=tuple(ann_ids),
        ))
    if not records:
        raise UserError(f"{ann_file}: has no images; nothing to train or evaluate on")
    return CocoIndex(tuple(records), tuple(category_ids),
                     tuple(names.get(c, str(c)) for c in category_ids), ann_file, image_dir)


def _is_box(bbox: Any) -> bool:
    """A list of four real numbers (possibly non-finite: with data.audit=off they must reach the model)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)


def is_finite_box(bbox: Any) -> bool:
    return _is_box(bbox) and all(math.isfinite(v) for v in bbox)
