"""Findings, the summary, the JSON document and the table for people.

Findings are kept as row arrays per check and turned into `Finding` objects only when asked for: a
million-annotation file with a clean bill of health should not pay for a million Python objects.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nanguard.audit.checks import CHECKS, ERROR, EXTREME_ASPECT_RATIO, WARNING, Geometry
from nanguard.audit.fix import KEPT, FixPlan
from nanguard.audit.images import ImageFacts
from nanguard.audit.load import Columns
from nanguard.fileio import OUTPUT_MARK, json_safe

# What --fix does, per check, for the table (each finding's own `fix` says what happened to it).
FIX_SUMMARY = {
    "malformed_annotation": "annotation dropped",
    "malformed_bbox": "annotation dropped",
    "nan_coord": "annotation dropped",
    "inf_coord": "annotation dropped",
    "zero_width": "annotation dropped",
    "zero_height": "annotation dropped",
    "negative_size": "annotation dropped",
    "out_of_image": "annotation dropped",
    "unknown_category": "annotation dropped",
    "orphan_annotation": "annotation dropped",
    "duplicate_annotation_id": "new unique id",
    "tiny_box": "annotation dropped",
    "partially_out_of_image": "clipped to the image",
    "extreme_aspect_ratio": "kept",
    "nonfinite_area": "area set to w*h",
    "malformed_image": "image and its annotations dropped",
    "duplicate_image_id": "record dropped; annotations stay with the first",
    "missing_image": "image and its annotations dropped",
    "unreadable_image": "image and its annotations dropped",
    "size_mismatch": "image and its annotations dropped",
    "unsafe_path": "image and its annotations dropped",
    "constant_image": "kept",
    "crowd_only_image": "kept (as background)",
    "high_bit_depth": "kept (scaled to 8 bits)",
    "image_without_annotations": "kept",
    "malformed_category": "category dropped",
}


@dataclass(frozen=True)
class Finding:
    check: str
    severity: str  # error, warning, info
    image_id: Any  # as written in the file; None where there is none
    annotation_id: Any  # as written; None for image findings or where missing
    message: str
    fix: str  # what --fix does (did) to this record


def _json_value(value: Any) -> Any:
    if isinstance(value, float):
        return json_safe(value)  # "nan", "inf", "-inf": allow_nan=False output
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _number(value: float) -> str:
    """Compact: 12, 12.5, 1e+308 (not a 309-digit integer), nan, inf."""
    if not math.isfinite(value):
        return repr(float(value))
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _box_text(box: np.ndarray) -> str:
    return "[" + ", ".join(_number(v) for v in box.tolist()) + "]"


class AuditReport:
    """The result of auditing one COCO file. `document` is the full COCO dict when the audit kept it."""

    def __init__(
        self,
        path: Path,
        columns: Columns,
        ann_hits: dict[str, np.ndarray],
        img_hits: dict[str, np.ndarray],
        geometry: Geometry,
        plan: FixPlan,
        *,
        min_size: float,
        image_facts: ImageFacts | None = None,
        document: dict[str, Any] | None = None,
        cat_hits: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.path = Path(path)
        self.columns = columns
        self.ann_hits = ann_hits
        self.img_hits = img_hits
        self.cat_hits = cat_hits or {}
        self.geometry = geometry
        self.plan = plan
        self.min_size = min_size
        self.image_facts = image_facts
        self.document = document
        # The audit_file arguments that made this report, so cleaned_dataset can redo it the same way.
        self.options: dict[str, Any] = {"min_size": min_size}

    # -- counts ----------------------------------------------------------------------------------

    @cached_property
    def by_check(self) -> dict[str, int]:
        """Every check that ran, in contract order, with its count (zeros included)."""
        hits = {**self.ann_hits, **self.img_hits, **self.cat_hits}
        return {name: int(hits[name].size) for name in CHECKS if name in hits}

    def _count(self, severity: str) -> int:
        return sum(count for name, count in self.by_check.items() if CHECKS[name].severity == severity)

    @property
    def errors(self) -> int:
        return self._count(ERROR)

    @property
    def warnings(self) -> int:
        return self._count(WARNING)

    @property
    def summary(self) -> dict[str, Any]:
        return {
            "images": self.columns.n_images,
            "annotations": self.columns.n_annotations,
            "errors": self.errors,
            "warnings": self.warnings,
            "info": self._count("info"),
            "by_check": dict(self.by_check),
            "min_size": self.min_size,
            "images_checked": self.image_facts.checked if self.image_facts is not None else 0,
            "nonstandard_literals": self.columns.nonstandard_literals,
            "fix": {
                "annotations_dropped": self.plan.annotations_dropped,
                "annotations_clipped": int(self.plan.clip_rows.size),
                "annotations_renumbered": int(self.plan.renumber_rows.size),
                "images_dropped": self.plan.images_dropped,
            },
        }

    # -- ids as written ----------------------------------------------------------------------------

    def _ann_id(self, row: int) -> Any:
        cols = self.columns
        return int(cols.ann_ids[row]) if cols.ann_id_ok[row] else _json_value(cols.raw_ann_ids.get(row))

    def _ann_image_id(self, row: int) -> Any:
        cols = self.columns
        if cols.ann_image_id_ok[row]:
            return int(cols.ann_image_ids[row])
        return _json_value(cols.raw_ann_image_ids.get(row))

    def _image_id(self, row: int) -> Any:
        cols = self.columns
        return int(cols.image_ids[row]) if cols.image_id_ok[row] else _json_value(cols.raw_image_ids.get(row))

    def _category_id(self, row: int) -> Any:
        return _json_value(self.columns.raw_category_ids.get(row))

    def first_ids(self, name: str, limit: int = 5) -> list[Any]:
        rows = {**self.ann_hits, **self.img_hits, **self.cat_hits}[name][:limit].tolist()
        if CHECKS[name].target == "annotation":
            return [self._ann_id(row) for row in rows]
        if CHECKS[name].target == "category":
            return [self._category_id(row) for row in rows]
        return [self._image_id(row) for row in rows]

    # -- findings --------------------------------------------------------------------------------

    def _ann_message(self, name: str, row: int) -> str:
        """Starts with annotations[ROW]: ids can repeat (that is one of the findings), the index cannot."""
        cols, geometry = self.columns, self.geometry
        where = f"annotations[{row}]"
        if name == "malformed_annotation" and not cols.ann_is_object[row]:
            return f"{where} is not a JSON object"
        return f"{where}: {self._ann_detail(name, row, cols, geometry)}"

    def _ann_detail(self, name: str, row: int, cols: Columns, geometry: Geometry) -> str:
        box = _box_text(cols.boxes[row])
        if name == "malformed_annotation":
            bad = [key for key, ok in (("id", cols.ann_id_ok), ("image_id", cols.ann_image_id_ok),
                                       ("category_id", cols.ann_category_ok)) if not ok[row]]
            return f"{', '.join(bad)} missing or not an integer"
        if name == "malformed_bbox":
            return "bbox missing or not a list of 4 numbers [x, y, width, height]"
        if name == "unknown_category":
            return f"category_id {int(cols.ann_category_ids[row])} is not in categories"
        if name == "orphan_annotation":
            return f"image_id {int(cols.ann_image_ids[row])} is not in images"
        if name == "duplicate_annotation_id":
            return f"id {int(cols.ann_ids[row])} is already used by an earlier annotation"
        if name == "nonfinite_area":
            return "area is NaN, Inf or not a number"
        if name == "tiny_box":
            return f"bbox {box} (xywh) has a side below --min-size {self.min_size:g}"
        if name in ("out_of_image", "partially_out_of_image"):
            size = f"{_number(geometry.image_width[row])}x{_number(geometry.image_height[row])}"
            return f"bbox {box} (xywh) vs image {size}"
        if name == "extreme_aspect_ratio":
            return f"bbox {box} (xywh) is more than {EXTREME_ASPECT_RATIO:g} times longer than wide, or the reverse"
        return f"bbox {box} (xywh)"

    def _ann_fix(self, name: str, row: int) -> str:
        code = int(self.plan.drop_reason[row])
        if code != KEPT:
            return self.plan.reason_text(code)
        if name == "duplicate_annotation_id":
            position = int(np.searchsorted(self.plan.renumber_rows, row))
            return f"renumbered to id {int(self.plan.new_ids[position])}"
        if name == "partially_out_of_image":
            position = int(np.searchsorted(self.plan.clip_rows, row))
            return f"clipped to {_box_text(self.plan.clipped_boxes[position])}"
        if name == "nonfinite_area":
            return "area set to the box's width * height"
        return "kept"

    def _img_message(self, name: str, row: int) -> str:
        cols, facts = self.columns, self.image_facts
        where = f"images[{row}]"
        if name == "malformed_image":
            if not cols.image_is_object[row]:
                return f"{where} is not a JSON object"
            raw_id = cols.raw_image_ids.get(row)
            if not cols.image_id_ok[row] and isinstance(raw_id, str):
                return (f"{where}: id {raw_id!r} is a string; nanguard needs integer image ids, as COCO writes "
                        "them (renumber the images and their annotations' image_id)")
            return (f"{where}: needs an integer id and finite positive width and height "
                    f"(id={_json_value(self._image_id(row))!r}, width={_number(cols.widths[row])}, "
                    f"height={_number(cols.heights[row])})")
        if name == "unsafe_path":
            return (f"{where}: file_name {cols.file_names[row]!r} is absolute or leaves the image folder; "
                    "not read (name files relative to the folder)")
        if name == "crowd_only_image":
            return f"{where}: every annotation of {cols.file_names[row]} is a crowd box (iscrowd=1); it trains as background"
        if name == "duplicate_image_id":
            return f"{where}: id {int(cols.image_ids[row])} is already used by an earlier image"
        if name == "image_without_annotations":
            return f"{where}: {cols.file_names[row]} has no annotations"
        # The file checks run, and so can hit, only with --images: `facts` is there.
        file_name = cols.file_names[row]
        if name == "missing_image":
            if file_name is None:
                return f"{where}: no 'file_name' in the record"
            return f"{file_name}: not found in {facts.folder}"
        if name == "unreadable_image":
            return f"{file_name}: {facts.error.get(row, 'cannot be read')}"
        if name == "size_mismatch":
            width, height = facts.actual_size[row]
            return (f"{file_name}: file is {width}x{height}, json says "
                    f"{_number(cols.widths[row])}x{_number(cols.heights[row])}")
        if name == "constant_image":
            return f"{file_name}: zero std in channel(s) {facts.constant_channels.get(row)}"
        if name == "high_bit_depth":
            return f"{file_name}: mode {facts.mode.get(row)} (more than 8 bits per pixel); scaled to 8 bits for training"
        return str(file_name)

    def _category_message(self, row: int) -> str:
        where = f"categories[{row}]"
        if row not in self.columns.raw_category_ids:
            return f"{where}: id missing"
        raw = self.columns.raw_category_ids[row]
        if raw is None:
            return f"{where}: id missing (or the record is not a JSON object)"
        return f"{where}: id {_json_value(raw)!r} is not an integer; COCO category ids are integers"

    def _img_fix(self, name: str, row: int) -> str:
        if self.plan.drop_image[row]:
            count = int(self._annotations_per_image[row])
            return f"image and its {count} annotation(s) dropped"
        if name == "duplicate_image_id":
            return "record dropped; its annotations stay with the first image with this id"
        return "kept"

    @cached_property
    def _annotations_per_image(self) -> np.ndarray:
        rows = self.geometry.image_row
        return np.bincount(rows[rows >= 0], minlength=self.columns.n_images)

    @cached_property
    def findings(self) -> list[Finding]:
        out: list[Finding] = []
        for name, check in CHECKS.items():
            if check.target == "annotation" and name in self.ann_hits:
                for row in self.ann_hits[name].tolist():
                    out.append(Finding(name, check.severity, self._ann_image_id(row), self._ann_id(row),
                                       self._ann_message(name, row), self._ann_fix(name, row)))
            elif check.target == "image" and name in self.img_hits:
                for row in self.img_hits[name].tolist():
                    out.append(Finding(name, check.severity, self._image_id(row), None,
                                       self._img_message(name, row), self._img_fix(name, row)))
            elif check.target == "category" and name in self.cat_hits:
                for row in self.cat_hits[name].tolist():
                    out.append(Finding(name, check.severity, None, None, self._category_message(row),
                                       "category dropped"))
        return out

    def to_json(self) -> dict[str, Any]:
        """The --json document; strict JSON (no NaN), ids as written."""
        return {
            OUTPUT_MARK: "audit",
            "file": str(self.path),
            "summary": self.summary,
            "findings": [asdict(finding) for finding in self.findings],
        }

    # -- the table -------------------------------------------------------------------------------

    def table(self):  # -> rich.table.Table
        from rich.table import Table

        summary = self.summary
        table = Table(title=f"{self.path.name}: {summary['images']} images, {summary['annotations']} annotations, "
                            f"{summary['errors']} errors, {summary['warnings']} warnings")
        for column in ("check", "severity", "count", "first ids", "--fix"):
            table.add_column(column, justify="right" if column == "count" else "left")
        style = {ERROR: "red", WARNING: "yellow"}
        for name, count in self.by_check.items():
            if count == 0:
                continue
            severity = CHECKS[name].severity
            ids = ", ".join(str(i) for i in self.first_ids(name)) + (", ..." if count > 5 else "")
            table.add_row(name, f"[{style.get(severity, 'dim')}]{severity}[/]", str(count), ids, FIX_SUMMARY[name])
        return table

    def format_table(self, width: int = 120) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=width, no_color=True, highlight=False)
        self.print_table(console)
        return buffer.getvalue()

    def print_table(self, console) -> None:
        if not any(self.by_check.values()):
            console.print(f"{self.path}: {self.columns.n_images} images, {self.columns.n_annotations} "
                          f"annotations, no findings")
            return
        console.print(self.table())
