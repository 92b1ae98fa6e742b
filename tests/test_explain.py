"""Explaining incidents end to end on the CPU: each verdict from a real replay in training
(explain.auto=all), the same verdicts offline (`nanguard diagnose`), and a replay that leaves the run
exactly as it would have been without it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from nanguard.cli import main

FAULTS = ["zero_box@1", "nan_input@3", "grad_nan@6", "loss_nan@9:component=loss_box_reg", "weight_bitflip@11"]


def train(run: Path, data: Path, *extra: str) -> int:
    return main(["train", "--quiet", "--out", str(run), *tiny_args(data), "train.eval_at_end=false",
                 "data.audit=off", "explain.auto=first", *extra])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def diagnosed(run: Path) -> dict[int, dict]:
    return {r["step"]: r["diagnosis"] for r in lines(run / "incidents.jsonl") if r.get("diagnosis")}


@pytest.fixture(scope="module")
def faults_run(shapes, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("explain") / "run"
    args = ["train.steps=14", "explain.auto=all", "policy.snapshot_every=4", "policy.snapshot_healthy=1",
            "policy.snapshot_confirm=1"]
    assert train(run, shapes, *args, *[a for f in FAULTS for a in ("--inject", f)]) == 0
    return run


def injected(run: Path, kind: str) -> dict:
    return next(r for r in lines(run / "injections.jsonl") if r["kind"] == kind)


def test_a_zero_box_is_a_bad_annotation_naming_it(faults_run):
    record = next(r for r in lines(faults_run / "incidents.jsonl") if r["step"] == 1)
    dropped = record["invalid_targets"][0]
    d = record["diagnosis"]
    assert (d["verdict"], d["image_ids"], d["annotation_ids"]) == ("bad_annotation", [dropped["image_id"]],
                                                                   [dropped["annotation_id"]])
    assert injected(faults_run, "zero_box")["detail"]["image_id"] == dropped["image_id"]


def test_nan_pixels_are_a_bad_image_naming_only_that_image(faults_run):
    d = diagnosed(faults_run)[3]
    assert d["verdict"] == "bad_image" and d["reproduced"] is True and d["phase"] == "data"
    assert d["image_ids"] == [injected(faults_run, "nan_input")["detail"]["image_id"]]


def test_a_gradient_fault_that_does_not_come_back_is_transient(faults_run):
    d = diagnosed(faults_run)[6]
    assert d["verdict"] == "transient" and d["reproduced"] is False


def test_a_loss_that_makes_nan_is_a_numerical_op_in_that_component(faults_run):
    d = diagnosed(faults_run)[9]
    assert (d["verdict"], d["loss_component"], d["first_op"], d["phase"]) == ("numerical_op", "loss_box_reg", "mul",
                                                                             "forward")


def test_a_flipped_bit_is_corrupted_weights_naming_the_parameter(faults_run):
    flip = injected(faults_run, "weight_bitflip")
    bad = [d for step, d in diagnosed(faults_run).items() if step > flip["step"]]
    assert bad and bad[0]["verdict"] == "corrupted_weights"
    assert bad[0]["module"].endswith((".weight", ".bias"))


def test_each_diagnosed_incident_keeps_its_evidence_folder(faults_run):
    for step in diagnosed(faults_run):
        folder = faults_run / "incidents" / str(step)
        assert json.loads((folder / "incident.json").read_text())["step"] == step
        assert json.loads((folder / "diagnosis.json").read_text())["verdict"] == diagnosed(faults_run)[step]["verdict"]
    assert (faults_run / "incidents" / "3" / "replay.pt").is_file()
    assert not (faults_run / "incidents" / "1" / "replay.pt").exists()  # a dropped box needs no replay
    summary = json.loads((faults_run / "final.json").read_text())["diagnoses"]
    assert summary["bad_image"] == 1 and summary["transient"] == 1


def test_diagnose_offline_gives_the_same_verdicts(faults_run, capsys):
    capsys.readouterr()
    assert main(["diagnose", str(faults_run), "--json"]) == 0
    offline = {d["step"]: d for d in json.loads(capsys.readouterr().out)}
    for step, d in diagnosed(faults_run).items():
        assert offline[step]["verdict"] == d["verdict"] and offline[step]["image_ids"] == d["image_ids"]


def test_diagnose_refuses_a_missing_incident_and_a_damaged_replay(faults_run, tmp_path, capsys):
    assert main(["diagnose", str(faults_run), "--incident", "999"]) == 2
    assert "no incident at step 999" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(faults_run, copy)
    (copy / "incidents" / "3" / "replay.pt").write_bytes(b"\x00" * 100)
    assert main(["diagnose", str(copy), "--incident", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "replay.pt" in err[0] and "damaged" in err[0]
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2


def test_diagnose_names_each_damaged_record_and_replay_and_diagnoses_the_rest(faults_run, tmp_path, capsys):
    """A replay.pt without its model, one of another class count, incident lines without a step: one
    line each on stderr, exit 2, and every other incident still diagnosed."""
    copy = tmp_path / "copy"
    shutil.copytree(faults_run, copy)
    replays = sorted(int(p.parent.name) for p in (copy / "incidents").glob("*/replay.pt"))
    assert len(replays) >= 3, replays
    first, second = (copy / "incidents" / str(step) / "replay.pt" for step in replays[:2])
    bundle = torch.load(first, weights_only=True)
    torch.save({k: v for k, v in bundle.items() if k != "model"}, first)
    torch.save({**torch.load(second, weights_only=True), "num_classes": 7}, second)
    with open(copy / "incidents.jsonl", "a") as handle:
        handle.write('{"kind": "nonfinite_loss"}\n{"step": "seven"}\n[1, 2]\n')
    capsys.readouterr()
    assert main(["diagnose", str(copy)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert sum("has no step" in line for line in err) == 3, err
    assert any(f"step {replays[0]}: not diagnosed" in line and "without a usable model" in line for line in err), err
    assert any(f"step {replays[1]}: not diagnosed" in line and "do not fit this run's model" in line for line in err), err
    assert "Traceback" not in captured.err and len(err) == 5, err
    assert f"step {replays[2]} diagnosed:" in captured.out  # the rest still diagnosed


def test_the_advice_for_an_incident_without_replay_data_says_what_stood_in_the_way():
    from nanguard.config import load_config
    from nanguard.explain.diagnose import _why_unkept

    record = {"step": 5, "kind": "nonfinite_loss", "kinds": ["nonfinite_loss"], "bad_ranks": []}
    assert "raise explain.keep" in _why_unkept(record, load_config("demo"), True)[1]
    assert "raise explain.keep" not in _why_unkept(record, load_config("demo", ["explain.keep=0"]), True)[1]
    assert "backend=torch" in _why_unkept(record, load_config("demo", ["backend=mindspore"]), False)[1]
    # a distributed run keeps replay data as one process does (the bad rank's, written by rank 0)
    assert "raise explain.keep" in _why_unkept({**record, "bad_ranks": [1]}, load_config("demo"), True)[1]


def test_an_lr_blow_up_is_lr_divergence(shapes, tmp_path):
    run = tmp_path / "lr"
    assert train(run, shapes, "train.steps=10", "--inject", "lr_spike@6:factor=1000") == 0
    first = lines(run / "incidents.jsonl")[0]
    assert first["step"] == 7 and first["diagnosis"]["verdict"] == "lr_divergence"
    assert "lower train.lr" in first["diagnosis"]["advice"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(newest, weights_only=True)["backend"]["model"]


def test_explaining_changes_nothing_in_the_run(shapes, tmp_path):
    """The replay runs in the middle of training: the run's weights, RNG and data must not notice."""
    args = ["train.steps=9", "--inject", "grad_nan@3", "--inject", "nan_input@5"]
    assert train(tmp_path / "on", shapes, *args, "explain.auto=all") == 0
    assert train(tmp_path / "off", shapes, *args, "explain.auto=off", "explain.keep=0") == 0
    assert len(diagnosed(tmp_path / "on")) == 2 and not diagnosed(tmp_path / "off")
    on, off = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert all(torch.equal(on[name], off[name]) for name in off)
    assert not (tmp_path / "off" / "incidents").exists()


def test_a_nan_coordinate_in_a_real_coco_annotation_is_named(coco_tiny, tmp_path):
    ann = json.loads((coco_tiny / "annotations" / "instances_train2017.json").read_text())
    target = next(a for a in ann["annotations"] if not a.get("iscrowd"))
    target["bbox"][2] = math.nan
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ann))  # writes NaN, as a broken exporter does
    run = tmp_path / "run"
    val = coco_tiny / "annotations" / "instances_val2017.json"
    assert main(["train", "--quiet", "--out", str(run), f"data.train_ann={path}",
                 f"data.train_images={coco_tiny / 'train2017'}", f"data.val_ann={val}",
                 f"data.val_images={coco_tiny / 'val2017'}", "data.audit=off", "train.eval_at_end=false",
                 "train.steps=40", "train.batch_size=2", "model.min_size=64", "model.max_size=96",
                 "train.threads=1"]) == 0
    found = [r["diagnosis"] for r in lines(run / "incidents.jsonl") if r.get("diagnosis")]
    assert found and found[0]["verdict"] == "bad_annotation"
    assert found[0]["annotation_ids"] == [target["id"]] and found[0]["image_ids"] == [target["image_id"]]


def test_an_fp16_overflow_is_finite_in_float32(shapes, tmp_path):
    run = tmp_path / "fp16"
    assert train(run, shapes, "train.steps=6", "train.amp=fp16", "policy.min_loss_scale=32768", "explain.auto=all",
                 "--inject", "fp16_overflow@2:count=2") == 0
    found = {r["step"]: r["diagnosis"] for r in lines(run / "incidents.jsonl")}
    assert found[2]["verdict"] == "fp16_overflow" and found[2]["reproduced"] is True
    assert any("float32 is healthy" in e for e in found[2]["evidence"])
    assert {d["verdict"] for d in found.values()} == {"fp16_overflow"}  # the scale stays low after: still fp16's


def test_diagnose_does_not_write_into_a_run_another_process_holds(faults_run, tmp_path, capsys):
    from nanguard.run.folder import RunFolder

    copy = tmp_path / "held"
    shutil.copytree(faults_run, copy)
    written = copy / "incidents" / "6" / "diagnosis.json"
    written.unlink()
    with RunFolder.open(copy):  # as a training process holds it
        assert main(["diagnose", str(copy), "--incident", "6"]) == 0
    captured = capsys.readouterr()
    assert "transient" in captured.out and "without writing" in captured.err
    assert not written.exists()
    assert main(["diagnose", str(copy), "--incident", "6"]) == 0 and written.exists()
