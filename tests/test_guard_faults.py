"""Fault-injection specs: parsing, error messages, the plan's schedule and the injection log."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanguard.errors import UserError
from nanguard.guard import FAULT_KINDS, FaultPlan, InjectionLog, NullInjectionLog, parse_fault
from nanguard.guard.faults import read_injections


def test_parse_the_documented_examples():
    spec = parse_fault("loss_nan@120:component=loss_box_reg")
    assert (spec.kind, spec.step, spec.param("component"), spec.param("value")) == (
        "loss_nan", 120, "loss_box_reg", "nan")
    spec = parse_fault("grad_nan@50:every=100:count=3")
    assert (spec.every, spec.count, spec.max_fires) == (100, 3, 3)
    spec = parse_fault("nan_input@10:prob=0.1")
    assert spec.prob == 0.1 and spec.max_fires is None
    assert parse_fault("lr_spike@300:factor=1000").param("factor") == 1000.0
    assert parse_fault("lr_spike@300").param("factor") == 1000.0
    assert parse_fault("weight_bitflip@400").param("bit") == 30
    spec = parse_fault(" zero_box@30:rank=1 ")
    assert spec.rank == 1 and spec.max_fires == 1 and str(spec) == "zero_box@30:rank=1"
    assert parse_fault("fp16_overflow@5").kind == "fp16_overflow"
    assert parse_fault("loss_nan@0:component=loss_objectness:value=-inf").param("value") == "-inf"


def test_every_registered_kind_parses():
    for name in FAULT_KINDS:
        assert parse_fault(f"{name}@1").kind == name


@pytest.mark.parametrize("text, message", [
    ("los_nan@3", r"unknown fault kind 'los_nan' in fault spec 'los_nan@3': did you mean loss_nan"),
    ("explode@3", r"unknown fault kind 'explode'.*known kinds: fp16_overflow, grad_nan"),
    ("loss_nan", r"bad fault spec 'loss_nan': expected KIND@STEP"),
    ("loss_nan@x", r"bad step 'x' in fault spec 'loss_nan@x'"),
    ("loss_nan@-1", r"bad step '-1'"),
    ("loss_nan@3:colour=red", r"unknown key 'colour'.*loss_nan takes every, count, prob, rank, "
                              r"component, value"),
    ("loss_nan@3:evry=2", r"unknown key 'evry'.*did you mean every"),
    ("lr_spike@3:component=loss_box_reg", r"unknown key 'component'.*lr_spike takes .*factor"),
    ("loss_nan@3:component=loss_mask", r"bad value 'loss_mask' for key 'component'.*one of "
                                       r"loss_objectness, loss_rpn_box_reg"),
    ("grad_nan@3:prob=1.5", r"bad value '1.5' for key 'prob'.*probability in \(0, 1\]"),
    ("grad_nan@3:every=0", r"bad value '0' for key 'every'.*integer >= 1"),
    ("lr_spike@3:factor=inf", r"bad value 'inf' for key 'factor'"),
    ("grad_nan@3:every", r"bad part 'every'.*expected key=value"),
    ("grad_nan@3:count=2:count=3", r"key 'count' given twice"),
])
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(UserError, match=message) as info:
        parse_fault(text)
    assert "\n" not in str(info.value)


def test_single_shot_fires_once():
    plan = FaultPlan(["grad_nan@5"], seed=0)
    assert [s for s in range(20) if plan.faults_at(s)] == [5]


def test_every_and_count_repeat():
    plan = FaultPlan(["grad_nan@50:every=100:count=3"])
    assert [s for s in range(1000) if plan.faults_at(s)] == [50, 150, 250]
    plan = FaultPlan(["grad_nan@50:every=100"])
    assert [s for s in range(500) if plan.faults_at(s)] == [50, 150, 250, 350, 450]
    plan = FaultPlan(["loss_nan@7:count=3"])  # count alone: consecutive steps
    assert [s for s in range(20) if plan.faults_at(s)] == [7, 8, 9]


def test_prob_is_seeded_and_deterministic():
    steps = range(2000)
    first = [s for s in steps if FaultPlan(["nan_input@10:prob=0.1"], seed=3).faults_at(s)]
    plan = FaultPlan(["nan_input@10:prob=0.1"], seed=3)
    assert [s for s in steps if plan.faults_at(s)] == first
    other = [s for s in steps if FaultPlan(["nan_input@10:prob=0.1"], seed=4).faults_at(s)]
    assert other != first
    assert min(first) >= 10 and 120 < len(first) < 280  # about 10% of 1990 eligible steps


def test_prob_with_count_caps_the_fires():
    plan = FaultPlan(["nan_input@0:prob=0.5:count=4"], seed=1)
    fired = [s for s in range(200) if plan.faults_at(s)]
    assert len(fired) == 4


def test_prob_with_every_only_on_the_grid():
    plan = FaultPlan(["grad_nan@5:every=10:prob=0.5"], seed=2)
    fired = [s for s in range(500) if plan.faults_at(s)]
    assert fired and all((s - 5) % 10 == 0 for s in fired)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.permutations(list(range(120))))
def test_query_order_does_not_matter(seed, order):
    specs = ["nan_input@3:prob=0.3:count=5", "grad_nan@2:every=7:prob=0.6:count=4", "zero_box@9"]
    sequential = FaultPlan(specs, seed=seed)
    expected = {s: sequential.faults_at(s) for s in range(120)}
    shuffled = FaultPlan(specs, seed=seed)
    assert {s: shuffled.faults_at(s) for s in order} == expected


def test_rank_filter():
    plan = FaultPlan(["zero_box@30:rank=1", "loss_nan@30"])
    assert [f.kind for f in plan.faults_at(30, rank=0)] == ["loss_nan"]
    assert [f.kind for f in plan.faults_at(30, rank=1)] == ["zero_box"]


def test_fp16_overflow_needs_fp16():
    plan = FaultPlan(["fp16_overflow@5"])
    plan.check(amp="fp16")
    with pytest.raises(UserError, match="needs train.amp=fp16.*train.amp=bf16"):
        plan.check(amp="bf16")
    FaultPlan(["loss_nan@5"]).check(amp="off")


def test_pick_is_deterministic_and_in_range():
    plan = FaultPlan(["nan_input@0:every=1"], seed=9)
    spec = plan.specs[0]
    picks = [plan.pick(spec, step, 8) for step in range(200)]
    assert picks == [FaultPlan(["nan_input@0:every=1"], seed=9).pick(spec, s, 8) for s in range(200)]
    assert set(picks) == set(range(8))
    assert plan.pick(spec, 3, 1) == 0


def test_no_global_rng_is_touched():
    random.seed(123)
    before = random.random()
    random.seed(123)
    plan = FaultPlan(["nan_input@0:prob=0.5"], seed=0)
    [plan.faults_at(s) for s in range(50)]
    assert random.random() == before


def test_injection_log_lines(tmp_path):
    log = InjectionLog(tmp_path / "injections.jsonl")
    spec = parse_fault("lr_spike@300:factor=1000")
    log.record(300, spec, rank=0, detail={"lr": float("inf")})
    log.record(301, parse_fault("grad_nan@50:every=100:count=3"), detail="param rpn.conv.weight[3]")
    lines = (tmp_path / "injections.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) for line in lines]
    assert records[0] == {"step": 300, "kind": "lr_spike", "rank": 0,
                          "params": {"factor": 1000.0}, "detail": {"lr": "inf"}}
    assert records[1]["params"] == {"value": "nan", "every": 100, "count": 3}
    assert read_injections(tmp_path) == records and log.count == 2


def test_null_injection_log_writes_nothing_and_returns_the_real_line(tmp_path, monkeypatch):
    """A run without --inject uses NullInjectionLog: recording into it must write no file anywhere
    (checked by catching every append the module makes and running from tmp_path, since the null log
    has no path) and hand back the line the real log would have written."""
    import nanguard.guard.faults as faults_module

    appended = []
    real_append = faults_module.append_jsonl
    monkeypatch.setattr(faults_module, "append_jsonl",
                        lambda path, record: (appended.append(path), real_append(path, record)))
    monkeypatch.chdir(tmp_path)
    calls = [(300, parse_fault("lr_spike@300:factor=1000"), 0, {"lr_factor": 1000.0}),
             (301, parse_fault("grad_nan@50:every=100:count=3"), 1, "param rpn.conv.weight[3]"),
             (7, parse_fault("zero_box@7"), 0, "")]

    null = NullInjectionLog()
    null_lines = [null.record(*call) for call in calls]
    assert appended == [] and list(tmp_path.iterdir()) == []
    assert null.path is None and null.count == 0

    real = InjectionLog(tmp_path / "run" / "injections.jsonl")
    real_lines = [real.record(*call) for call in calls]
    assert appended == [real.path] * 3  # the hook does see the real log's writes
    assert null_lines == real_lines == read_injections(tmp_path / "run")
