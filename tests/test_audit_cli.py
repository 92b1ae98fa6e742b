"""`nanguard audit` as a user runs it: exit codes, unusable inputs, --json, --fix, image files, and the
promise that the audit never imports torch or mindspore."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanguard.audit import audit_file
from nanguard.cli import main

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = Path(os.environ.get("NANGUARD_COCO_TINY", Path(__file__).resolve().parents[2] / "shared/data/coco_tiny"))


def coco(annotations, images=None):
    images = [{"id": 1, "width": 64, "height": 48, "file_name": "a.png"}] if images is None else images
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


def ann(id, bbox, image_id=1, **extra):
    return {"id": id, "image_id": image_id, "category_id": 1, "bbox": bbox, **extra}


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc, allow_nan=True))
    return path


def audit(capsys, *argv):
    code = main(["audit", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# -- exit codes --------------------------------------------------------------------------------------


def test_exit_0_on_clean_and_1_on_error(tmp_path, capsys):
    clean = write_json(tmp_path / "clean.json", coco([ann(1, [1, 1, 10, 10])]))
    assert audit(capsys, clean, "--quiet")[0] == 0
    warn = write_json(tmp_path / "warn.json", coco([ann(1, [-1, 1, 10, 10])]))
    assert audit(capsys, warn, "--quiet")[0] == 0  # a warning is not an error
    bad = write_json(tmp_path / "bad.json", coco([ann(1, [1, 1, 0, 10]), ann(2, [1, 2, 3])]))
    code, out, err = audit(capsys, bad)
    assert code == 1
    assert "zero_width" in out and "malformed_bbox" in out and "annotation dropped" in out


UNUSABLE = {
    "missing": (None, "no such file"),
    "folder": ("<dir>", "is a folder"),
    "empty": (b"", "empty"),
    "not json": (b"hello, world", "not valid JSON"),
    "truncated": (b'{"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [{"id": 1, "bbox": [1, 2', "truncated"),
    "truncated after NaN": (b'{"images": [], "annotations": [{"bbox": [NaN, 2', "truncated"),
    "a list": (b"[1, 2, 3]", "not a COCO detection file"),
    "a dict without images": (b'{"annotations": [], "categories": []}', "'images'"),
    "a dict without annotations": (b'{"images": [], "categories": []}', "'annotations'"),
    "annotations not a list": (b'{"images": [], "annotations": {}, "categories": []}', "'annotations'"),
    "a number": (b"42", "not a COCO detection file"),
    "binary": (bytes(range(256)), "not valid JSON"),
    "nested past any depth": (b"[" * 100_000 + b"]" * 100_000, "nested thousands of levels deep"),
    "nested in a record": (b'{"images": [], "categories": [], "annotations": [{"id": 1, "iscrowd": '
                           + b"[" * 100_000 + b"]" * 100_000 + b"}]}", "nested thousands of levels deep"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_unusable_input_exits_2_with_one_line(tmp_path, capsys, case):
    content, expected = UNUSABLE[case]
    path = tmp_path / "ann.json"
    if content == "<dir>":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    code, out, err = audit(capsys, path, "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and expected in err, err


def test_a_device_is_not_read_without_end(capsys):
    code, _, err = audit(capsys, Path("/dev/zero"), "--quiet")
    assert code == 2 and err.count("\n") == 1 and "/dev/zero: a device, not a file" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so an unreadable file cannot be made")
def test_unreadable_file_exits_2(tmp_path, capsys):
    path = write_json(tmp_path / "ann.json", coco([]))
    path.chmod(0)
    code, _, err = audit(capsys, path, "--quiet")
    assert code == 2 and "permission denied" in err


def test_unreadable_file_exits_2_even_as_root(tmp_path, capsys, monkeypatch):
    path = write_json(tmp_path / "ann.json", coco([]))

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    code, _, err = audit(capsys, path, "--quiet")
    assert code == 2 and "permission denied" in err and str(path) in err


def test_quiet_prints_nothing(tmp_path, capsys):
    path = write_json(tmp_path / "ann.json", coco([ann(1, [1, 1, 0, 10])]))
    code, out, err = audit(capsys, path, "--quiet")
    assert (code, out, err) == (1, "", "")


def test_bad_flags_exit_2(tmp_path, capsys):
    path = write_json(tmp_path / "ann.json", coco([]))
    assert audit(capsys, path, "--no-decode", "--quiet")[0] == 2
    assert audit(capsys, path, "--images", tmp_path / "nope", "--quiet")[0] == 2
    (tmp_path / "imgs").mkdir()
    assert audit(capsys, path, "--images", tmp_path / "imgs", "--jobs", "0", "--quiet")[0] == 2
    assert audit(capsys, path, "--min-size", "-3", "--quiet")[0] == 2
    for flag in ("--fix", "--json"):
        code, _, err = audit(capsys, path, flag, path, "--quiet")
        assert code == 2 and "never overwrites" in err
    assert json.loads(path.read_text()) == coco([])


def test_a_bad_record_is_a_finding_not_exit_2(tmp_path, capsys):
    path = write_json(tmp_path / "ann.json", coco([ann(1, [1, "2", 3, 4]), ann(2, [1, 2, 3]), "junk", ann(4, [1, 1, 5, 5])]))
    code, _, _ = audit(capsys, path, "--quiet", "--json", tmp_path / "out.json")
    assert code == 1
    findings = json.loads((tmp_path / "out.json").read_text())["findings"]
    assert {f["check"] for f in findings} == {"malformed_bbox", "malformed_annotation"}


# -- --json and --fix ----------------------------------------------------------------------------------


def test_json_output_contract(tmp_path, capsys):
    text = ('{"images": [{"id": 7, "width": 64, "height": 48, "file_name": "a.png"}], "categories": [{"id": 1}],'
            ' "annotations": [{"id": 3, "image_id": 7, "category_id": 1, "bbox": [NaN, 1, Infinity, 2], "area": NaN},'
            ' {"id": 4, "image_id": 8, "category_id": 1, "bbox": [1, 1, 2, 2]}]}')
    path = tmp_path / "ann.json"
    path.write_text(text)
    code, _, _ = audit(capsys, path, "--quiet", "--json", tmp_path / "out.json")
    assert code == 1
    raw = (tmp_path / "out.json").read_text()
    def reject(token):
        raise AssertionError(f"non-standard literal {token} in --json output")

    json.loads(raw, parse_constant=reject)
    out = json.loads(raw)
    assert set(out) == {"nanguard", "file", "summary", "findings"} and out["file"] == str(path)
    assert next(iter(out)) == "nanguard"  # first: how a later audit knows the file is its own to replace
    summary = out["summary"]
    assert {"images", "annotations", "errors", "warnings", "by_check"} <= set(summary)
    assert summary["images"] == 1 and summary["annotations"] == 2 and summary["errors"] == 3
    assert summary["by_check"]["nan_coord"] == 1 and summary["by_check"]["inf_coord"] == 1
    assert summary["by_check"]["orphan_annotation"] == 1 and summary["nonstandard_literals"] == 3
    for finding in out["findings"]:
        assert set(finding) == {"check", "severity", "image_id", "annotation_id", "message", "fix"}
    nan = next(f for f in out["findings"] if f["check"] == "nan_coord")
    assert (nan["image_id"], nan["annotation_id"], nan["severity"]) == (7, 3, "error")
    assert nan["fix"] == "dropped (nan_coord)"


def test_fix_writes_a_copy_that_audits_clean(tmp_path, capsys):
    segmentation = [[1.5, 1.5, 20.0, 1.5, 20.0, 20.0]]
    doc = coco([
        ann(1, [1, 1, 10, 10], segmentation=segmentation, area=81.0, iscrowd=0),
        ann(1, [50, 40, 30, 30], segmentation=segmentation),  # duplicate id, partially out
        ann(3, [math.nan, 1, 1, 1]),
        ann(4, [1, 1, 0.5, 9]),
    ])
    doc["info"] = {"description": "kept"}
    src = write_json(tmp_path / "ann.json", doc)
    before = src.read_bytes()
    code, out, _ = audit(capsys, src, "--fix", tmp_path / "clean.json", "--json", tmp_path / "f.json")
    assert code == 1 and "wrote" in out
    assert src.read_bytes() == before
    clean = json.loads((tmp_path / "clean.json").read_text())
    assert clean["info"] == {"description": "kept"}
    assert clean["annotations"][0] == doc["annotations"][0]
    assert clean["annotations"][1]["id"] == 5 and clean["annotations"][1]["bbox"] == [50, 40, 14, 8]
    assert clean["annotations"][1]["segmentation"] == segmentation
    assert len(clean["annotations"]) == 2
    assert audit(capsys, tmp_path / "clean.json", "--quiet")[0] == 0
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer left no temp file behind


def test_outputs_never_overwrite_a_file_nanguard_did_not_write(tmp_path, capsys):
    """--json / --fix onto the split's other annotation file, a user's own file, the audited file, or
    each other: one line, exit 2, before the audit, every file as it was. Its own outputs are replaced."""
    src = write_json(tmp_path / "train.json", coco([ann(1, [1, 1, 10, 10])]))
    val = write_json(tmp_path / "val.json", coco([ann(2, [2, 2, 5, 5])]))
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    before = {p: p.read_bytes() for p in (src, val, mine)}
    for flag, out, needle in (("--json", val, "nanguard did not write it"), ("--fix", mine, "nanguard did not write it"),
                              ("--fix", src, "an input of this command"), ("--json", tmp_path, "is a folder")):
        code, _, err = audit(capsys, src, "--quiet", flag, out)
        assert code == 2 and err.count("\n") == 1 and needle in err, err
    code, _, err = audit(capsys, src, "--quiet", "--json", tmp_path / "a.json", "--fix", tmp_path / "a.json")
    assert code == 2 and "the same file" in err
    assert {p: p.read_bytes() for p in (src, val, mine)} == before
    for _ in range(2):  # the second run replaces what the first wrote
        assert audit(capsys, src, "--quiet", "--json", tmp_path / "a.json", "--fix", tmp_path / "c.json")[0] == 0
    assert audit(capsys, tmp_path / "c.json", "--quiet")[0] == 0  # the marked copy is still a COCO file


# -- image files ---------------------------------------------------------------------------------------


def _png(path: Path, size=(64, 48), constant=False, seed=0):
    rng = np.random.default_rng(seed)
    pixels = np.full((size[1], size[0], 3), 7, np.uint8) if constant else rng.integers(0, 255, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)


def test_image_checks(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "ok.png")
    _png(folder / "flat.png", constant=True)
    _png(folder / "small.png", size=(32, 48))
    (folder / "junk.png").write_bytes(b"not an image at all")
    _png(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:200])  # header intact, data cut
    names = ["ok.png", "flat.png", "small.png", "junk.png", "cut.png", "gone.png"]
    images = [{"id": i + 1, "width": 64, "height": 48, "file_name": name} for i, name in enumerate(names)]
    doc = coco([ann(10 + i, [1, 1, 5, 5], image_id=i + 1) for i in range(len(names))], images=images)
    path = write_json(tmp_path / "ann.json", doc)

    decoded = audit_file(path, images_dir=folder, decode=True, jobs=1)
    rows = {name: rows.tolist() for name, rows in decoded.img_hits.items()}
    assert rows["constant_image"] == [1]
    assert rows["size_mismatch"] == [2]
    assert rows["unreadable_image"] == [3, 4]
    assert rows["missing_image"] == [5]
    message = next(f.message for f in decoded.findings if f.check == "size_mismatch")
    assert "32x48" in message and "64x48" in message

    headers = audit_file(path, images_dir=folder, decode=False)
    rows = {name: rows.tolist() for name, rows in headers.img_hits.items()}
    # Headers only: a cut file and a flat image look fine, a junk file does not even open.
    assert rows["unreadable_image"] == [3] and rows["constant_image"] == [] and rows["size_mismatch"] == [2]

    code, _, _ = audit(capsys, path, "--images", folder, "--fix", tmp_path / "clean.json", "--quiet")
    assert code == 1
    clean = json.loads((tmp_path / "clean.json").read_text())
    assert [im["file_name"] for im in clean["images"]] == ["ok.png", "flat.png"]
    assert [a["image_id"] for a in clean["annotations"]] == [1, 2]
    assert audit(capsys, tmp_path / "clean.json", "--images", folder, "--quiet")[0] == 0


def test_images_decoded_in_parallel_match_serial(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = []
    for i in range(24):
        _png(folder / f"{i}.png", size=(16 + i % 3, 16), constant=i % 5 == 0, seed=i)
        images.append({"id": i, "width": 16, "height": 16, "file_name": f"{i}.png"})
    doc = coco([ann(i, [1, 1, 5, 5], image_id=i) for i in range(24)], images=images)
    path = write_json(tmp_path / "ann.json", doc)
    serial = audit_file(path, images_dir=folder, decode=True, jobs=1)
    parallel = audit_file(path, images_dir=folder, decode=True, jobs=2, progress=True)
    for name in ("constant_image", "size_mismatch"):
        assert serial.img_hits[name].tolist() == parallel.img_hits[name].tolist()
    assert serial.img_hits["constant_image"].tolist() == [0, 5, 10, 15, 20]
    assert parallel.image_facts.checked == 24


# -- no torch, no mindspore ------------------------------------------------------------------------------


def test_audit_imports_neither_torch_nor_mindspore(tmp_path):
    path = write_json(tmp_path / "ann.json", coco([ann(1, [1, 1, 0, 10])]))
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png")
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
sys.modules["mindspore"] = None
import nanguard.audit
from nanguard.cli import main
rc = main(["audit", {str(path)!r}, "--images", {str(folder)!r}, "--json", {str(tmp_path / 'o.json')!r}, "--fix", {str(tmp_path / 'c.json')!r}])
assert rc == 1, rc
loaded = [name for name in sys.modules if name.split(".")[0] in ("torch", "mindspore", "torchvision") and sys.modules[name] is not None]
assert not loaded, loaded
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


# -- real data -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_cli_on_real_coco_exits_0(split, tmp_path, capsys):
    ann_path = COCO_TINY / f"annotations/instances_{split}.json"
    if not ann_path.is_file():
        pytest.skip(f"coco_tiny not found at {COCO_TINY} (set NANGUARD_COCO_TINY)")
    code, out, _ = audit(capsys, ann_path, "--images", COCO_TINY / split, "--no-decode", "--json", tmp_path / "o.json")
    assert code == 0, out
    assert json.loads((tmp_path / "o.json").read_text())["summary"]["errors"] == 0
