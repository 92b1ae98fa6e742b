"""Hostile inputs found by review: each must end in exit 2 with one line naming the file / key and the
fix, or be handled (a damaged newest checkpoint, an image the model cannot take), never a traceback and
never a silently ignored setting. In process: `nanguard.cli.main([...])` and capsys."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, tiny_args
from nanguard.cli import main

# eval on the tiny run: the model's own sizes, few proposals
EVAL = ["--quiet", "eval.batch_size=8"]


def one_line_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes) -> Path:
    """A 2-step run with checkpoints after steps 1 and 2 (no final eval)."""
    out = tmp_path_factory.mktemp("run") / "run"
    code = main(["train", "--quiet", "--out", str(out), "--steps", "2", *tiny_args(shapes), "train.steps=2",
                 "train.checkpoint_every=1", "policy.snapshot_confirm=1", "train.eval_at_end=false"])
    assert code == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# -- 1. --detections never overwrites a file nanguard did not write ------------------------------------


def test_eval_beside_a_checkpoint_never_overwrites_a_users_eval_json(run_copy, tmp_path, capsys):
    """A checkpoint copied into a folder of one's own: eval.json goes beside it, never over the user's
    file of that name; the one eval wrote there, it replaces."""
    folder = tmp_path / "mine"
    folder.mkdir()
    checkpoint = sorted((run_copy / "checkpoints").glob("step_*.pt"))[-1]
    shutil.copy(checkpoint, folder / checkpoint.name)
    (folder / "eval.json").write_text('{"my": "notes"}')
    one_line_error(capsys, main(["eval", str(folder / checkpoint.name), *EVAL]), "eval.json", "nanguard did not write it")
    assert (folder / "eval.json").read_text() == '{"my": "notes"}'
    (folder / "eval.json").unlink()
    for _ in range(2):
        assert main(["eval", str(folder / checkpoint.name), *EVAL]) == 0
    assert json.loads((folder / "eval.json").read_text())["nanguard"] == "eval"


def test_detections_refuses_to_overwrite_the_annotation_file(run_copy, shapes, tmp_path, capsys):
    ann = tmp_path / "val.json"
    shutil.copy(shapes / "annotations" / "instances_val.json", ann)
    before = ann.read_bytes()
    code = main(["eval", str(run_copy), *EVAL, f"data.val_ann={ann}", f"data.val_images={shapes / 'val'}",
                 "--detections", str(ann)])
    one_line_error(capsys, code, str(ann), "exists", "another path")
    assert ann.read_bytes() == before
    other = tmp_path / "mine.txt"
    other.write_text("keep me")
    one_line_error(capsys, main(["eval", str(run_copy), *EVAL, "--detections", str(other)]), "mine.txt")
    assert other.read_text() == "keep me"


def test_detections_to_a_new_file(run_copy, tmp_path, capsys):
    out = tmp_path / "dets.json"
    assert main(["eval", str(run_copy), *EVAL, "--json", "--detections", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert isinstance(json.loads(out.read_text()), list) and metrics["step"] == 2


# -- 2. data.* overrides on eval take effect or are refused --------------------------------------------


def _other_split(shapes: Path, tmp_path: Path, keep: int) -> tuple[Path, Path]:
    """A copy of the validation annotations holding only its first `keep` images."""
    doc = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    doc["images"] = doc["images"][:keep]
    ids = {image["id"] for image in doc["images"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in ids]
    path = tmp_path / "other.json"
    path.write_text(json.dumps(doc))
    return path, shapes / "val"


def test_eval_val_ann_override_takes_effect_on_a_data_root_run(run_copy, shapes, tmp_path, capsys):
    ann, images = _other_split(shapes, tmp_path, keep=3)
    assert main(["eval", str(run_copy), *EVAL, "--json", f"data.val_ann={ann}", f"data.val_images={images}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 3 and metrics["val_ann"] == str(ann)
    assert json.loads((run_copy / "eval.json").read_text())["val_ann"] == str(ann)


def test_eval_data_root_override_takes_effect(run_copy, shapes, tmp_path, capsys):
    root = tmp_path / "moved"
    shutil.copytree(shapes, root)
    assert main(["eval", str(run_copy), *EVAL, "--json", f"data.root={root}"]) == 0
    assert json.loads(capsys.readouterr().out)["val_ann"] == str(root / "annotations" / "instances_val.json")


@pytest.mark.parametrize("overrides, needles", [
    (["data.val_ann=X.json"], ["data.val_ann without data.val_images"]),
    (["data.val_images=/tmp"], ["data.val_images without data.val_ann"]),
    (["data.root=ROOT", "data.val_ann=X.json", "data.val_images=/tmp"], ["data.root and data.val_ann"]),
    (["data.root=ROOT", "data.val_images=/tmp"], ["data.root and data.val_ann/data.val_images"]),
    (["data.root=ROOT", "data.val_ann=X.json"], ["data.root and data.val_ann/data.val_images"]),
    (["data.val_ann=null", "data.val_images=null"], ["need paths"]),
    (["data.train_ann=X.json"], ["data.train_ann", "no effect on eval"]),
    (["data.train_images=/tmp"], ["data.train_images", "no effect on eval"]),
    (["data.audit=off"], ["data.audit", "no effect on eval"]),
    (["data.hflip=false"], ["data.hflip"]),
    (["data.prefetch=4"], ["data.prefetch"]),
    (["data.synth_seed=3"], ["data.synth_seed", "nanguard synth"]),
    (["data.synth_images=10"], ["data.synth_images"]),
    (["data.cache=/tmp/c"], ["data.cache", "generated dataset"]),
    (["data.root=/no/such/folder"], ["data.root=/no/such/folder", "no such folder"]),
    (["data.root=null"], ["data.root=null"]),
    (["data.val_ann=/no/such.json", "data.val_images=/tmp"], ["/no/such.json"]),
    (["data.roots=x"], ["data.roots", "data.root"]),
    (["data={}"], ["data.* keys one by one"]),
    # not data.*: what eval would apply and never read
    (["train.lr=5"], ["train.lr", "no effect on eval"]),
    (["guard.clip_norm=1"], ["guard.clip_norm", "no effect on eval"]),
    (["seed=3"], ["seed", "no effect on eval"]),
    (["model.fpn_channels=8"], ["model.fpn_channels", "fixed by the checkpoint"]),
    (["model.box_batch_size_per_image=8"], ["model.box_batch_size_per_image", "no effect on eval"]),
])
def test_eval_data_overrides_that_cannot_take_effect_are_refused(run_copy, shapes, overrides, needles, capsys):
    overrides = [o.replace("ROOT", str(shapes)) for o in overrides]
    one_line_error(capsys, main(["eval", str(run_copy), *EVAL, *overrides]), *needles)
    assert not (run_copy / "eval.json").exists()


def test_eval_truncated_val_ann_is_one_line(run_copy, shapes, tmp_path, capsys):
    bad = tmp_path / "other.json"
    bad.write_text((shapes / "annotations" / "instances_val.json").read_text()[:200])
    code = main(["eval", str(run_copy), *EVAL, f"data.val_ann={bad}", f"data.val_images={shapes / 'val'}"])
    one_line_error(capsys, code, str(bad), "JSON")


# -- 3. eval on a run folder that cannot take eval.json -------------------------------------------------


def _fail_writes_under(monkeypatch, folder: Path, err: int) -> None:
    import tempfile

    import nanguard.fileio as fileio

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(err, "simulated")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)


def test_eval_prints_metrics_when_eval_json_cannot_be_written(run_copy, monkeypatch, capsys):
    _fail_writes_under(monkeypatch, run_copy, errno.EROFS)  # root ignores chmod: fail the write itself
    code = main(["eval", str(run_copy), *EVAL, "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert json.loads(captured.out)["step"] == 2  # the numbers were not thrown away
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(run_copy / "eval.json") in lines[0] and "read-only" in lines[0], captured.err
    assert not (run_copy / "eval.json").exists()
    assert not list(run_copy.glob(".eval.json.*"))


# -- 4. a damaged newest checkpoint falls back to the newest intact one ---------------------------------


def load_newest(run):
    """(path, state) of the newest checkpoint of `run` that loads, as eval and --resume find it."""
    from nanguard.backends.torch.backend import create
    from nanguard.run.checkpoints import Checkpoints

    checkpoints = Checkpoints(run, create("cpu"), keep=1)
    state = checkpoints.load_newest()
    return checkpoints.loaded_from, state


def save_checkpoint(run, state, keep):
    """What the trainer does at a checkpoint: write atomically, keep the newest `keep`."""
    from nanguard.backends.torch.backend import create
    from nanguard.run.checkpoints import Checkpoints

    return Checkpoints(run, create("cpu"), keep=keep).save(state["step"], state)


def test_eval_falls_back_from_a_damaged_newest_checkpoint(run_copy, capsys):
    from nanguard.run.checkpoints import list_checkpoints

    newest = run_copy / "checkpoints" / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert main(["eval", str(run_copy), *EVAL, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 1
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "step_00000002.pt" in warnings[0] and "truncated" in warnings[0]
    assert (run_copy / "checkpoints" / "step_00000002.pt.damaged").exists()  # set aside, never deleted
    assert [step for step, _ in list_checkpoints(run_copy)] == [1]
    path, state = load_newest(run_copy)
    assert path.name == "step_00000001.pt" and state["run"]["step"] == 1


def test_no_loadable_checkpoint_is_one_clean_line(run_copy, capsys):
    for path in (run_copy / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:500])
    code = main(["eval", str(run_copy), *EVAL])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "none of its 2 checkpoint(s) loads" in last and "truncated or not a torch file" in last
    assert "central directory" not in err  # torch's own text, cut mid-word, no more


def test_corrupt_checkpoint_message_is_whole(tmp_path, capsys):
    bad = tmp_path / "step_00000003.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    line = one_line_error(capsys, main(["eval", str(bad)]), str(bad), "truncated or not a torch file")
    assert "PytorchStreamReader" not in line


# -- 5. I/O errors while writing: a UserError, no temp file, the old file intact ------------------------


def test_atomic_write_turns_enospc_into_a_user_error(tmp_path):
    from nanguard.errors import UserError
    from nanguard.fileio import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "a.json", "old")

    def full_disk(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="no space left on device") as err:
        atomic_write(target, full_disk)
    assert str(target) in str(err.value)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_save_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    import torch

    from nanguard.backends.torch import checkpoint as ckpt
    from nanguard.errors import UserError

    state = {"step": 4, "model": {"w": torch.zeros(2)}}
    first = save_checkpoint(tmp_path, state, keep=3)
    before = first.read_bytes()

    def torch_save_on_full_disk(obj, handle):
        handle.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed ... unexpected pos 1024 vs 960")

    monkeypatch.setattr(ckpt.torch, "save", torch_save_on_full_disk)
    with pytest.raises(UserError, match="step_00000004.pt: cannot write it") as err:
        save_checkpoint(tmp_path, state, keep=3)
    assert "\n" not in str(err.value) and "disk full" in str(err.value)
    assert first.read_bytes() == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004.pt"]

    def permission_denied(obj, handle):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt.torch, "save", permission_denied)
    with pytest.raises(UserError, match="permission denied"):
        save_checkpoint(tmp_path, {**state, "step": 5}, keep=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004.pt"]


def test_read_only_folder_is_a_user_error(tmp_path, monkeypatch):
    from nanguard.errors import UserError
    from nanguard.fileio import atomic_write_json

    _fail_writes_under(monkeypatch, tmp_path, errno.EROFS)
    with pytest.raises(UserError, match="read-only file system"):
        atomic_write_json(tmp_path / "x.json", {"a": 1})


def test_a_bug_in_the_writer_is_not_hidden(tmp_path):
    from nanguard.fileio import atomic_write

    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x", lambda handle: 1 / 0)
    assert list(tmp_path.iterdir()) == []


# -- 9. model.weights that leave the backbone random are refused; the count is always said -------------


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    import torch

    from nanguard.backends.torch.model import build_model
    from nanguard.config import ModelConfig

    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(build_model(ModelConfig(min_size=64, max_size=64), 3).state_dict(), path)
    return path


def test_weights_of_another_architecture_exit_2(shapes, tiny_weights, tmp_path, capsys):
    code = main(["train", "--quiet", "--out", str(tmp_path / "r"), "--steps", "1", *tiny_args(shapes),
                 "model.name=resnet50_fpn", f"model.weights={tiny_weights}", "train.eval_at_end=false"])
    one_line_error(capsys, code, str(tiny_weights), "backbone tensors fit")


def test_weights_that_fit_say_how_many_loaded(tiny_weights, capsys):
    from nanguard.backends.torch.model import build_model
    from nanguard.config import ModelConfig

    build_model(ModelConfig(min_size=64, max_size=64, weights=str(tiny_weights)), 5)  # other class count
    err = capsys.readouterr().err
    assert "model.weights: loaded" in err and "left at random init" in err
    loaded, total = (int(w) for w in err.split("loaded ")[1].split(" tensors")[0].split(" of the model's "))
    assert 0 < total - loaded <= 4  # the classifier and box regressor for 5 classes stay random


# -- 7 and 10. malformed records: dropped with a finding (data.audit=drop), one line (data.audit=off) -------


def _variant(shapes: Path, tmp_path: Path, mutate) -> Path:
    root = tmp_path / "data"
    shutil.copytree(shapes, root)
    path = root / "annotations" / "instances_train.json"
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    return root


def _category_without_id(doc):
    doc["categories"][0].pop("id")


def _category_with_string_id(doc):
    doc["categories"][0]["id"] = "car"


def _image_without_id(doc):
    doc["images"][0].pop("id")


def _image_with_string_width(doc):
    doc["images"][0]["width"] = "abc"


def _parent_path(doc):
    doc["images"][0]["file_name"] = "../secret.png"


def _absolute_path(doc):
    doc["images"][0]["file_name"] = "/etc/hostname"


def _annotation_without_bbox(doc):
    doc["annotations"][0].pop("bbox")


def _annotation_not_an_object(doc):
    doc["annotations"][0] = 7


MALFORMED = {
    # mutate, the error with data.audit=off, the audit's finding
    "category_without_id": (_category_without_id, "categories[0] has no integer id", "malformed_category"),
    "category_with_string_id": (_category_with_string_id, "categories[0] has no integer id (got 'car')",
                                "malformed_category"),
    "image_without_id": (_image_without_id, "images[0] has no usable id", "malformed_image"),
    "image_with_string_width": (_image_with_string_width, "width='abc'", "malformed_image"),
    "file_name_with_dotdot": (_parent_path, "'../secret.png' is absolute or leaves the image folder", "unsafe_path"),
    "absolute_file_name": (_absolute_path, "'/etc/hostname' is absolute or leaves the image folder", "unsafe_path"),
    "annotation_without_bbox": (_annotation_without_bbox, "bbox=None, not a list of 4 numbers", "malformed_bbox"),
    "annotation_not_an_object": (_annotation_not_an_object, "annotations[0] is not a JSON object",
                                 "malformed_annotation"),
}


def _train(root: Path, out: Path, audit: str) -> int:
    return main(["train", "--quiet", "--out", str(out), "--steps", "1", *tiny_args(root), f"data.audit={audit}",
                 "train.steps=1", "train.eval_at_end=false"])


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_records(case, shapes, tmp_path, capsys):
    mutate, off_error, check = MALFORMED[case]
    root = _variant(shapes, tmp_path, mutate)
    ann = root / "annotations" / "instances_train.json"
    # data.audit=off: nothing has looked at the records; the index refuses them on one line
    one_line_error(capsys, _train(root, tmp_path / "off", "off"), str(ann), off_error, "--fix")
    # data.audit=drop: dropped with a finding, training runs
    assert _train(root, tmp_path / "drop", "drop") == 0, capsys.readouterr().err
    findings = json.loads((tmp_path / "drop" / "audit.json").read_text())["findings"]
    assert check in {f["check"] for f in findings}
    # nanguard audit: the finding, exit 1 (an error-level check)
    capsys.readouterr()
    assert main(["audit", str(ann), "--images", str(root / "train"), "--quiet", "--json", str(tmp_path / "a.json")]) == 1
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["summary"]["by_check"][check] >= 1


def test_unsafe_file_name_is_never_opened(shapes, tmp_path, monkeypatch):
    import nanguard.audit.images as images
    from nanguard.audit import audit_file

    root = _variant(shapes, tmp_path, _parent_path)
    (root / "secret.png").write_bytes((root / "train" / sorted(p.name for p in (root / "train").iterdir())[0]).read_bytes())
    opened = []
    real = images.inspect_file
    monkeypatch.setattr(images, "inspect_file", lambda path, decode: opened.append(path) or real(path, decode))
    report = audit_file(root / "annotations" / "instances_train.json", images_dir=root / "train", jobs=1)
    assert not any("secret" in path for path in opened)
    finding = next(f for f in report.findings if f.check == "unsafe_path")
    assert finding.severity == "error" and "../secret.png" in finding.message


def test_string_image_ids(shapes, tmp_path, capsys):
    def string_ids(doc):
        for image in doc["images"]:
            image["id"] = f"img{image['id']}"
        for annotation in doc["annotations"]:
            annotation["image_id"] = f"img{annotation['image_id']}"

    root = _variant(shapes, tmp_path, string_ids)
    ann = root / "annotations" / "instances_train.json"
    assert _train(root, tmp_path / "off", "off") == 0  # the index takes any hashable id, as pycocotools does
    # the audit's columns are integers: every image is dropped, and the message says why (not "has no images")
    line = one_line_error(capsys, _train(root, tmp_path / "drop", "drop"), str(ann), "dropped all 24 images",
                          "'img")
    assert "is a string" in line and "has no images" not in line


def test_all_crowd_annotations_are_a_finding(shapes, tmp_path, capsys):
    def all_crowd(doc):
        for annotation in doc["annotations"]:
            annotation["iscrowd"] = 1

    root = _variant(shapes, tmp_path, all_crowd)
    ann = root / "annotations" / "instances_train.json"
    assert main(["audit", str(ann), "--quiet", "--json", str(tmp_path / "a.json")]) == 0  # a warning
    report = json.loads((tmp_path / "a.json").read_text())
    annotated = len({a["image_id"] for a in json.loads(ann.read_text())["annotations"]})
    assert report["summary"]["by_check"]["crowd_only_image"] == annotated > 0
    finding = next(f for f in report["findings"] if f["check"] == "crowd_only_image")
    assert finding["severity"] == "warning" and "iscrowd" in finding["message"]


def test_huge_coordinates_are_printed_compactly(tmp_path, capsys):
    doc = {"images": [{"id": 1, "width": 100, "height": 80, "file_name": "a.png"}],
           "categories": [{"id": 1, "name": "x"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1e308, 1, 2, 3]}]}
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(doc))
    assert main(["audit", str(ann), "--quiet", "--json", str(tmp_path / "r.json")]) == 1
    message = json.loads((tmp_path / "r.json").read_text())["findings"][0]["message"]
    assert "1e+308" in message and "0000000000" not in message


# -- 10. 16-bit images: scaled, not saturated; the audit warns ------------------------------------------


def test_16_bit_png_is_scaled_and_reported(tmp_path):
    import numpy as np
    from PIL import Image

    from nanguard.audit import audit_file
    from nanguard.data.loader import load_image

    pixels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    (tmp_path / "img").mkdir()
    Image.fromarray(pixels).save(tmp_path / "img" / "a.png")
    image = load_image(tmp_path / "img" / "a.png")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255 and abs(int(image[32, 0, 0]) - 128) <= 1
    assert (image == 255).mean() < 0.01  # convert("RGB") made 99.6 % of it white
    doc = {"images": [{"id": 1, "width": 64, "height": 64, "file_name": "a.png"}], "categories": [{"id": 1}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20]}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    for decode in (False, True):
        report = audit_file(tmp_path / "a.json", images_dir=tmp_path / "img", decode=decode, jobs=1)
        finding = next(f for f in report.findings if f.check == "high_bit_depth")
        assert finding.severity == "warning" and "I;16" in finding.message


# -- 8. an image the model's resize cannot take is skipped in evaluation, not a crash ------------------


def test_eval_skips_an_image_too_thin_to_resize(run_copy, shapes, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    images = tmp_path / "val"
    shutil.copytree(shapes / "val", images)
    Image.fromarray(np.full((20, 20000, 3), 90, dtype=np.uint8)).save(images / "wide.png")
    doc = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    doc["images"].append({"id": 999, "file_name": "wide.png", "width": 20000, "height": 20})
    doc["annotations"].append({"id": 9999, "image_id": 999, "category_id": doc["categories"][0]["id"],
                               "bbox": [10, 2, 100, 10], "area": 1000, "iscrowd": 0})
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(doc))
    code = main(["eval", str(run_copy), "--json", f"data.val_ann={ann}", f"data.val_images={images}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads(captured.out)
    assert metrics["skipped_images"] == 1 and metrics["images"] == 9
    warning = [line for line in captured.err.splitlines() if "wide.png" in line]
    assert len(warning) == 1 and "20000x20" in warning[0] and "skipped" in warning[0]


def test_the_validation_split_never_costs_the_training(shapes, tmp_path, capsys, fake_backend):
    """A missing validation image is refused before step 0 (not found after the whole training); one
    present but truncated is left out of the evaluation with a warning, and the run still ends with its
    final.json. A training split with no annotation at all is refused: nothing to learn."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    first, second = sorted((data / "val").iterdir())[:2]
    second.unlink()
    args = ["train", "--quiet", f"data.root={data}", "model.min_size=64", "model.max_size=64", "train.steps=2",
            "train.batch_size=2"]
    one_line_error(capsys, main([*args, "--out", str(tmp_path / "a")]), second.name, "is not a file", "1 of 8 are missing")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # no step was trained
    shutil.copy(shapes / "val" / second.name, second)
    first.write_bytes(first.read_bytes()[:100])  # the header, then nothing
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert first.name in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["skipped_images"] == 1
    assert json.loads((tmp_path / "b" / "final.json").read_text())["status"] == "completed"
    doc = json.loads((data / "annotations" / "instances_train.json").read_text())
    (data / "annotations" / "instances_train.json").write_text(json.dumps({**doc, "annotations": []}))
    one_line_error(capsys, main([*args, "--out", str(tmp_path / "c")]), "no annotation is left to train on")


def test_append_jsonl_on_a_full_disk(tmp_path, monkeypatch):
    import builtins

    import nanguard.fileio as fileio
    from nanguard.errors import UserError

    real_open = builtins.open

    class FullDisk:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "open", FullDisk, raising=False)
    with pytest.raises(UserError, match="metrics.jsonl: cannot append to it \\(no space left on device\\)"):
        fileio.append_jsonl(tmp_path / "metrics.jsonl", {"step": 1})


def test_eval_refuses_model_weights(run_copy, capsys):
    one_line_error(capsys, main(["eval", str(run_copy), *EVAL, "model.weights=/x.pt"]), "model.weights",
                   "checkpoint")


def test_a_second_damaged_copy_does_not_replace_the_first(run_copy, capsys):
    folder = run_copy / "checkpoints"
    (folder / "step_00000002.pt.damaged").write_bytes(b"first damaged copy")
    newest = folder / "step_00000002.pt"
    newest.write_bytes(b"second damaged copy")
    path, _ = load_newest(run_copy)
    assert path.name == "step_00000001.pt"
    assert (folder / "step_00000002.pt.damaged").read_bytes() == b"first damaged copy"
    assert (folder / "step_00000002.pt.damaged.1").read_bytes() == b"second damaged copy"
    assert "step_00000002.pt.damaged.1" in capsys.readouterr().err


def test_real_torch_save_on_a_full_disk_names_the_cause(tmp_path, monkeypatch):
    """torch.save swallows the OSError of a full disk and raises "unexpected pos ..."; the cause survives."""
    import os

    import torch

    import nanguard.fileio as fileio
    from nanguard.errors import UserError

    real_fdopen = os.fdopen

    class FillsUp:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    with pytest.raises(UserError, match=r"step_00000007.pt: cannot write it \(no space left on device\)"):
        save_checkpoint(tmp_path, {"step": 7, "model": {"w": torch.zeros(100_000)}}, keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


# -- the validation split is not audited: eval refuses what it cannot score, takes string ids ----------


def _val_variant(shapes: Path, tmp_path: Path, mutate) -> Path:
    ann = tmp_path / "val.json"
    doc = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    mutate(doc)
    ann.write_text(json.dumps(doc))
    return ann


@pytest.mark.parametrize("mutate, needle", [
    (_annotation_without_bbox, "annotations[0] (id"),
    (_annotation_not_an_object, "annotations[0] is not a JSON object"),
    (lambda doc: doc["annotations"][0].pop("id"), "annotations[0] has no usable id"),
    (lambda doc: doc["annotations"][0].update(bbox="x"), "bbox='x'"),
])
def test_eval_refuses_malformed_validation_records(run_copy, shapes, tmp_path, mutate, needle, capsys):
    ann = _val_variant(shapes, tmp_path, mutate)
    code = main(["eval", str(run_copy), *EVAL, f"data.val_ann={ann}", f"data.val_images={shapes / 'val'}"])
    one_line_error(capsys, code, str(ann), needle)


def test_eval_with_string_image_ids_scores_the_same(run_copy, shapes, tmp_path, capsys):
    def string_ids(doc):
        for image in doc["images"]:
            image["id"] = f"img{image['id']}"
        for annotation in doc["annotations"]:
            annotation["image_id"] = f"img{annotation['image_id']}"

    images = f"data.val_images={shapes / 'val'}"
    assert main(["eval", str(run_copy), *EVAL, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    ann = _val_variant(shapes, tmp_path, string_ids)
    assert main(["eval", str(run_copy), *EVAL, "--json", f"data.val_ann={ann}", images]) == 0
    renamed = json.loads(capsys.readouterr().out)
    assert renamed["mAP"] == plain["mAP"] and renamed["mAP50"] == plain["mAP50"] and renamed["images"] == 8


def test_atomically_written_files_get_the_mode_open_would_give(tmp_path):
    """mkstemp makes 0600 files: a run's config, checkpoints and report must be readable by whoever
    may read the user's other files (the umask decides, as for any new file)."""
    import os

    from nanguard.fileio import atomic_write_text

    old = os.umask(0o027)
    try:
        import importlib

        import nanguard.fileio

        importlib.reload(nanguard.fileio)
        written = nanguard.fileio.atomic_write_text(tmp_path / "final.json", "{}")
        assert written.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
        importlib.reload(nanguard.fileio)
    assert atomic_write_text(tmp_path / "b.json", "{}").stat().st_mode & 0o777 == 0o666 & ~old
