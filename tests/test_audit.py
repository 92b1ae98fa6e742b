"""The audit's checks and fix rules, in process: examples per check, and hypothesis properties of the
vectorised checks against a plain, slow, one-annotation-at-a-time reference."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanguard.audit import CHECKS, AuditReport, audit_and_clean, audit_file, cleaned_dataset
from nanguard.audit.checks import EXTREME_ASPECT_RATIO
from nanguard.errors import UserError

COCO_TINY = Path(os.environ.get("NANGUARD_COCO_TINY", Path(__file__).resolve().parents[2] / "shared/data/coco_tiny"))

ANNOTATION_CHECKS = [name for name, check in CHECKS.items() if check.target == "annotation"]
RECORD_IMAGE_CHECKS = ["malformed_image", "duplicate_image_id", "image_without_annotations"]


def coco(annotations=(), images=None, categories=None, **extra):
    images = [{"id": 1, "width": 100, "height": 80, "file_name": "a.png"}] if images is None else images
    categories = [{"id": 1, "name": "thing"}] if categories is None else categories
    return {"images": list(images), "annotations": list(annotations), "categories": list(categories), **extra}


def ann(id=1, bbox=(10, 10, 20, 20), image_id=1, category_id=1, **extra):
    return {"id": id, "image_id": image_id, "category_id": category_id,
            "bbox": list(bbox) if isinstance(bbox, tuple) else bbox, **extra}


def write(tmp_path: Path, doc, name="ann.json") -> Path:
    path = tmp_path / name
    # allow_nan=True on purpose: Python's json writes NaN / Infinity literals, as real exporters do.
    path.write_text(json.dumps(doc, allow_nan=True) if not isinstance(doc, (str, bytes)) else doc)
    return path


def rows_by_check(report: AuditReport) -> dict[str, list[int]]:
    hits = {**report.ann_hits, **report.img_hits}
    return {name: rows.tolist() for name, rows in hits.items()}


def audit_doc(tmp_path, doc, **kwargs) -> AuditReport:
    return audit_file(write(tmp_path, doc), **kwargs)


# -- one example per check ----------------------------------------------------------------------------

ANNOTATION_CASES = {
    "malformed_annotation": [ann(id="a"), ann(image_id=None), ann(category_id=1.5), 7, ann(category_id=True)],
    "malformed_bbox": [ann(bbox=[1, 2, 3]), ann(bbox=[1, "2", 3, 4]), ann(bbox=None), ann(bbox=[1, 2, 3, True]),
                       {"id": 9, "image_id": 1, "category_id": 1}],
    "nan_coord": [ann(bbox=(math.nan, 1, 2, 3)), ann(bbox=(1, 1, 2, math.nan))],
    "inf_coord": [ann(bbox=(math.inf, 1, 2, 3)), ann(bbox=(1, 1, -math.inf, 3))],
    "zero_width": [ann(bbox=(1, 1, 0, 3))],
    "zero_height": [ann(bbox=(1, 1, 3, 0.0))],
    "negative_size": [ann(bbox=(5, 5, -2, 3)), ann(bbox=(5, 5, 2, -3))],
    "out_of_image": [ann(bbox=(100, 10, 5, 5)), ann(bbox=(-10, 10, 10, 5)), ann(bbox=(10, 200, 5, 5))],
    "unknown_category": [ann(category_id=99)],
    "orphan_annotation": [ann(image_id=42)],
    "tiny_box": [ann(bbox=(10, 10, 0.5, 20)), ann(bbox=(10, 10, 20, 0.25))],
    "partially_out_of_image": [ann(bbox=(-5, 10, 20, 20)), ann(bbox=(90, 70, 20, 20))],
    "extreme_aspect_ratio": [ann(bbox=(0, 0, 99, 1.5)), ann(bbox=(0, 0, 1.2, 79))],
    "nonfinite_area": [ann(area=math.nan), ann(area="big"), ann(area=math.inf)],
}


@pytest.mark.parametrize("check", sorted(ANNOTATION_CASES))
def test_each_annotation_check_flags_its_example(tmp_path, check):
    records = [ann(id=100)] + [dict(r, id=101 + i) if isinstance(r, dict) and r.get("id") == 1 else r
                                for i, r in enumerate(ANNOTATION_CASES[check])]
    report = audit_doc(tmp_path, coco(records))
    flagged = rows_by_check(report)[check]
    assert flagged == list(range(1, len(records))), report.format_table()
    assert 0 not in sum(rows_by_check(report).values(), []), "the healthy annotation is flagged"
    finding = next(f for f in report.findings if f.check == check)
    assert finding.severity == CHECKS[check].severity
    assert (report.errors > 0) == (CHECKS[check].severity == "error")


def test_duplicate_annotation_id_flags_later_occurrences_only(tmp_path):
    report = audit_doc(tmp_path, coco([ann(id=5), ann(id=6), ann(id=5), ann(id=5)]))
    assert rows_by_check(report)["duplicate_annotation_id"] == [2, 3]
    fixes = [f.fix for f in report.findings if f.check == "duplicate_annotation_id"]
    assert fixes == ["renumbered to id 7", "renumbered to id 8"]


def test_image_record_checks(tmp_path):
    images = [
        {"id": 1, "width": 100, "height": 80, "file_name": "a.png"},
        {"id": 1, "width": 100, "height": 80, "file_name": "b.png"},  # duplicate_image_id
        {"id": 2, "width": 0, "height": 80, "file_name": "c.png"},  # malformed_image
        {"id": "x", "width": 10, "height": 10},  # malformed_image (id)
        {"id": 3, "width": 10, "height": 10, "file_name": "d.png"},  # image_without_annotations
        {"id": 4, "height": 10, "file_name": "e.png"},  # malformed_image (no width)
    ]
    report = audit_doc(tmp_path, coco([ann(image_id=1), ann(id=2, image_id=2)], images=images))
    rows = rows_by_check(report)
    assert rows["duplicate_image_id"] == [1]
    assert rows["malformed_image"] == [2, 3, 5]
    assert rows["image_without_annotations"] == [4, 5]
    malformed = [f for f in report.findings if f.check == "malformed_image"]
    assert [f.image_id for f in malformed] == [2, "x", 4]
    assert "width=nan" in malformed[2].message
    assert {f.severity for f in report.findings if f.check == "image_without_annotations"} == {"info"}
    # The annotation on the malformed image is dropped with it; geometry on it is not judged.
    assert report.plan.drop_reason[1] != 0


def test_healthy_file_has_no_findings(tmp_path):
    report = audit_doc(tmp_path, coco([ann(id=1), ann(id=2, bbox=(0, 0, 100, 80))]))
    assert report.errors == 0 and report.warnings == 0 and report.findings == []
    assert report.summary["by_check"]["nan_coord"] == 0
    assert "no findings" in report.format_table()


def test_ids_in_findings_are_as_written(tmp_path):
    report = audit_doc(tmp_path, coco([ann(id="abc", image_id=1), ann(id=3, image_id=77), ann(id=4, image_id=[1])]))
    found = {(f.check, f.annotation_id, f.image_id) for f in report.findings}
    assert ("malformed_annotation", "abc", 1) in found
    assert ("orphan_annotation", 3, 77) in found
    assert ("malformed_annotation", 4, "[1]") in found


def test_min_size_flag(tmp_path):
    doc = coco([ann(bbox=(10, 10, 3, 20))])
    assert audit_doc(tmp_path, doc).warnings == 0
    assert rows_by_check(audit_doc(tmp_path, doc, min_size=4))["tiny_box"] == [0]
    with pytest.raises(UserError):
        audit_doc(tmp_path, doc, min_size=-1)


# -- NaN / Infinity literals and the tolerant paths ------------------------------------------------------


def test_nonstandard_literals_are_read_and_reported(tmp_path):
    text = ('{"images": [{"id": 1, "width": 100, "height": 80, "file_name": "NaN.png", "note": "Infinity \\" NaN"}],'
            ' "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [NaN, 1, 2, 3]},'
            ' {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, Infinity, 3]},'
            ' {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, -Infinity]},'
            ' {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 3]}],'
            ' "categories": [{"id": 1, "name": "NaN"}]}')
    path = write(tmp_path, text)
    for keep in (False, True):
        report = audit_file(path, keep_document=keep)
        rows = rows_by_check(report)
        assert rows["nan_coord"] == [0] and rows["inf_coord"] == [1, 2]
        assert report.summary["nonstandard_literals"] == 3
    report, clean = audit_and_clean(path)
    # Literals inside strings are text and stay so.
    assert clean["images"][0]["file_name"] == "NaN.png" and clean["images"][0]["note"] == 'Infinity " NaN'
    assert [a["id"] for a in clean["annotations"]] == [4]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'[NaN, Infinity, -Infinity]', [(1, b"NaN"), (6, b"Infinity"), (16, b"-Infinity")]),
        (b'["NaN", "a Infinity b"]', []),
        (b'["x\\"NaN", NaN]', [(11, b"NaN")]),  # an escaped quote does not end the string
        (b'["x\\\\", NaN]', [(8, b"NaN")]),  # an escaped backslash before the closing quote
        (b'{"k": [1, 2]}', []),
    ],
)
def test_literal_positions_skip_strings(text, expected):
    from nanguard.audit.literals import literal_positions as _literal_positions

    assert _literal_positions(text) == expected
    assert json.loads(text) is not None  # the cases are valid Python-json text


def test_full_document_gets_real_nan_back(tmp_path):
    # Literals only in checked fields: restored record by record.
    text = ('{"images": [{"id": 1, "width": 100, "height": 80}], "categories": [{"id": 1}],'
            ' "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, NaN, 2, 3], "area": Infinity},'
            ' {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 3]}]}')
    report = audit_file(write(tmp_path, text), keep_document=True)
    bbox, area = report.document["annotations"][0]["bbox"], report.document["annotations"][0]["area"]
    assert bbox[:1] == [1] and math.isnan(bbox[1]) and area == math.inf
    # A literal elsewhere (a segmentation, an extra field): found by walking the document.
    text = text.replace('"bbox": [1, 1, 2, 3]}', '"bbox": [1, 1, 2, 3], "segmentation": [[1, -Infinity, 2]]}')
    text = text.replace('"height": 80}', '"height": 80, "score": NaN}')
    report, clean = audit_and_clean(write(tmp_path, text))
    assert math.isnan(clean["images"][0]["score"])
    assert clean["annotations"][0]["segmentation"] == [[1, -math.inf, 2]]
    assert report.summary["nonstandard_literals"] == 4


def test_overflowing_numbers_read_as_inf(tmp_path):
    # 1e999 is valid JSON that msgspec refuses ("number out of range"); Python reads it as inf.
    text = ('{"images": [{"id": 1, "width": 100, "height": 80}], "categories": [{"id": 1}],'
            ' "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 1e999, 3]}]}')
    report = audit_file(write(tmp_path, text))
    assert rows_by_check(report)["inf_coord"] == [0]


def test_typed_and_loose_paths_agree_on_wrong_types(tmp_path):
    doc = coco([ann(id=1), ann(id=2, bbox=[1, "x", 2, 3]), ann(id=3, bbox=(math.nan, 1, 1, 1))])
    fast = audit_doc(tmp_path, doc)
    full = audit_doc(tmp_path, doc, keep_document=True)
    assert rows_by_check(fast) == rows_by_check(full)
    assert rows_by_check(fast)["malformed_bbox"] == [1] and rows_by_check(fast)["nan_coord"] == [2]


# -- the fix -------------------------------------------------------------------------------------------


def test_fix_rules(tmp_path):
    segmentation = [[10, 10, 20, 10, 20, 20]]
    doc = coco(
        [
            ann(id=1, segmentation=segmentation, area=100.0),  # kept untouched
            ann(id=2, bbox=(math.nan, 1, 2, 3)),  # dropped
            ann(id=1, bbox=(5, 5, 10, 10)),  # duplicate id: renumbered
            ann(id=4, bbox=(-5, 70, 20, 20), segmentation=segmentation),  # clipped
            ann(id=5, bbox=(10, 10, 0.5, 10)),  # tiny: dropped
            ann(id=6, bbox=(-10, 10, 10.5, 10)),  # clipped to 0.5 wide: dropped
            ann(id=7, area=math.nan),  # area set to w*h
            ann(id=8, image_id=2),  # on a malformed image: dropped with it
        ],
        images=[{"id": 1, "width": 100, "height": 80, "file_name": "a.png"}, {"id": 2, "width": -1, "height": 5}],
        info={"year": 2017},
    )
    report, clean = audit_and_clean(write(tmp_path, doc))
    assert clean["info"] == {"year": 2017} and clean["categories"] == doc["categories"]
    assert [im["id"] for im in clean["images"]] == [1]
    by_id = {a["id"]: a for a in clean["annotations"]}
    assert sorted(by_id) == [1, 4, 7, 9]
    assert by_id[1] == doc["annotations"][0]
    assert by_id[9]["bbox"] == [5, 5, 10, 10]
    assert by_id[4]["bbox"] == [0.0, 70.0, 15.0, 10.0] and by_id[4]["segmentation"] == segmentation
    assert by_id[7]["area"] == 400.0
    fixes = {(f.check, f.annotation_id): f.fix for f in report.findings}
    assert fixes[("nan_coord", 2)] == "dropped (nan_coord)"
    assert fixes[("partially_out_of_image", 4)].startswith("clipped to")
    assert fixes[("partially_out_of_image", 6)] == "dropped (under --min-size after clipping to the image)"
    assert fixes[("tiny_box", 5)] == "dropped (under --min-size)"
    # The input document is not modified.
    assert doc["annotations"][3]["bbox"] == [-5, 70, 20, 20]
    clean_path = tmp_path / "clean.json"
    clean_path.write_text(json.dumps(clean, allow_nan=False))
    again = audit_file(clean_path)
    assert again.errors == 0 and again.warnings == 0


def test_cleaned_dataset_forms(tmp_path):
    path = write(tmp_path, coco([ann(id=1), ann(id=2, bbox=(1, 1, 0, 1))]))
    kept = audit_file(path, keep_document=True)
    assert [a["id"] for a in cleaned_dataset(kept)["annotations"]] == [1]
    assert [a["id"] for a in cleaned_dataset(audit_file(path))["annotations"]] == [1]
    assert [a["id"] for a in cleaned_dataset(path)["annotations"]] == [1]
    assert kept.to_json()["summary"]["fix"]["annotations_dropped"] == 1


# -- hypothesis: the vectorised checks against a plain reference -------------------------------------------


def _is_int(v):
    return type(v) is int and -(2**63) <= v < 2**63


def _is_number(v):
    return type(v) is float or type(v) is int  # not bool


def reference_checks(doc, min_size):
    """The same rules, written the slow and obvious way: one record at a time."""
    found = {name: [] for name in ANNOTATION_CHECKS + RECORD_IMAGE_CHECKS}
    first_image = {}
    for row, image in enumerate(doc["images"]):
        ok = (isinstance(image, dict) and _is_int(image.get("id"))
              and all(_is_number(image.get(k)) and math.isfinite(image[k]) and image[k] > 0 for k in ("width", "height")))
        if not ok:
            found["malformed_image"].append(row)
        if isinstance(image, dict) and _is_int(image.get("id")):
            if image["id"] in first_image:
                found["duplicate_image_id"].append(row)
            else:
                first_image[image["id"]] = (image, ok)
    categories = {c["id"] for c in doc["categories"] if isinstance(c, dict) and _is_int(c.get("id"))}
    seen_ids, referenced = set(), set()
    for row, a in enumerate(doc["annotations"]):
        obj = isinstance(a, dict)
        a = a if obj else {}
        ids_ok = all(_is_int(a.get(k)) for k in ("id", "image_id", "category_id"))
        if not (obj and ids_ok):
            found["malformed_annotation"].append(row)
        if _is_int(a.get("image_id")):
            referenced.add(a["image_id"])
            if a["image_id"] not in first_image:
                found["orphan_annotation"].append(row)
        if _is_int(a.get("category_id")) and a["category_id"] not in categories:
            found["unknown_category"].append(row)
        if obj and _is_int(a.get("id")):
            if a["id"] in seen_ids:
                found["duplicate_annotation_id"].append(row)
            seen_ids.add(a["id"])
        area = a.get("area")
        if obj and area is not None and (not _is_number(area) or not math.isfinite(area)):
            found["nonfinite_area"].append(row)
        box = a.get("bbox")
        if not obj:
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            found["malformed_bbox"].append(row)
            continue
        x, y, w, h = (float(v) for v in box)
        if any(math.isnan(v) for v in (x, y, w, h)):
            found["nan_coord"].append(row)
        if any(math.isinf(v) for v in (x, y, w, h)):
            found["inf_coord"].append(row)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            continue
        if w == 0:
            found["zero_width"].append(row)
        if h == 0:
            found["zero_height"].append(row)
        if w < 0 or h < 0:
            found["negative_size"].append(row)
        if w <= 0 or h <= 0:
            continue
        if w < min_size or h < min_size:
            found["tiny_box"].append(row)
        if max(w / h, h / w) > EXTREME_ASPECT_RATIO:
            found["extreme_aspect_ratio"].append(row)
        image, image_ok = first_image.get(a.get("image_id") if _is_int(a.get("image_id")) else None, (None, False))
        if not image_ok:
            continue
        width, height = float(image["width"]), float(image["height"])
        if x + w <= 0 or y + h <= 0 or x >= width or y >= height:
            found["out_of_image"].append(row)
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            found["partially_out_of_image"].append(row)
    for row, image in enumerate(doc["images"]):
        if isinstance(image, dict) and _is_int(image.get("id")) and image["id"] not in referenced:
            found["image_without_annotations"].append(row)
    return found


coordinate = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, -1.0, 99.5, 100.0, 120.0, 1e-9, math.nan, math.inf, -math.inf]),
    st.floats(min_value=-150, max_value=250, allow_nan=False),
    st.integers(min_value=-20, max_value=200),
)
bbox = st.one_of(
    st.lists(coordinate, min_size=4, max_size=4),
    st.lists(coordinate, min_size=0, max_size=6),
    st.lists(st.one_of(coordinate, st.just("7"), st.none(), st.booleans()), min_size=4, max_size=4),
    st.none(),
)
small_id = st.one_of(st.integers(min_value=0, max_value=6), st.just("7"), st.none(), st.just(2.0))
annotation = st.one_of(
    st.fixed_dictionaries(
        {"id": small_id, "image_id": small_id, "category_id": small_id, "bbox": bbox},
        optional={"area": st.one_of(coordinate, st.none(), st.just("x"))},
    ),
    st.just(3),
)
side = st.one_of(st.sampled_from([100, 50.5, 1, 0, -3, math.nan, math.inf]), st.none())
image = st.one_of(
    st.fixed_dictionaries({"id": small_id, "width": side, "height": side, "file_name": st.just("x.png")}),
    st.just("not an image"),
)
category = st.fixed_dictionaries({"id": st.one_of(st.integers(min_value=0, max_value=4), st.just("c"))})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    images=st.lists(image, max_size=5),
    annotations=st.lists(annotation, max_size=25),
    categories=st.lists(category, max_size=4),
    min_size=st.sampled_from([0.0, 1.0, 2.5]),
)
def test_checks_match_the_reference(tmp_path, images, annotations, categories, min_size):
    doc = {"images": images, "annotations": annotations, "categories": categories}
    expected = reference_checks(doc, min_size)
    path = write(tmp_path, doc, "h.json")
    for keep_document in (False, True):  # the typed fast path and the loose full path
        report = audit_file(path, min_size=min_size, keep_document=keep_document)
        got = rows_by_check(report)
        for name, rows in expected.items():
            assert got[name] == rows, (name, keep_document)
    # The fix's output audits clean, and holds only original (or fixed) records.
    clean = cleaned_dataset(report)
    clean_path = tmp_path / "h_clean.json"
    clean_path.write_text(json.dumps(clean, allow_nan=False))
    again = audit_file(clean_path, min_size=min_size)
    assert again.errors == 0, again.format_table()
    assert again.by_check["tiny_box"] == 0 and again.by_check["partially_out_of_image"] == 0


@settings(max_examples=200, deadline=None)
@given(
    x=st.floats(-1e6, 1e6), y=st.floats(-1e6, 1e6), w=st.floats(1e-3, 1e6), h=st.floats(1e-3, 1e6),
    width=st.floats(1, 1e5), height=st.floats(1, 1e5),
)
def test_clipped_boxes_lie_inside_the_image(tmp_path_factory, x, y, w, h, width, height):
    from nanguard.audit.fix import _clip

    clipped = _clip(np.array([[x, y, w, h]]), np.array([width]), np.array([height]))[0]
    if x + w > 0 and y + h > 0 and x < width and y < height:
        cx, cy, cw, ch = clipped.tolist()
        assert cx >= 0 and cy >= 0 and cw >= 0 and ch >= 0
        assert cx + cw <= width and cy + ch <= height


# -- real data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_real_coco_annotations_have_no_error(split):
    path = COCO_TINY / f"annotations/instances_{split}.json"
    if not path.is_file():
        pytest.skip(f"coco_tiny not found at {COCO_TINY} (set NANGUARD_COCO_TINY)")
    report = audit_file(path, images_dir=COCO_TINY / split, decode=True, jobs=2)
    assert report.errors == 0, report.format_table()
    report, clean = audit_and_clean(path)
    original = json.loads(path.read_text())
    assert len(clean["annotations"]) == len(original["annotations"])
    assert clean["annotations"][0]["segmentation"] == original["annotations"][0]["segmentation"]
