"""The run folder as a hostile user meets it: one writer, never a foreign folder, a damaged checkpoint,
overrides on --resume, I/O errors. Every refusal is exit 2 with one line naming the path, and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, checkpoint_steps, newest_checkpoint, tiny_args
from nanguard.cli import main
from nanguard.run.folder import RunFolder

SHORT = ["train.steps=4", "train.checkpoint_every=2", "train.eval_at_end=false", "policy.snapshot_confirm=1"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_out_refuses_a_folder_that_is_not_a_run(shapes, tmp_path, capsys):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "final.json").write_text('{"mine": true}')
    (mine / "metrics.jsonl").write_text("precious\n")
    assert main(["train", "--quiet", "--out", str(mine), *tiny_args(shapes), *SHORT]) == 2
    line = one_line_error(capsys)
    assert str(mine) in line and "not a nanguard run" in line and "final.json" in line
    assert (mine / "final.json").read_text() == '{"mine": true}'
    assert (mine / "metrics.jsonl").read_text() == "precious\n"
    assert sorted(p.name for p in mine.iterdir()) == ["final.json", "metrics.jsonl"]  # not even a lock file


def test_out_refuses_a_file_and_an_existing_run(shapes, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert main(["train", "--quiet", "--out", str(a_file), *tiny_args(shapes), *SHORT]) == 2
    assert "is a file" in one_line_error(capsys) and a_file.read_text() == "keep me"
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *SHORT, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *SHORT]) == 2
    assert "already holds a run" in one_line_error(capsys)


def test_a_refused_config_writes_nothing(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), "train.lr=-1"]) == 2
    assert "train.lr" in one_line_error(capsys) and not run.exists()


def test_a_second_writer_is_refused_naming_the_holder(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *SHORT, "--steps", "2"]) == 0
    before = (run / "metrics.jsonl").read_text()
    with RunFolder.open(run):  # as a run that is still training holds it
        capsys.readouterr()
        assert main(["train", "--quiet", "--resume", str(run)]) == 2
        line = one_line_error(capsys)
        assert f"in use by process {os.getpid()}" in line and str(run) in line
    assert (run / "metrics.jsonl").read_text() == before  # the refused writer wrote nothing
    assert main(["train", "--quiet", "--resume", str(run)]) == 0  # released: it resumes


# `nanguard train` in a child process on the numpy fake backend (tests/fake_backend.py)
FAKE_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import nanguard.run.backend as backends
from fake_backend import FakeBackend
backends.create_backend = lambda name, device: FakeBackend(device)
from nanguard.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_runs_into_the_same_new_folder(shapes, tmp_path):
    """Started at once: exactly one trains, the other exits 2 and damages nothing."""
    run = tmp_path / "race"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    args = [sys.executable, "-c", FAKE_CHILD.format(tests=str(REPO / "tests")), "train", "--quiet", "--out", str(run),
            *tiny_args(shapes), "train.steps=40", "train.checkpoint_every=20", "train.eval_at_end=false"]
    children = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    results = sorted((child.wait(timeout=300), child.stderr.read().decode()) for child in children)
    assert [code for code, _ in results] == [0, 2], results
    # "in use by process N", or "in use by another process" when it lost the race in the instant between
    # the winner's lock and the winner's pid written into the lock file; or it came second altogether
    assert "in use by" in results[1][1] or "already holds a run" in results[1][1]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == list(range(40))  # one writer: no interleaved lines


def test_a_run_being_created_this_instant_is_in_use_not_foreign(shapes, tmp_path, capsys, fake_backend):
    """The instant between another process's lock and its config.yaml, the folder holds that config's
    temp file: a second `--out` into it says the folder is in use (the race above, made certain)."""
    from nanguard.run.folder import _lock

    run = tmp_path / "race"
    run.mkdir()
    held = _lock(run)  # the other process's lock, its config.yaml not yet renamed into place
    try:
        (run / ".config.yaml.k3j9_x.tmp").write_text("train: {}\n")
        assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes)]) == 2
        assert f"in use by process {os.getpid()}" in one_line_error(capsys)
    finally:
        os.close(held)
    assert sorted(p.name for p in run.iterdir()) == [".config.yaml.k3j9_x.tmp", ".nanguard.lock"]


def test_kill_9_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from nanguard.run.folder import RunFolder;"
         "f = RunFolder.open(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(run)],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")), stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"locked"
    with pytest.raises(Exception, match=f"in use by process {holder.pid}"):
        RunFolder.open(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunFolder.open(run):  # the kernel dropped the lock with the process
        pass


def test_a_damaged_newest_checkpoint_falls_back_and_is_kept_aside(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *SHORT]) == 0
    assert checkpoint_steps(run) == [2, 4]
    newest = run / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    assert main(["train", "--quiet", "--resume", str(run), "train.steps=6"]) == 0
    err = capsys.readouterr().err
    assert "step_00000004.pt" in err and "kept aside" in err and "an older checkpoint" in err
    assert (run / "checkpoints" / "step_00000004.pt.damaged").stat().st_size == 1000
    assert checkpoint_steps(run) == [2, 4, 6] and newest_checkpoint(run)["step"] == 6
    lines = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(6))  # steps 2 and 3 were trained again, logged once


def test_a_fifo_or_a_device_among_the_checkpoints_is_set_aside_not_read(shapes, tmp_path, capsys, fake_backend):
    """A reader would wait on a FIFO forever and read /dev/zero without end: such a 'checkpoint' is
    damaged, put aside, and the run resumes from the one before it."""
    from nanguard.run.checkpoints import list_checkpoints

    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *SHORT, "train.checkpoint_every=1"]) == 0
    assert [step for step, _ in list_checkpoints(run, ".npz")][-2:] == [3, 4]
    folder = run / "checkpoints"
    (folder / "step_00000004.npz").unlink()
    os.mkfifo(folder / "step_00000004.npz")
    (folder / "step_00000005.npz").symlink_to("/dev/zero")
    capsys.readouterr()
    assert main(["train", "--quiet", "--resume", str(run), "train.steps=6"]) == 0
    err = capsys.readouterr().err
    assert err.count("not a regular file") == 2 and "an older checkpoint" in err, err
    assert {p.name for p in folder.iterdir()} >= {"step_00000004.npz.damaged", "step_00000005.npz.damaged"}
    assert [step for step, _ in list_checkpoints(run, ".npz")][-1] == 6


def test_resume_overrides_are_recorded_and_fixed_keys_refused(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *SHORT, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--quiet", "--resume", str(run), "model.name=resnet50_fpn"]) == 2
    assert "model.name cannot change" in one_line_error(capsys)
    assert "resnet50" not in (run / "config.yaml").read_text()
    assert main(["train", "--quiet", "--resume", str(run), "train.steps=6", "train.log_every=2"]) == 0
    config = (run / "config.yaml").read_text()
    assert "steps: 6" in config and "log_every: 2" in config
    assert json.loads((run / "final.json").read_text())["steps"] == 6


def immutable(folder):
    """chattr +i: read-only even for root (CI runs as root, which ignores permission bits)."""
    result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {result.stderr.decode().strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_immutable_parent_folder_is_one_line(tmp_path, shapes, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    undo = immutable(parent)
    try:
        assert main(["train", "--quiet", "--out", str(parent / "run"), *tiny_args(shapes), *SHORT]) == 2
        line = one_line_error(capsys)
        assert str(parent / "run") in line and "cannot create the run folder" in line
    finally:
        undo()


def test_resume_in_an_immutable_run_folder_is_one_line_and_loses_nothing(tmp_path, shapes, capsys):
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *SHORT, "--steps", "2"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    undo = immutable(run)
    try:
        assert main(["train", "--quiet", "--resume", str(run)]) == 2
        assert str(run) in one_line_error(capsys)
    finally:
        undo()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_an_io_error_while_writing_names_the_path(shapes, tmp_path, capsys, monkeypatch):
    """A full disk surfaces as ENOSPC from the write: one line with the path and the cause."""
    import errno

    import nanguard.run.folder as folder_module

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder_module, "atomic_write_text", full)
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_args(shapes), *SHORT]) == 2
    line = one_line_error(capsys)
    assert "config.yaml" in line and "no space left on device" in line and "free some space" in line
