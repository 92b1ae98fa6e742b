"""Kill -9 anywhere, resume, and end bit-identical to the run that was never killed.

The killed runs are real subprocesses sent SIGKILL at random moments (seeded), and one is killed from
inside `torch.save` halfway through writing a checkpoint, so the atomic write is what is being tested.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, checkpoint_steps, newest_checkpoint, tiny_args
from nanguard.cli import main

STEPS = 10
COMMON = [f"train.steps={STEPS}", "train.checkpoint_every=2", "train.eval_at_end=false", "policy.snapshot_confirm=1"]

# Runs nanguard in a child that SIGKILLs itself halfway through writing its second checkpoint.
TORN_WRITE = """
import os, signal, sys, torch
real_save, calls = torch.save, [0]
def torn_save(obj, f, *a, **k):
    calls[0] += 1
    if calls[0] == 2:
        import io
        buffer = io.BytesIO(); real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = torn_save
from nanguard.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def _child(args: list[str], code: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "nanguard.cli", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _lines(path: Path) -> int:
    """Steps logged so far (metrics.jsonl has one line a step with train.log_every=1)."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _same(a: Path, b: Path) -> None:
    x, y = newest_checkpoint(a), newest_checkpoint(b)
    assert x["step"] == y["step"] == STEPS
    for key in x["model"]:
        assert torch.equal(x["model"][key], y["model"][key]), key
    for pid, state in x["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, y["optimizer"]["state"][pid][name]), (pid, name)
    assert x["data"] == y["data"] and x["guard"]["policy_state"] == y["guard"]["policy_state"]
    for window in ("loss_spikes", "grad_spikes"):  # empty slots are NaN: equal where both are
        for k, v in x["guard"][window].items():
            assert torch.allclose(v, y["guard"][window][k], rtol=0, atol=0, equal_nan=True), (window, k)


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory) -> Path:
    """The run never killed, that every killed and resumed run must end equal to."""
    run = tmp_path_factory.mktemp("kill9") / "reference"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *COMMON]) == 0
    return run


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(reference, shapes, tmp_path):
    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):  # three kills at most (each child pays the imports), then the resume to the end
        fresh = not (run / "config.yaml").exists()
        args = ["train", "--quiet"] + (["--out", str(run), *tiny_args(shapes), *COMMON] if fresh
                                       else ["--resume", str(run)])
        done = _lines(run / "metrics.jsonl")
        child = _child(args)
        # kill at a random moment once the child is training (import times differ between machines):
        # after a random number of further steps plus a random fraction of a step
        target = min(STEPS - 1, done + rng.randint(1, 3))
        deadline = time.monotonic() + 120
        while child.poll() is None and _lines(run / "metrics.jsonl") < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
        if child.returncode == 0:
            break
    assert kills >= 1
    final = _child(["train", "--quiet", "--resume", str(run)])
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()
    _same(reference, run)
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_sigkill_during_a_checkpoint_write(reference, shapes, tmp_path):
    run = tmp_path / "torn"
    child = _child(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *COMMON], code=TORN_WRITE)
    child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL
    # the half-written file never got a checkpoint's name; the first checkpoint is intact
    assert checkpoint_steps(run) == [2]
    assert list((run / "checkpoints").glob(".step_*.tmp"))  # the torn temp file, ignored
    newest_checkpoint(run)

    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    _same(reference, run)
