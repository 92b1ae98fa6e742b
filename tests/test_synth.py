"""nanguard synth: deterministic bytes, valid COCO, argument errors, skip-if-complete."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from nanguard.cli import main
from nanguard.data import synth
from nanguard.errors import UserError

SMALL = {"images": 12, "val_images": 4, "size": 64, "classes": 8, "progress": False}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.generate(out, **SMALL)
    return out


def test_same_seed_same_bytes_in_any_number_of_processes(small, tmp_path):
    again = tmp_path / "again"
    synth.generate(again, **SMALL, workers=2)
    assert tree_hashes(again) == tree_hashes(small)
    assert len(tree_hashes(small)) == 12 + 4 + 2


def test_other_seed_other_bytes(small, tmp_path):
    other = tmp_path / "other"
    synth.generate(other, **{**SMALL, "seed": 1})
    ours, theirs = tree_hashes(small), tree_hashes(other)
    assert ours.keys() == theirs.keys()
    assert all(ours[name] != theirs[name] for name in ours)


def test_train_and_val_streams_differ(small):
    assert tree_hashes(small)["train/000000000001.png"] != tree_hashes(small)["val/000000000001.png"]


@pytest.mark.parametrize("split, count", [("train", 12), ("val", 4)])
def test_valid_coco(small, split, count):
    from PIL import Image

    coco = load(small, split)
    assert coco["info"]["seed"] == 0 and coco["info"]["generator"] == synth.GENERATOR
    assert [c["id"] for c in coco["categories"]] == list(range(1, 9))
    assert [c["name"] for c in coco["categories"]] == list(synth.SHAPES)
    assert {c["supercategory"] for c in coco["categories"]} == {"shape"}
    images = {image["id"]: image for image in coco["images"]}
    assert len(images) == count == len(list((small / split).glob("*.png")))
    for image in images.values():
        with Image.open(small / split / image["file_name"]) as decoded:
            assert decoded.size == (image["width"], image["height"]) == (64, 64)
            assert decoded.mode == "RGB"
    ids = [a["id"] for a in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    per_image = {image_id: 0 for image_id in images}
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert all(isinstance(v, float) for v in (x, y, w, h))
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert 0 < annotation["area"] <= (w + 0.02) * (h + 0.02)  # box and area rounded to 0.01
        assert annotation["iscrowd"] == 0 and 1 <= annotation["category_id"] <= 8
        outline = annotation["segmentation"][0]
        assert len(outline) >= 6 and len(outline) % 2 == 0
        assert min(outline[0::2]) == pytest.approx(x, abs=0.02)
        assert max(outline[1::2]) == pytest.approx(y + h, abs=0.02)
        per_image[annotation["image_id"]] += 1
    assert all(1 <= n <= synth.MAX_OBJECTS for n in per_image.values())


def test_box_is_tight_around_the_drawn_pixels():
    import numpy as np

    centres = np.arange(128) + 0.5
    for index in range(1, 6):
        _, shapes = synth.render(3, 0, index, 128, 8)
        for shape in shapes:
            x0, y0, x1, y1 = shape.box
            assert x1 - x0 >= 10 and y1 - y0 >= 10  # the learnable minimum at 128 px
            rows, cols = np.nonzero(synth._inside(shape.outline, centres, centres))
            # pixel i spans [i, i+1): drawn pixel centres lie in the box and come close to each edge
            # (a sharp tip, as a star's, can fall between pixel centres: up to ~3 px)
            assert x0 <= cols.min() + 0.5 < x0 + 3 and x1 - 3 < cols.max() + 0.5 <= x1
            assert y0 <= rows.min() + 0.5 < y0 + 3 and y1 - 3 < rows.max() + 0.5 <= y1


def test_no_torch_import(tmp_path):
    import subprocess

    code = ("import sys; sys.modules['torch'] = None\n"
            "from nanguard.cli import main\n"
            f"sys.exit(main(['synth', {str(tmp_path / 'ds')!r}, '--images', '2', '--val-images', '1', "
            "'--size', '32']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_progress_bar_does_not_change_the_bytes(small, tmp_path):
    synth.generate(tmp_path / "ds", **{**SMALL, "progress": True})
    assert tree_hashes(tmp_path / "ds") == tree_hashes(small)


@pytest.mark.parametrize("change, flag", [({"images": 0}, "--images"), ({"size": 16}, "--size"),
                                          ({"classes": 0}, "--classes"), ({"classes": 9}, "--classes"),
                                          ({"val_images": -1}, "--val-images"), ({"seed": -3}, "--seed"),
                                          ({"size": 100_000}, "--size"), ({"images": 10**9}, "--images")])
def test_bad_arguments(tmp_path, change, flag):
    with pytest.raises(UserError, match=flag):
        synth.generate(tmp_path / "ds", **{**SMALL, **change})
    assert not (tmp_path / "ds").exists()


def test_refuses_a_file_as_out(tmp_path):
    (tmp_path / "ds").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        synth.generate(tmp_path / "ds", **SMALL)


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a synth dataset"):
        synth.generate(tmp_path, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_skips_a_complete_dataset_and_redoes_an_interrupted_one(small, tmp_path):
    out = tmp_path / "ds"
    first = synth.generate(out, **SMALL)
    assert first["skipped"] is False
    second = synth.generate(out, **SMALL)
    assert second["skipped"] is True and second["train_objects"] == first["train_objects"]
    # An interrupted run: images there, json missing. It is regenerated, not skipped.
    (out / "annotations" / "instances_val.json").unlink()
    (out / "train" / "000000000003.png").write_bytes(b"torn")
    assert synth.generate(out, **SMALL)["skipped"] is False
    assert tree_hashes(out) == tree_hashes(small)


def test_new_parameters_regenerate_without_stale_files(small, tmp_path):
    out = tmp_path / "ds"
    synth.generate(out, **SMALL)
    summary = synth.generate(out, **{**SMALL, "images": 5, "seed": 2})
    assert summary["skipped"] is False
    assert len(list((out / "train").glob("*.png"))) == 5
    assert load(out, "train")["info"]["images"] == 5


def test_cli(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["synth", str(out), "--images", "3", "--val-images", "2", "--size", "48", "--classes", "2",
            "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "3 train + 2 val images" in printed
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["synth", str(tmp_path / "bad"), "--size", "8", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "--size" in error and "\n" not in error.strip()


def test_the_default_dataset_is_generated_by_one_process_at_a_time(tmp_path):
    """Two processes (the ranks of a run) that need the default dataset: the second waits for the
    first's lock, then finds the dataset complete; neither writes while the other does."""
    import fcntl
    import multiprocessing
    import time

    from nanguard.config import load_config
    from nanguard.run.data import resolve_data

    cfg = load_config("demo", [f"data.cache={tmp_path / 'cache'}", "data.synth_images=6", "data.synth_val_images=2",
                               "data.synth_size=32"])
    folder = tmp_path / "cache" / "synth-6-2-32px-3c-seed0"
    (tmp_path / "cache").mkdir()
    with open(tmp_path / "cache" / f".{folder.name}.lock", "a+b") as held:  # as a first rank holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        second = multiprocessing.get_context("spawn").Process(target=resolve_data, args=(cfg, True))
        second.start()
        time.sleep(1.5)
        assert second.is_alive() and not folder.exists()  # waiting, nothing written
    second.join(60)
    assert second.exitcode == 0
    paths = resolve_data(cfg, True)
    assert paths.train_ann.is_file() and len(list(paths.train_images.iterdir())) == 6
