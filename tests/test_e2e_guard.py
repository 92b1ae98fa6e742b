"""The guard end to end, through the public CLI only (`nanguard.cli.main`, in-process), judged from the
run folder: final.json, metrics.jsonl, incidents.jsonl, injections.jsonl and the checkpoints (loaded with
`torch.load(weights_only=True)`). Nothing here touches the trainer's or the Guard's internals, so these
tests outlive a restructuring of the training loop.

Runs are tiny (8 images of 64 px, batch 2: an epoch is 4 steps) and shared between the tests of a
module-scoped fixture, so each run happens once.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from conftest import flat_checkpoint, tiny_args
from nanguard.cli import main

TIMING = ("images_per_second", "train_seconds")
SPIKE_OR_NONFINITE = {"loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad", "nonfinite_param",
                      "wild_param", "nonfinite_buffer"}
STEPS_PER_EPOCH = 4  # 8 training images, batch 2, before anything is quarantined


# ------------------------------------------------------------------------------------------ helpers


def train(run: Path, data: Path, *extra: str) -> int:
    return main(["train", "--quiet", "--out", str(run), *tiny_args(data), "train.eval_at_end=false", *extra])


def jsonl(path: Path) -> list[dict]:
    """Every line of a run folder's JSONL file, strictly (a bare NaN is a bug); [] if absent."""
    if not path.exists():
        return []
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {path.name}"))
            for line in path.read_text().splitlines()]


def final(run: Path) -> dict:
    return json.loads((run / "final.json").read_text())


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step_*.pt"))


def load(path: Path) -> dict:
    """A checkpoint, flattened: the backend's parts (model, optimizer, schedule, scaler, guard, rng)
    beside data, config, category_ids and step."""
    return flat_checkpoint(torch.load(path, weights_only=True))


def tensors(obj, prefix: str = ""):
    """(dotted path, tensor) for every tensor nested in dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors(value, f"{prefix}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors(value, f"{prefix}[{i}]")


def without_tensors(obj):
    """The plain data around the tensors (policy state, counters), with tensors blanked out."""
    if isinstance(obj, torch.Tensor):
        return "<tensor>"
    if isinstance(obj, dict):
        return {key: without_tensors(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [without_tensors(value) for value in obj]
    return obj


def assert_weights_finite(run: Path) -> None:
    assert final(run)["weights_finite"] is True
    state = load(checkpoints(run)[-1])
    bad = [name for name, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"non-finite weights in the last checkpoint: {bad[:5]}"


def drop(record: dict, keys=TIMING) -> dict:
    """Without the timing fields (a diagnosis's seconds included)."""
    out = {k: v for k, v in record.items() if k not in keys}
    if isinstance(out.get("diagnosis"), dict):
        out["diagnosis"] = drop(out["diagnosis"], ("seconds",))
    return out


def incidents_with(run: Path, image_id) -> list[dict]:
    return [r for r in jsonl(run / "incidents.jsonl") if image_id in r["image_ids"]]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """8 training + 2 validation images at 64 px, generated through the CLI."""
    root = tmp_path_factory.mktemp("small") / "data"
    assert main(["synth", str(root), "--images", "8", "--val-images", "2", "--size", "64", "--classes", "3",
                 "--seed", "1", "--quiet"]) == 0
    return root


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------- a. exact resume

RESUME = ["explain.auto=first",  # resumed explaining: the first incident of each kind, once
          "train.steps=16", "train.checkpoint_every=8", "data.audit=off",
          # the spike detector judges from the 4th value on, so its windows are live at the checkpoint
          "guard.spike_min_history=3", "guard.spike_window=8",
          # every bad step lowers the LR; it is still recovering (factor < 1) at the checkpoint
          "policy.backoff_after=1", "policy.recover_steps=100",
          "--inject", "loss_nan@3", "--inject", "nan_input@5"]


@pytest.fixture(scope="module")
def resumed_pair(small, tmp_path_factory):
    """(straight, resumed): one run straight to step 16; one stopped at step 8 and resumed."""
    base = tmp_path_factory.mktemp("resume")
    straight, resumed = base / "straight", base / "resumed"
    assert train(straight, small, *RESUME) == 0
    assert train(resumed, small, *RESUME, "--steps", "8") == 0
    assert main(["train", "--quiet", "--resume", str(resumed)]) == 0
    return straight, resumed


def test_resume_with_live_spike_windows_and_lr_backoff_is_bit_identical(resumed_pair):
    straight, resumed = resumed_pair
    # the state the resumed run restarts from really has the policy and detectors active
    at8 = load(resumed / "checkpoints/step_00000008.pt")
    policy = at8["guard"]["policy_state"]
    assert at8["step"] == 8 and 0.0 < at8["guard"]["lr_factor"] < 1.0 and policy["lr_factor"] < 1.0
    assert policy["backoffs"] == 2 and [bad["step"] for bad in policy["recent"]] == [3, 5]
    for name in ("loss_spikes", "grad_spikes"):
        assert int(at8["guard"][name]["count"]) >= 3, f"{name}: the window is not judging yet"

    a, b = load(checkpoints(straight)[-1]), load(checkpoints(resumed)[-1])
    assert a["step"] == b["step"] == 16
    for part in ("model", "optimizer", "guard", "schedule", "rng"):
        ta, tb = dict(tensors(a[part], part)), dict(tensors(b[part], part))
        assert ta and ta.keys() == tb.keys(), part
        differ = [name for name in ta if not torch.equal(ta[name], tb[name])]
        assert not differ, f"{len(differ)} tensors differ, first: {differ[:5]}"
        assert without_tensors(a[part]) == without_tensors(b[part]), part
    assert a["data"] == b["data"]
    assert_weights_finite(straight)
    assert_weights_finite(resumed)


def test_resume_writes_the_same_log_lines(resumed_pair):
    straight, resumed = resumed_pair
    for name in ("metrics.jsonl", "incidents.jsonl", "injections.jsonl"):
        a, b = jsonl(straight / name), jsonl(resumed / name)
        assert a, name
        assert [drop(r) for r in a] == [drop(r) for r in b], name
    steps = [r["step"] for r in jsonl(resumed / "metrics.jsonl")]
    assert steps == list(range(16))  # nothing written twice, nothing lost
    assert [(r["step"], r["action"]) for r in jsonl(resumed / "incidents.jsonl")] == [
        (3, "lr_backoff"), (5, "lr_backoff")]
    assert [bool(r["diagnosis"]) for r in jsonl(resumed / "incidents.jsonl")] == [True, True]  # first of its kind, each
    fa, fb = final(straight), final(resumed)
    assert drop(fa, TIMING + ("injections",)) == drop(fb, TIMING + ("injections",))


def test_resumed_final_json_counts_injections_like_the_straight_run(resumed_pair):
    straight, resumed = resumed_pair
    assert final(resumed)["injections"] == final(straight)["injections"] == len(jsonl(resumed / "injections.jsonl"))


def test_a_rollback_after_resume_is_bit_identical(small, tmp_path):
    args = ["train.steps=16", "train.checkpoint_every=8", "guard.param_check_every=1",
            "--inject", "weight_bitflip@12"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, small, *args) == 0
    assert train(resumed, small, *args, "--steps", "8") == 0
    assert main(["train", "--quiet", "--resume", str(resumed)]) == 0
    assert final(straight)["rollbacks"] == final(resumed)["rollbacks"] == 1  # the scenario happened
    a, b = load(checkpoints(straight)[-1]), load(checkpoints(resumed)[-1])
    differ = [name for name in a["model"] if not torch.equal(a["model"][name], b["model"][name])]
    assert not differ, f"{len(differ)} of {len(a['model'])} model tensors differ"


# -------------------------------------------------------------------- b. quarantine of a bad image


def unreadable(data: Path, image_id: int) -> None:
    """Cut `image_id`'s PNG to 10 bytes: every batch that holds it fails (a bad box no longer would:
    it is dropped on its own, see test_invalid_targets.py)."""
    png = data / f"train/{image_id:012d}.png"
    png.write_bytes(png.read_bytes()[:10])


@pytest.fixture(scope="module")
def quarantine_runs(small, tmp_path_factory):
    """run(image_id, prefetch): 14 steps on a copy of the data where `image_id` cannot be decoded, with
    policy.quarantine_after=2 (each run made once)."""
    base, done = tmp_path_factory.mktemp("quarantine"), {}

    def get(image_id: int, prefetch: int = 1) -> Path:
        if (image_id, prefetch) not in done:
            folder = base / f"image{image_id}-prefetch{prefetch}"
            data = copy_data(small, folder / "data")
            unreadable(data, image_id)
            run = folder / "run"
            assert train(run, data, "train.steps=14", "data.audit=off", "policy.quarantine_after=2",
                         f"data.prefetch={prefetch}") == 0
            done[image_id, prefetch] = run
        return done[image_id, prefetch]
    return get


def first_epoch_after_the_decision(quarantine_step: int) -> int:
    """The first step of the epoch after the one in which the policy decided the quarantine (it reads
    step s's observation while running step s + 1)."""
    decided_at = quarantine_step + 1
    return (decided_at // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH


def test_an_image_that_always_fails_is_quarantined_and_leaves_the_batches(quarantine_runs):
    # image 4 sits at positions 1 and 0 of epochs 0 and 1: its second failure is decided mid-epoch
    # (with data.prefetch=1 from tiny_args; the default 2 is the xfail below)
    run = quarantine_runs(4)
    result = final(run)
    assert result["status"] == "completed" and result["steps"] == 14
    assert result["quarantined"] == [4]
    mine = incidents_with(run, 4)
    assert [r["kind"] for r in mine] == ["model_error", "model_error"]
    assert all(f"{4:012d}.png" in r["model_error"] for r in mine)
    assert [r["action"] for r in mine] == ["skip", "quarantine"] and mine[1]["quarantined"] == [4]
    # no batch after the epoch of the decision holds it: it never fails again, and nothing else does
    assert mine[-1]["step"] < first_epoch_after_the_decision(mine[1]["step"])
    assert len(jsonl(run / "incidents.jsonl")) == result["incidents"] == 2
    applied = [r["applied"] for r in jsonl(run / "metrics.jsonl")]
    assert applied.count(False) == 2 and len(applied) == 14
    assert_weights_finite(run)


def test_a_quarantine_decided_at_the_end_of_an_epoch_holds_from_the_next_epoch(quarantine_runs):
    # image 1 sits at position 2 of epochs 0 and 1: its quarantine is decided in the epoch's last step
    run = quarantine_runs(1)
    assert final(run)["quarantined"] == [1]
    mine = incidents_with(run, 1)
    quarantined_at = next(r["step"] for r in mine if r["quarantined"] == [1])
    assert [r["step"] for r in mine if r["step"] >= first_epoch_after_the_decision(quarantined_at)] == []


def test_quarantine_does_not_depend_on_data_prefetch(quarantine_runs):
    def seen(run):
        return [(r["step"], r["image_ids"], r["action"]) for r in jsonl(run / "incidents.jsonl")]
    assert seen(quarantine_runs(4, prefetch=2)) == seen(quarantine_runs(4, prefetch=1))


# ------------------------------------------------------------------------ c. an unreadable image


@pytest.fixture(scope="module")
def unreadable_run(small, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("unreadable")
    data = copy_data(small, base / "data")
    png = data / "train/000000000004.png"
    png.write_bytes(png.read_bytes()[:10])
    run = base / "run"
    assert train(run, data, "train.steps=10", "data.audit=off") == 0  # exit 0: the run survives it
    return run


def test_an_unreadable_image_is_an_incident_not_a_crash(unreadable_run):
    run = unreadable_run
    result = final(run)
    assert result["status"] == "completed" and result["steps"] == 10
    mine = incidents_with(run, 4)
    assert mine, "no incident names the unreadable image"
    for record in mine:
        assert record["kind"] == "model_error" and record["applied"] is False
        assert "000000000004.png" in record["model_error"]
        assert any(word in record["model_error"] for word in ("cannot identify", "truncated", "decode"))
    # it fails in every epoch, so the policy quarantines it; its steps were masked, the rest trained
    assert result["quarantined"] == [4]
    metrics = jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(10))
    assert [r["step"] for r in metrics if not r["applied"]] == [r["step"] for r in mine]
    assert all(math.isfinite(r["total_loss"]) for r in metrics if r["applied"])
    assert_weights_finite(run)


def test_an_unreadable_image_incident_names_its_annotations(unreadable_run):
    for record in incidents_with(unreadable_run, 4):
        assert len(record["annotation_ids"]) == len(record["image_ids"])


# ----------------------------------------------------------------------- d. bf16 and fp16 on the CPU


def test_bf16_end_to_end_on_the_cpu(small, tmp_path):
    run = tmp_path / "bf16"
    assert train(run, small, "train.steps=6", "train.amp=bf16") == 0
    metrics = jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(6))
    assert all(r["applied"] and math.isfinite(r["total_loss"]) and "loss_scale" not in r for r in metrics)
    assert final(run)["incidents"] == 0 and not jsonl(run / "incidents.jsonl")
    assert load(checkpoints(run)[-1])["config"]["train"]["amp"] == "bf16"
    assert_weights_finite(run)


def test_fp16_end_to_end_on_the_cpu_and_an_overflow_only_backs_off_the_scale(small, tmp_path):
    run = tmp_path / "fp16"
    assert train(run, small, "train.steps=5", "train.amp=fp16", "--inject", "fp16_overflow@2") == 0
    metrics = jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(5))
    scales = [r["loss_scale"] for r in metrics]  # every fp16 line carries the scale (after its step)
    assert all(isinstance(s, float) and math.isfinite(s) and s > 0 for s in scales)
    # the overflowing step is masked and halves the scale; the scale stays lower afterwards (the first
    # steps may overflow at the initial 65536 too: the scaler's ordinary calibration, masked as well)
    assert metrics[2]["applied"] is False and metrics[3]["applied"] and metrics[4]["applied"]
    assert scales[2] == scales[1] / 2 and scales[4] < scales[1]
    assert all(r["applied"] or r["loss_scale"] < (scales[i - 1] if i else 65536.0) for i, r in enumerate(metrics))
    assert all(math.isfinite(r["total_loss"]) for r in metrics)
    # a mere overflow is the scaler's business: no incident, no skip counted against the budget
    result = final(run)
    assert result["incidents"] == 0 and result["skipped_steps"] == 0 and not jsonl(run / "incidents.jsonl")
    assert [(r["step"], r["kind"]) for r in jsonl(run / "injections.jsonl")] == [(2, "fp16_overflow")]
    assert load(checkpoints(run)[-1])["scaler"]["scale"] == scales[-1]
    assert_weights_finite(run)


# ------------------------------------------------------------- e. faults through the real hooks

FAULTS = {
    "zero_box": ("zero_box@2", 10),
    "grad_nan": ("grad_nan@3", 10),
    "lr_spike_early": ("lr_spike@3:factor=1000", 10),
    # after 21 healthy steps the spike detector (guard.spike_min_history=20 by default) is judging
    "lr_spike_late": ("lr_spike@21:factor=1000", 25),
}


@pytest.fixture(scope="module")
def fault_runs(small, tmp_path_factory):
    base, done = tmp_path_factory.mktemp("faults"), {}

    def get(name: str) -> Path:
        if name not in done:
            spec, steps = FAULTS[name]
            run = base / name
            assert train(run, small, f"train.steps={steps}", "data.audit=off", "--inject", spec) == 0
            done[name] = run
        return done[name]
    return get


def injected_step(name: str) -> int:
    return int(FAULTS[name][0].split("@")[1].split(":")[0])


@pytest.mark.parametrize("name", list(FAULTS))
def test_an_injected_fault_is_survived_and_logged(fault_runs, name):
    run = fault_runs(name)
    spec, steps = FAULTS[name]
    result = final(run)
    assert result["status"] == "completed" and result["steps"] == steps
    assert_weights_finite(run)
    injected = jsonl(run / "injections.jsonl")
    assert [(r["step"], r["kind"]) for r in injected] == [(injected_step(name), spec.split("@")[0])]
    assert result["injections"] == 1


def test_zero_box_costs_one_box_and_names_it(fault_runs):
    """The zero-width box is dropped on the host; the step trains on the rest of the batch."""
    run = fault_runs("zero_box")
    (injected,) = jsonl(run / "injections.jsonl")
    by_step = {r["step"]: r for r in jsonl(run / "incidents.jsonl")}
    record = by_step[2]
    assert record["kind"] == "invalid_target" and record["action"] == "none" and record["applied"] is True
    [dropped] = record["invalid_targets"]
    assert dropped["image_id"] == injected["detail"]["image_id"] and "width" in dropped["why"]
    assert len(record["annotation_ids"]) == len(record["image_ids"])
    assert list(by_step) == [2] and final(run)["skipped_steps"] == 0


def test_grad_nan_is_a_nonfinite_gradient_with_finite_losses(fault_runs):
    run = fault_runs("grad_nan")
    by_step = {r["step"]: r for r in jsonl(run / "incidents.jsonl")}
    record = by_step[3]
    assert record["kinds"] == ["nonfinite_grad"] and record["action"] == "skip"
    assert record["values"]["grad_norm"] == "nan" and record["components"] == []
    assert all(isinstance(v, float) for k, v in record["values"].items() if k != "grad_norm")
    assert list(by_step) == [3]
    applied = [r["applied"] for r in jsonl(run / "metrics.jsonl")]
    assert applied == [s != 3 for s in range(10)]


def spiked_and_applied(run: Path) -> list[int]:
    """Steps whose update was applied with an LR far above the run's usual one."""
    metrics = jsonl(run / "metrics.jsonl")
    usual = statistics.median(r["lr"] for r in metrics if isinstance(r["lr"], float))
    return [r["step"] for r in metrics if r["applied"] and isinstance(r["lr"], float) and r["lr"] > 100 * usual]


@pytest.mark.parametrize("name", ["lr_spike_early", "lr_spike_late"])
def test_a_spiked_lr_is_applied_at_most_once(fault_runs, name):
    run = fault_runs(name)
    assert len(spiked_and_applied(run)) <= 1
    assert_weights_finite(run)


def test_a_late_lr_spike_is_caught_on_the_next_step(fault_runs):
    run = fault_runs("lr_spike_late")
    incidents = jsonl(run / "incidents.jsonl")
    # the spiked update itself (step 21) looks healthy; its damage shows on step 22 (a guard that
    # flags the spiked step itself would do better still)
    assert incidents and incidents[0]["step"] in (21, 22)
    assert set(incidents[0]["kinds"]) & {"loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad"}
    assert all(set(r["kinds"]) <= SPIKE_OR_NONFINITE for r in incidents)
    # the damaged model is never trained on: no update is applied at a loss 100x the usual
    metrics = jsonl(run / "metrics.jsonl")
    usual = statistics.median(r["total_loss"] for r in metrics[:21])
    assert [r["step"] for r in metrics if r["applied"] and r["total_loss"] > 100 * usual] == []


def test_an_early_lr_spike_is_caught_soon_after(fault_runs):
    run = fault_runs("lr_spike_early")
    incidents = jsonl(run / "incidents.jsonl")
    assert any(3 <= r["step"] <= 6 and set(r["kinds"]) & SPIKE_OR_NONFINITE for r in incidents), incidents
    metrics = jsonl(run / "metrics.jsonl")
    usual = statistics.median(r["total_loss"] for r in metrics[:3])
    assert [r["step"] for r in metrics if r["applied"] and r["total_loss"] > 100 * usual] == []
