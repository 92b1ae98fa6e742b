"""`train.tensorboard=true`: the metrics and incidents also go to RUN_DIR/tensorboard, once per step
across a resume, written without torch or TensorFlow and read back with TensorBoard's own reader;
without the package it is a user error before anything is written."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys

import pytest
from conftest import REPO

from nanguard.cli import main as nanguard

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ARGS = ["model.min_size=64", "model.max_size=64", "train.batch_size=2", "train.warmup_steps=2", "train.log_every=2",
        "train.eval_at_end=false", "train.checkpoint_every=4", "train.tensorboard=true"]


def scalars(run, tag):
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return events, [(s.step, s.value) for s in events.Scalars(tag)]


def test_metrics_and_incidents_reach_tensorboard_once_per_step_across_a_resume(shapes, tmp_path):
    run = tmp_path / "run"
    assert nanguard(["train", "--quiet", "--out", str(run), f"data.root={shapes}", "train.steps=10", *ARGS,
                     "--inject", "grad_nan@3", "--steps", "6"]) == 0
    (run / "checkpoints" / "step_00000006.pt").unlink()  # as if killed before its last save: steps are run and logged again
    assert nanguard(["train", "--quiet", "--resume", str(run)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events, total = scalars(run, "loss/total_loss")
    steps = [step for step, _ in total]
    assert sorted(set(steps)) == [m["step"] for m in metrics if m["total_loss"] is not None]
    assert len(steps) == len(set(steps))  # what the first process logged past its checkpoint is purged
    assert {f"train/{k}" for k in ("lr", "grad_norm", "images_per_second")} <= set(events.Tags()["scalars"])
    assert [s.step for s in events.Scalars("incidents/bad_step")] == [3]
    assert "nonfinite_grad" in events.Tensors("incidents/text_summary")[0].tensor_proto.string_val[0].decode()


def test_asking_for_tensorboard_without_the_package_is_refused_before_anything_is_written(shapes, tmp_path,
                                                                                       monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    run = tmp_path / "run"
    assert nanguard(["train", "--quiet", "--out", str(run), f"data.root={shapes}", "train.steps=2", *ARGS]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not run.exists()


WRITE = """
import sys
sys.modules["torch"] = None
sys.modules["tensorflow"] = None
from pathlib import Path
from nanguard.run.tensorboard import TensorBoard
run, start, stop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
board = TensorBoard(run, start)
for step in range(start, stop):
    board.metrics(step, {"step": step, "total_loss": float(step), "lr": 0.1})
board.incident(stop - 1, {"kinds": ["nonfinite_loss"], "action": "skip"})
board.close()
"""


def test_the_event_writer_needs_no_framework_and_a_restart_replaces_the_steps_past_it(tmp_path):
    for start, stop in ((0, 6), (3, 5)):  # the second process resumes at step 3
        result = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path), str(start), str(stop)],
                                capture_output=True, text=True, timeout=120,
                                env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
    events, total = scalars(tmp_path, "loss/total_loss")
    assert total == [(s, float(s)) for s in range(5)]
    assert [s.step for s in events.Scalars("train/lr")] == list(range(5))
    assert [s.step for s in events.Scalars("incidents/bad_step")] == [4]  # the first process's step 5 is purged
    assert "nonfinite_loss" in events.Tensors("incidents/text_summary")[0].tensor_proto.string_val[0].decode()
