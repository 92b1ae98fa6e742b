"""Bad input: exit 2, one line on stderr naming the file or key and the fix, no traceback. The commands
run in this process (`nanguard.cli.main`, whose error handling is what is tested); one runs through the
console entry point in a child, as a user's shell runs it."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_args

from nanguard.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    """`nanguard ARGS` in this process: its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_the_console_entry_point_exits_2_with_one_line():
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    result = subprocess.run([sys.executable, "-m", "nanguard.cli", "train", "--quiet", "train.lrr=0.1"],
                            capture_output=True, text=True, env=env, timeout=300)
    _assert_user_error(result, "train.lrr", "train.lr")


def _assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, shapes):
    d = tmp_path_factory.mktemp("bad")
    (d / "truncated.json").write_text('{"images": [{"id": 1, "file_')
    (d / "list.json").write_text("[1, 2, 3]")
    (d / "notrun").mkdir()
    (d / "corrupt.pt").write_bytes(b"\x80\x02not a pickle at all")
    torch.save({"weight": torch.zeros(3)}, d / "foreign.pt")
    return d


def test_bad_data_paths_and_files(shapes, bad_files, tmp_path):
    val = [f"data.val_ann={shapes}/annotations/instances_val.json", f"data.val_images={shapes}/val"]
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "a"), "data.root=/no/such/dir"),
                       "data.root=/no/such/dir", "nanguard synth")
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "b"), f"data.train_ann={bad_files}/truncated.json",
                            f"data.train_images={shapes}/train", *val, "data.audit=off"), "truncated.json", "JSON")
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "c"), f"data.train_ann={bad_files}/list.json",
                            f"data.train_images={shapes}/train", *val, "data.audit=off"), "list.json", "COCO")
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "d"), f"data.train_ann={shapes}/annotations/instances_train.json",
                            "data.train_images=/no/images", *val), "/no/images")


def test_bad_config(shapes, tmp_path):
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "a"), "train.lrr=0.1"), "train.lrr", "train.lr")
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "b"), "train.batch_size=-1"), "train.batch_size")
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "c"), "--config", "nope"), "nope", "preset")
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "d"), "--inject", "nan_inptu@3"),
                       "nan_inptu", "nan_input")


def test_bad_checkpoints_and_resume(bad_files, tmp_path):
    _assert_user_error(_run("eval", str(bad_files / "corrupt.pt")), "corrupt.pt", "checkpoint")
    _assert_user_error(_run("eval", str(bad_files / "foreign.pt")), "foreign.pt", "not a nanguard checkpoint")
    _assert_user_error(_run("eval", str(bad_files / "notrun")), "notrun")
    _assert_user_error(_run("train", "--quiet", "--resume", str(bad_files / "notrun")), "notrun", "not a run folder")
    _assert_user_error(_run("train", "--quiet", "model.weights=" + str(bad_files / "corrupt.pt"),
                            "--out", str(tmp_path / "w")), "corrupt.pt")


def test_existing_run_is_not_overwritten(shapes, tmp_path):
    out = tmp_path / "run"
    ok = _run("train", "--quiet", "--out", str(out), "--steps", "1", *tiny_args(shapes), "train.eval_at_end=false")
    assert ok.returncode == 0, ok.stderr
    before = (out / "config.yaml").read_bytes()
    _assert_user_error(_run("train", "--quiet", "--out", str(out), *tiny_args(shapes)), "--resume")
    assert (out / "config.yaml").read_bytes() == before


def test_only_checkpoint_torn_on_resume_is_a_user_error(shapes, tmp_path):
    """With no older checkpoint to fall back to (tests/test_run_folder.py has the fallback)."""
    out = tmp_path / "run"
    assert _run("train", "--quiet", "--out", str(out), "--steps", "1", *tiny_args(shapes),
                "train.checkpoint_every=1", "train.keep_checkpoints=1", "train.eval_at_end=false").returncode == 0
    [newest] = sorted((out / "checkpoints").glob("step_*.pt"))
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged on disk after it was written
    damaged = newest.read_bytes()
    result = _run("train", "--quiet", "--resume", str(out))
    assert result.returncode == 2 and "checkpoint(s) loads" in result.stderr and "Traceback" not in result.stderr
    assert newest.read_bytes() == damaged  # a resume that cannot continue changes nothing, renames nothing


def test_a_refused_multi_process_run_is_one_line_before_any_rank_starts(shapes, tmp_path, monkeypatch):
    """`--nproc N` refuses in the launching process whatever a rank would refuse (the backend's
    check_config as a rank of N sees it, the config, the run folder), before torchrun starts: one line,
    exit 2, nothing written (a rank's refusal would end in torchrun's ChildFailedError traceback)."""
    import nanguard.run.train_command as train_command

    def no_launch(*a, **k):
        raise AssertionError(f"torchrun started: {a}")

    monkeypatch.setattr(train_command, "_torchrun", no_launch)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = [
        (["--out", str(tmp_path / "a"), *tiny_args(shapes), "train.lrr=0.1"], ("train.lrr",)),
        (["--out", str(tmp_path / "zero"), *tiny_args(shapes)], ("--nproc 0",)),  # not a plain run
        (["--out", str(taken), *tiny_args(shapes)], ("--out", "notes.txt")),
        (["--resume", str(tmp_path / "nothing_here")], ("--resume", "not a run folder")),
        (["--out", str(tmp_path / "b"), *tiny_args(shapes), "--inject", "nonsense@1"], ("nonsense",)),
        (["--out", str(tmp_path / "c"), *tiny_args(shapes), "model.weights=/no/such/file.pt"], ("model.weights",)),
    ]
    try:
        import mindspore  # noqa: F401

        cases.append((["--out", str(tmp_path / "d"), *tiny_args(shapes), "backend=mindspore"], ("backend=mindspore",)))
    except ImportError:
        pass
    for argv, needles in cases:
        nproc = "0" if "--nproc 0" in needles else "2"
        _assert_user_error(_run("train", "--nproc", nproc, "--quiet", *argv), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and (taken / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]  # no lock file left in the user's folder


def test_world_size_set_by_hand_without_a_launcher_is_one_line_before_the_folder(shapes, tmp_path, capsys, monkeypatch):
    """WORLD_SIZE=2 with no torchrun address (MASTER_ADDR/PORT): refused in one line by the backend's
    check, before the run folder exists (torch's own error would be a ValueError traceback after it)."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--quiet", "--out", str(tmp_path / "run"), *tiny_args(shapes)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MASTER_ADDR or MASTER_PORT" in err and "--nproc" in err, err
    assert not (tmp_path / "run").exists()


def test_nproc_far_beyond_the_cores_abbreviations_and_a_repeated_nproc(shapes, tmp_path, capsys, monkeypatch):
    """--nproc beyond twice the cores is refused before anything starts; an abbreviated option is not
    taken for another (`--npr 2` is no `--nproc 2`); --nproc given twice: the last counts and no rank
    sees either."""
    from nanguard.run import train_command

    out = tmp_path / "run"
    assert main(["train", "--nproc", str(2 * (os.cpu_count() or 1) + 1), "--out", str(out), *tiny_args(shapes)]) == 2
    assert "more than twice this machine's" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as done:
        main(["train", "--npr", "2", "--out", str(out), *tiny_args(shapes)])
    assert done.value.code == 2 and "--npr" in capsys.readouterr().err and not out.exists()
    launched = []
    monkeypatch.setattr(train_command, "_torchrun", lambda launcher_args: launched.append(launcher_args) or 0)
    assert main(["train", "--nproc", "2", "--out", str(out), *tiny_args(shapes), "--nproc=1", "--nproc", "2"]) == 0
    [launcher_args] = launched
    assert "--nproc-per-node=2" in launcher_args and not [a for a in launcher_args if a.startswith("--nproc=")]
    assert "--nproc" not in launcher_args


@pytest.mark.parametrize("argv", [["train", "--out", ""], ["train", "--resume", ""], ["eval", ""], ["report", ""],
                                  ["diagnose", ""], ["audit", ""], ["synth", ""]])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(argv):
    _assert_user_error(_run(*argv), "an empty path names nothing")


@pytest.mark.parametrize("argv", [["train", "--out"], ["train", "--resume"], ["report"], ["diagnose"], ["audit"],
                                  ["eval"], ["synth"]])
def test_a_path_the_system_refuses_is_one_line_wherever_it_is_first_touched(argv, tmp_path):
    too_long = str(tmp_path / ("a" * 300))  # one name past the file system's 255 bytes
    _assert_user_error(_run(*argv, too_long), too_long, "name too long")


@pytest.mark.parametrize("extra, needle", [
    (["train.steps=4", "--steps", "10"], "--steps 10 is past train.steps=4"),
    (["train.steps=4", "--inject", "grad_nan@4"], "step 4 is never taken"),
    (["train.steps=4", "--inject", "lr_spike@2:rank=1"], "rank 1 does not exist on 1 process"),
])
def test_what_the_run_would_never_reach_is_refused_before_the_folder(shapes, tmp_path, extra, needle):
    """A fault that would never fire (the run would look clean) and --steps past the run's end."""
    _assert_user_error(_run("train", "--quiet", "--out", str(tmp_path / "run"), *tiny_args(shapes), *extra), needle)
    assert not (tmp_path / "run").exists()
