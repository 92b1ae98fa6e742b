"""COCO detection data as plain numpy records (framework-free: both backends read it).

`CocoIndex` holds one `ImageRecord` per image: the file, its size, its boxes in xyxy (float32), the
contiguous labels 1..K (0 is background), and the annotation ids, so every batch can say exactly which
images and annotations it carried. Crowd boxes are excluded from the training targets, as torchvision's
references do; images with no boxes stay (they teach the background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nanguard.data.cocofile import read_document
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


def escapes_folder(file_name: str) -> bool:
    """True when `file_name`, joined to an image folder, would name a file outside it: an absolute path
    (POSIX, or a Windows drive / UNC path) or one whose `..` parts climb above the folder."""
    if file_name.startswith(("/", "\\")) or (len(file_name) > 1 and file_name[1] == ":"):
        return True
    if ".." not in file_name:
        return False
    depth = 0
    for part in file_name.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """Read a COCO detection file with the reader the audit shares (`nanguard.data.cocofile`): NaN /
    Infinity literals are accepted as floats (the audit reports them); a missing, unreadable, truncated
    or non-COCO file is a `UserError` naming it."""
    document = read_document(path)
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
    check_records(document, ann_file)
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
            path=image_dir / image["file_name"],
            width=int(image.get("width") or 0),
            height=int(image.get("height") or 0),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64),
            annotation_ids=tuple(ann_ids),
        ))
    if not records:
        raise UserError(f"{ann_file}: has no images; nothing to train or evaluate on")
    return CocoIndex(tuple(records), tuple(category_ids),
                     tuple(names.get(c, str(c)) for c in category_ids), ann_file, image_dir)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value: Any) -> bool:
    """A width / height the index can use: absent, or a finite number (the audit judges its value)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value))


def check_records(document: dict[str, Any], ann_file: Path | str) -> None:
    """The record fields the index itself relies on; with data.audit=off (and for the validation split)
    nothing else has looked at them. `UserError` naming the file, the record and the fix."""
    fix = (f"fix the record, or write a copy without such records with `nanguard audit {ann_file} --fix CLEAN.json` "
           "(training with data.audit=drop does that in memory)")
    for row, category in enumerate(document["categories"]):
        if not isinstance(category, dict) or not _is_integer(category.get("id")):
            got = category.get("id") if isinstance(category, dict) else category
            raise UserError(f"{ann_file}: categories[{row}] has no integer id (got {got!r}); {fix}")
    for row, image in enumerate(document["images"]):
        if not isinstance(image, dict):
            raise UserError(f"{ann_file}: images[{row}] is not a JSON object; {fix}")
        # pycocotools takes any hashable id; so does the index (a string id works with data.audit=off)
        image_id = image.get("id")
        if image_id is None or isinstance(image_id, (bool, float, list, dict)):
            raise UserError(f"{ann_file}: images[{row}] has no usable id (got {image_id!r}); ids are integers; {fix}")
        for key in ("width", "height"):
            if not _is_size(image.get(key)):
                raise UserError(f"{ann_file}: images[{row}] (id {image_id!r}) has {key}={image[key]!r}, not a number; {fix}")
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            raise UserError(f"{ann_file}: images[{row}] (id {image_id!r}) has no file_name; {fix}")
        if escapes_folder(name):
            raise UserError(f"{ann_file}: images[{row}] (id {image_id!r}) file_name {name!r} is absolute or leaves "
                            f"the image folder; nanguard reads only files inside it; {fix}")
    for row, ann in enumerate(document["annotations"]):
        if not isinstance(ann, dict):
            raise UserError(f"{ann_file}: annotations[{row}] is not a JSON object; {fix}")
        for key in ("id", "image_id"):
            if ann.get(key) is None or isinstance(ann[key], (bool, float, list, dict)):
                raise UserError(f"{ann_file}: annotations[{row}] has no usable {key} (got {ann.get(key)!r}); {fix}")
        if not _is_box(ann.get("bbox")):  # NaN / Inf are numbers: with data.audit=off they reach the model
            raise UserError(f"{ann_file}: annotations[{row}] (id {ann['id']!r}) has bbox={ann.get('bbox')!r}, not a "
                            f"list of 4 numbers [x, y, width, height]; {fix}")


def _is_box(bbox: Any) -> bool:
    """A list of four real numbers (possibly non-finite: with data.audit=off they must reach the model)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)



