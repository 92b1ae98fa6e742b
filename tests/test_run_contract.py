"""The run against the `Backend` contract, on the numpy fake backend (tests/fake_backend.py): the guard's
host half in the run (one step late, the policy's actions, snapshots, rollback), host-side faults, the
order the run calls a backend in, and a resume that ends bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import tiny_args

from nanguard.cli import main

STEPS = ["train.steps=12", "train.checkpoint_every=4", "policy.snapshot_confirm=1", "explain.auto=off"]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(out: Path, shapes: Path, *extra: str, code: int = 0) -> dict:
    assert main(["train", "--quiet", "--out", str(out), *tiny_args(shapes), *STEPS, *extra]) == code
    return json.loads((out / "final.json").read_text())


def test_a_clean_run_calls_the_backend_in_the_contracts_order(fake_backend, shapes, tmp_path):
    final = run(tmp_path / "run", shapes)
    [backend] = fake_backend
    assert backend.calls[:2] == ["check_config", "setup(train=True)"] and backend.calls[-1] == "close"
    assert backend.calls.count("step") == 12
    assert final["status"] == "completed" and final["weights_finite"] and final["runtime"] == {"backend": "fake"}
    assert [r["step"] for r in lines(tmp_path / "run" / "metrics.jsonl")] == list(range(12))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "step_00000012.npz"


def test_every_kind_is_acted_on_one_step_late_and_logged(fake_backend, shapes, tmp_path):
    faults = ["--inject", "loss_nan@3", "--inject", "grad_nan@5", "--inject", "nan_input@7",
              "--inject", "zero_box@8", "--inject", "lr_spike@9:factor=1e9"]
    run(tmp_path / "run", shapes, *faults)
    incidents = {r["step"]: r for r in lines(tmp_path / "run" / "incidents.jsonl")}
    assert incidents[3]["kind"] == "nonfinite_loss" and incidents[3]["action"] == "skip"
    assert incidents[5]["kind"] == "nonfinite_grad" and incidents[7]["kind"] == "nonfinite_loss"
    assert incidents[8]["kind"] == "invalid_target" and incidents[8]["applied"]  # one box dropped, step applied
    injected = [(r["step"], r["kind"]) for r in lines(tmp_path / "run" / "injections.jsonl")]
    assert injected == [(3, "loss_nan"), (5, "grad_nan"), (7, "nan_input"), (8, "zero_box"), (9, "lr_spike")]
    assert any(step > 9 for step in incidents)  # the 1e9 LR blows the weights up after the spike's update


def test_stopped_and_resumed_ends_bit_identical(fake_backend, shapes, tmp_path):
    """A backoff and a rollback before the stop and after it: the policy's state, the spike windows and
    the rollback target (the checkpoint the resumed process starts from) carry over."""
    longer = ["train.steps=24", "--inject", "loss_nan@2:count=7", "--inject", "loss_nan@13:count=7"]
    straight = run(tmp_path / "straight", shapes, *longer)
    actions = [(r["step"], r["action"]) for r in lines(tmp_path / "straight" / "incidents.jsonl")]
    assert (4, "lr_backoff") in actions and (8, "rollback") in actions and (19, "rollback") in actions
    out = tmp_path / "resumed"
    assert main(["train", "--quiet", "--out", str(out), *tiny_args(shapes), *STEPS, *longer, "--steps", "12"]) == 0
    assert main(["train", "--quiet", "--resume", str(out)]) == 0
    resumed = json.loads((out / "final.json").read_text())
    timing = ("train_seconds", "images_per_second")
    assert {k: v for k, v in straight.items() if k not in timing} == {k: v for k, v in resumed.items() if k not in timing}
    a, b = (np.load(p / "checkpoints" / "step_00000024.npz")["w"] for p in (tmp_path / "straight", out))
    assert np.array_equal(a, b)
    for name in ("incidents.jsonl", "metrics.jsonl"):
        drop = ("images_per_second", "time")
        assert [{k: v for k, v in r.items() if k not in drop} for r in lines(tmp_path / "straight" / name)] == \
            [{k: v for k, v in r.items() if k not in drop} for r in lines(out / name)], name


def test_unguarded_nothing_is_decided_and_numbers_are_read_every_log_every_steps(fake_backend, shapes, tmp_path):
    """guard.enabled=false: the step is the plain one (a NaN gradient goes into the weights), the run
    reads the step's numbers only on the train.log_every grid and at the end, and writes no incident."""
    final = run(tmp_path / "plain", shapes, "guard.enabled=false", "train.log_every=5", "--inject", "grad_nan@2", code=1)
    assert final["skipped_steps"] == 0 and final["incidents"] == 0
    # NaN weights at the end are never a success: diverged, with the reason
    assert not final["weights_finite"] and final["status"] == "diverged" and "guard.enabled=false" in final["verdict"]
    assert [r["step"] for r in lines(tmp_path / "plain" / "metrics.jsonl")] == [0, 5, 10, 11]
    assert not (tmp_path / "plain" / "incidents.jsonl").exists() or lines(tmp_path / "plain" / "incidents.jsonl") == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".nanguard.lock"}


def test_a_resume_that_cannot_continue_exits_2_and_changes_nothing(fake_backend, shapes, tmp_path, capsys,
                                                                   monkeypatch):
    """No checkpoint that loads, another backend's checkpoints, a checkpoint of another number of
    processes: one line, exit 2, every file of the run as it was (never a silent restart from step 0)."""
    out = tmp_path / "run"
    run(out, shapes, "train.steps=8")
    before = snapshot(out)
    capsys.readouterr()

    def refused(*argv: str, **env: str) -> str:
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            assert main(["train", "--quiet", "--resume", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert snapshot(out) == before
        return err

    checkpoints = sorted((out / "checkpoints").glob("step_*.npz"))
    originals = {p: p.read_bytes() for p in checkpoints}
    for p in checkpoints:  # every checkpoint cut short
        p.write_bytes(originals[p][:40])
    before = snapshot(out)
    said = refused()
    assert "none of its 2 checkpoint(s) loads" in said and "nothing was changed" in said
    for p in checkpoints:  # set aside as damaged by an earlier resume, none left: no restart from step 0
        p.rename(p.with_name(p.name + ".damaged"))
    before = snapshot(out)
    assert "every checkpoint was set aside as damaged" in refused()
    for p in checkpoints:
        p.with_name(p.name + ".damaged").rename(p)
    for p in checkpoints:  # another backend's checkpoints (config.yaml edited, or files copied in)
        p.unlink()
        p.with_suffix(".pt").write_bytes(originals[p])
    before = snapshot(out)
    assert "are not .npz files" in refused()
    for p in checkpoints:
        p.with_suffix(".pt").unlink()
        p.write_bytes(originals[p])
    before = snapshot(out)
    # the checkpoints of a 2-process run, resumed by one process
    import nanguard.run.trainer as trainer

    real = trainer.Counters.state_dict
    with monkeypatch.context() as m:
        m.setattr(trainer.Counters, "state_dict", lambda self: {**real(self), "world": 2})
        run(tmp_path / "two", shapes, "train.steps=4")
    out = tmp_path / "two"
    before = snapshot(out)
    capsys.readouterr()
    assert "written by 2 ranks" in refused()


def test_environment_ranks_that_cannot_be_are_refused_in_one_line(fake_backend, shapes, tmp_path, capsys, monkeypatch):
    for env, said in [({"RANK": "x"}, "RANK='x'"), ({"RANK": "1"}, "without WORLD_SIZE"),
                      ({"RANK": "2", "WORLD_SIZE": "2"}, "outside 0..1"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
                      ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1")]:
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            assert main(["train", "--quiet", "--out", str(tmp_path / "run"), *tiny_args(shapes), *STEPS]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, (env, err)
        assert not (tmp_path / "run").exists()


def test_a_stray_restart_count_never_turns_out_onto_another_run_into_a_resume(fake_backend, shapes, tmp_path, capsys,
                                                                            monkeypatch):
    """TORCHELASTIC_RESTART_COUNT > 0 continues --out only when its config is this command's own (a job
    torchrun started again); onto another run, --out is refused as always."""
    out = tmp_path / "run"
    run(out, shapes, "train.steps=4")
    before = snapshot(out)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(["train", "--quiet", "--out", str(out), *tiny_args(shapes), *STEPS, "train.steps=8"]) == 2
    assert "--resume" in capsys.readouterr().err and snapshot(out) == before
    assert main(["train", "--quiet", "--out", str(out), *tiny_args(shapes), *STEPS, "train.steps=4"]) == 0
    assert json.loads((out / "final.json").read_text())["steps"] == 4  # the same command: resumed, not refused
