"""`nanguard train backend=mindspore`, through the command line only: the same run folder, incidents,
checkpoints (MindSpore's .ckpt), exact resume after kill -9, `nanguard eval`, and each applicable inject
kind. The runs share a compile cache (NANGUARD_MINDSPORE_COMPILE_CACHE): the runs of one config compile
the train step once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

pytest.importorskip("mindspore", reason="mindspore is not installed (make install installs it)")

ARGS = ["backend=mindspore", "model.min_size=64", "model.max_size=64", "model.rpn_pre_nms_top_n_train=100",
        "model.rpn_post_nms_top_n_train=50", "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=30",
        "model.box_batch_size_per_image=32", "train.batch_size=2", "train.warmup_steps=2", "train.log_every=1",
        "data.prefetch=1", "eval.batch_size=8", "explain.auto=off"]


# Every process here runs `nanguard` through this one script (MindSpore's compile cache is per entry
# script), which can also make it SIGKILL itself halfway through writing its first checkpoint.
CHILD = """
import os, signal, sys
if os.environ.get("TORN_WRITE"):
    import mindspore as ms
    real_save = ms.save_checkpoint
    def torn_save(entries, path, *a, **k):
        real_save(entries, path, *a, **k)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    ms.save_checkpoint = torn_save
from nanguard.cli import main
sys.exit(main(sys.argv[1:]))
"""
CACHE: Path | None = None
SCRIPT: Path | None = None


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    global CACHE, SCRIPT
    CACHE = tmp_path_factory.mktemp("ms_compile_cache")
    SCRIPT = CACHE.parent / "nanguard_child.py"
    SCRIPT.write_text(CHILD)
    return CACHE


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "NANGUARD_MINDSPORE_COMPILE_CACHE": str(CACHE), **extra}


def command(*argv: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *argv]


def nanguard(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(*argv), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def train(run: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    done = nanguard("train", "--quiet", "--out", str(run), f"data.root={data}", *ARGS, *extra)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def arrays(path: Path) -> dict[str, np.ndarray]:
    from nanguard.backends.mindspore.checkpoint import load_checkpoint

    return load_checkpoint(path)[0]


# the config of most runs here (their train step compiles once: the compile cache's key leaves out
# what no graph holds, such as the policy and which faults are injected). The weights are checked
# outside the step (guard.param_check_every: 10 by default) on the grid and before every snapshot.
GRAPH = ["train.steps=14"]
COMMON = [*GRAPH, "train.checkpoint_every=2", "policy.snapshot_confirm=1", "train.keep_checkpoints=1",
          "train.eval_at_end=false", "--inject", "nan_input@2"]


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory) -> Path:
    """14 steps with a NaN image at step 2, checkpoints every 2: the run the killed runs of this config
    are compared with (evaluated by `nanguard eval`, the same predict path as train.eval_at_end)."""
    run = tmp_path_factory.mktemp("ms") / "straight"
    train(run, shapes, *COMMON)
    return run


def test_a_mindspore_run_skips_the_bad_step_and_ends_like_a_torch_run(straight):
    final = json.loads((straight / "final.json").read_text())
    assert final["status"] == "completed" and final["weights_finite"] and final["skipped_steps"] == 1
    runtime = final["runtime"]  # what the process ran under: the oneDNN cap, Ascend's overflow mode
    assert runtime["backend"] == "mindspore" and runtime["mode"] == "graph" and runtime["device_target"] == "CPU"
    assert "onednn_max_cpu_isa" in runtime and "INFNAN_MODE" in runtime["ascend_overflow_mode"]
    assert [(r["step"], r["action"], r["applied"]) for r in lines(straight / "incidents.jsonl")] == [(2, "skip", False)]
    injected = lines(straight / "injections.jsonl")
    assert [(r["step"], r["kind"]) for r in injected] == [(2, "nan_input")]
    [incident] = lines(straight / "incidents.jsonl")
    assert injected[0]["detail"]["image_id"] in incident["image_ids"]
    assert [r["step"] for r in lines(straight / "metrics.jsonl")] == list(range(14))
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_00000014.ckpt"]
    assert (straight / "report.html").exists() and not (straight / "eval.json").exists()
    done = nanguard("eval", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 14" in done.stderr
    evaluated = json.loads((straight / "eval.json").read_text())
    assert evaluated["step"] == 14 and 0 <= evaluated["mAP50"] <= 1


def test_each_applicable_inject_kind_is_seen_at_its_step_explained_and_the_run_completes(straight, shapes, tmp_path):
    run = tmp_path / "faults"
    train(run, shapes, *GRAPH, "train.eval_at_end=false", "policy.snapshot_every=2",
          "policy.snapshot_healthy=1", "policy.snapshot_confirm=1", "explain.auto=first",
          "--inject", "loss_nan@1:component=loss_objectness", "--inject", "grad_nan@3", "--inject", "zero_box@4",
          "--inject", "weight_bitflip@7", "--inject", "nan_input@10", "--inject", "lr_spike@12:factor=1000")
    final = json.loads((run / "final.json").read_text())
    assert final["status"] == "completed" and final["weights_finite"]
    incidents = lines(run / "incidents.jsonl")
    by_step = {r["step"]: r for r in incidents}
    assert by_step[1]["kind"] == "nonfinite_loss" and by_step[1]["action"] == "skip"
    assert by_step[3]["kind"] == "nonfinite_grad" and not by_step[3]["applied"]
    assert by_step[4]["kind"] == "invalid_target" and by_step[4]["applied"]  # dropped on the host, a note
    # the weight flipped after step 7 is seen by the next weight check, the separate compiled check due
    # before step 8's snapshot (snapshot_every=2), and rolled back to the snapshot before it
    assert "wild_param" in by_step[8]["kinds"] and (by_step[8]["action"], by_step[8]["rollback_to_step"]) == ("rollback", 6)
    assert by_step[10]["kind"] in ("nonfinite_loss", "nonfinite_buffer") and not by_step[10]["applied"]
    # step 12's own numbers are healthy (its update is what the spike blows up): the step run with it is not
    assert by_step[13]["kind"] in ("loss_spike", "grad_spike") and not by_step[13]["applied"]
    assert {r["kind"] for r in lines(run / "injections.jsonl")} == {"loss_nan", "grad_nan", "zero_box",
                                                                   "weight_bitflip", "lr_spike", "nan_input"}
    # each incident explained from a replay of the MindSpore step: the verdicts of the torch backend's
    verdicts = {step: r["diagnosis"] for step, r in by_step.items() if r.get("diagnosis")}
    assert (verdicts[1]["verdict"], verdicts[1]["loss_component"]) == ("numerical_op", "loss_objectness")
    assert verdicts[3]["verdict"] == "transient" and verdicts[3]["reproduced"] is False
    assert verdicts[4]["verdict"] == "bad_annotation"
    assert verdicts[8]["verdict"] == "corrupted_weights"
    poisoned = next(r["detail"]["image_id"] for r in lines(run / "injections.jsonl") if r["kind"] == "nan_input")
    assert (verdicts[10]["verdict"], verdicts[10]["image_ids"]) == ("bad_image", [poisoned])
    assert verdicts[13]["verdict"] == "lr_divergence"
    assert (run / "incidents" / "10" / "replay.ckpt").is_file()
    # and later, in another process, from the incident's folder
    done = nanguard("diagnose", str(run), "--incident", "10", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    [offline] = json.loads(done.stdout)
    assert (offline["verdict"], offline["image_ids"]) == ("bad_image", [poisoned])
    # a damaged replay file: one line, exit 2
    replay = run / "incidents" / "13" / "replay.ckpt"
    replay.write_bytes(replay.read_bytes()[:1000])
    done = nanguard("diagnose", str(run), "--incident", "13")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "replay.ckpt" in done.stderr and "cannot be replayed" in done.stderr, done.stderr[-2000:]


def test_what_the_mindspore_backend_cannot_do_is_refused_before_anything_is_written(shapes, tmp_path, monkeypatch):
    """In this process (the refusals come before any compile; the MindSpore mode is put back after)."""
    import contextlib
    import io

    import mindspore as ms

    from nanguard.cli import main

    def refused(run: Path, *extra: str) -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", "--quiet", "--out", str(run), f"data.root={shapes}", *ARGS, *extra])
        assert code == 2 and "Traceback" not in err.getvalue(), err.getvalue()
        assert len(err.getvalue().strip().splitlines()) == 1 and not run.exists(), err.getvalue()
        return err.getvalue()

    mode = ms.get_context("mode")
    try:
        for extra, words in ((["model.name=mobilenet_v3_fpn"], "model.name=mobilenet_v3_fpn"),
                             (["train.amp=bf16"], "train.amp=bf16"),
                             (["--device", "cuda"], "--device cuda")):
            assert words in refused(tmp_path / f"refused_{len(words)}", *extra)
        a_file = tmp_path / "not_a_folder"
        a_file.write_text("mine")
        monkeypatch.setenv("NANGUARD_MINDSPORE_COMPILE_CACHE", str(a_file))
        assert "NANGUARD_MINDSPORE_COMPILE_CACHE" in refused(tmp_path / "refused_cache")
        assert a_file.read_text() == "mine"
    finally:
        ms.set_context(mode=mode)


def test_eval_picks_the_backend_from_the_checkpoint_files(tmp_path):
    from nanguard.run.eval_command import _backend_of

    (tmp_path / "ms" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ms" / "checkpoints" / "step_00000003.ckpt").write_bytes(b"x")
    (tmp_path / "pt" / "checkpoints").mkdir(parents=True)
    (tmp_path / "pt" / "checkpoints" / "step_00000003.pt").write_bytes(b"x")
    assert _backend_of(tmp_path / "ms") == "mindspore" and _backend_of(tmp_path / "pt") == "torch"
    assert _backend_of(tmp_path / "ms" / "checkpoints" / "step_00000003.ckpt") == "mindspore"
    kept_aside = tmp_path / "ms" / "checkpoints" / "step_00000003.ckpt.damaged"
    kept_aside.write_bytes(b"x")
    assert _backend_of(kept_aside) == "mindspore" and _backend_of(tmp_path / "empty") == "torch"


def test_ctrl_c_mid_step_and_sigkill_mid_checkpoint_then_resume_is_bit_identical(straight, shapes, tmp_path):
    """Ctrl-C at a random moment once a checkpoint is on disk (exit 130 and one line, as a torch run:
    not MindSpore's own SIGINT handler, which ends the process with SIGTERM), then SIGKILL halfway through
    writing the next checkpoint: the last resume ends bit-identical to the run never stopped (`straight`,
    the same config). Its processes load the train step from the compile cache the first one filled."""
    import random
    import signal
    import time

    reference = straight
    run = tmp_path / "killed"
    child = subprocess.Popen(command("train", "--quiet", "--out", str(run), f"data.root={shapes}", *ARGS, *COMMON),
                             cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while child.poll() is None and not list((run / "checkpoints").glob("step_*.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(7).uniform(0.0, 0.3))
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=120) == 130
    err = child.stderr.read().decode()
    assert err.strip().splitlines() == ["nanguard train: interrupted"], err[-2000:]
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt"))
    assert kept and "step_00000014.ckpt" not in kept

    torn = subprocess.run(command("train", "--quiet", "--resume", str(run)), cwd=REPO, env=env(TORN_WRITE="1"),
                          capture_output=True, timeout=600)
    assert torn.returncode == -signal.SIGKILL, torn.stderr.decode()[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt")) == kept  # the torn file got no name

    done = nanguard("train", "--quiet", "--resume", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[WARNING]" not in done.stderr, done.stderr[-3000:]  # MindSpore's log (its compile cache says so)
    ours, theirs = (arrays(r / "checkpoints" / "step_00000014.ckpt") for r in (run, reference))
    assert set(ours) == set(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert [(r["step"], r["total_loss"]) for r in lines(run / "metrics.jsonl")] == \
        [(r["step"], r["total_loss"]) for r in lines(reference / "metrics.jsonl")]
    assert [(r["step"], r["action"]) for r in lines(run / "incidents.jsonl")] == [(2, "skip")]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # the scratch files: removed
