"""The incident log: strict JSON lines, what is written, and the final.json counters."""

from __future__ import annotations

import json

import pytest

from nanguard.guard import (
    IncidentLog,
    NullIncidentLog,
    Observation,
    PolicyConfig,
    PolicyState,
    decide,
    read_incidents,
)

NAN = float("nan")
INF = float("inf")


def strict(line: str) -> dict:
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def feed(log, observations, config=None):
    state = PolicyState()
    for obs in observations:
        decision, state = decide(state, obs, config)
        log.record(obs, decision)
    return state


def nan_loss(step, images=(1, 2), **kw):
    return Observation(step=step, losses={"loss_objectness": 0.2, "loss_box_reg": NAN,
                                          "loss_classifier": INF, "loss_rpn_box_reg": 0.1},
                       total_loss=NAN, grad_norm=-INF, lr=0.02, loss_scale=65536.0,
                       nonfinite_loss=True, nonfinite_grad=True, applied=False,
                       image_ids=images, annotation_ids=(11, 12), rank=1, **kw)


def healthy(step):
    return Observation(step=step, losses={"loss_box_reg": 0.3}, total_loss=1.0, grad_norm=1.0,
                       lr=0.02, image_ids=(step,))


def test_a_line_per_incident_in_strict_json(tmp_path):
    path = tmp_path / "incidents.jsonl"
    log = IncidentLog(path)
    feed(log, [healthy(0), nan_loss(1), healthy(2)])
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    record = strict(lines[0])
    assert record["step"] == 1 and record["kind"] == "nonfinite_loss"
    assert record["kinds"] == ["nonfinite_loss", "nonfinite_grad"]
    assert record["components"] == ["loss_classifier", "loss_box_reg"]
    assert record["values"] == {"loss_objectness": 0.2, "loss_box_reg": "nan",
                                "loss_classifier": "inf", "loss_rpn_box_reg": 0.1,
                                "total_loss": "nan", "grad_norm": "-inf", "loss_scale": 65536.0}
    assert record["image_ids"] == [1, 2] and record["annotation_ids"] == [11, 12]
    assert record["lr"] == 0.02 and record["rank"] == 1 and record["action"] == "skip"
    assert record["reason"].startswith("step 1: non-finite loss (loss_classifier=inf, "
                                       "loss_box_reg=nan)")
    assert record["verdict"] is None and record["applied"] is False


def test_ignored_observations_and_repeated_stops_are_not_written(tmp_path):
    path = tmp_path / "incidents.jsonl"
    log = IncidentLog(path)
    corrupt = Observation(step=1, wild_param=True, nonfinite_param=False)
    feed(log, [healthy(0), corrupt, nan_loss(2), nan_loss(3)])  # step 2 is lagging: ignored
    records = read_incidents(tmp_path)
    assert [(r["step"], r["kind"], r["action"]) for r in records] == [
        (1, "wild_param", "rollback"), (3, "nonfinite_loss", "skip")]
    assert records[0]["rollback_to_step"] == -1  # parameters never checked: the initial state

    config = PolicyConfig(max_rollbacks=0)
    stop_path = tmp_path / "stop.jsonl"
    stop_log = IncidentLog(stop_path)
    feed(stop_log, [corrupt, nan_loss(2), nan_loss(3)], config)
    assert [r["action"] for r in read_incidents(stop_path)] == ["stop"]
    assert stop_log.summary()["stopped"] and stop_log.summary()["verdict"]


def test_summary_counters(tmp_path):
    log = IncidentLog(tmp_path / "incidents.jsonl")
    config = PolicyConfig(quarantine_after=2)
    observations = [nan_loss(0, images=(5,)), healthy(1), nan_loss(2, images=(5, 6)),
                    Observation(step=3, loss_scale=0.5, scale_overflow=True, applied=False),
                    Observation(step=4, wild_param=True, nonfinite_param=False, applied=True)]
    feed(log, observations, config)
    summary = log.summary()
    assert summary["incidents"] == 4
    assert summary["skipped_steps"] == 3  # the wild-param step was applied, not skipped
    assert summary["rollbacks"] == 1
    assert summary["incidents_by_kind"] == {"loss_scale_floor": 1, "nonfinite_grad": 2,
                                            "nonfinite_loss": 2, "wild_param": 1}
    assert summary["quarantined"] == [5]
    assert summary["actions"] == {"quarantine": 1, "rollback": 1, "skip": 2}
    json.dumps(summary, allow_nan=False)

    resumed = IncidentLog(tmp_path / "incidents.jsonl", resume=True)
    assert resumed.summary() == summary
    fresh = IncidentLog(tmp_path / "incidents.jsonl")
    assert fresh.summary()["incidents"] == 0


def test_null_log_counts_like_the_real_log_but_writes_nothing(tmp_path, monkeypatch):
    """NullIncidentLog takes no path, so "nothing in tmp_path" alone proves nothing: run from inside
    tmp_path (a relative default would land there) and catch every JSONL append the module makes."""
    import nanguard.guard.incidents as incidents_module

    appended = []
    real_append = incidents_module.append_jsonl
    monkeypatch.setattr(incidents_module, "append_jsonl",
                        lambda path, record: (appended.append(path), real_append(path, record)))
    monkeypatch.chdir(tmp_path)
    observations = [healthy(0), nan_loss(1), healthy(2), nan_loss(3, images=(1,)),
                    Observation(step=4, wild_param=True, nonfinite_param=False)]
    config = PolicyConfig(quarantine_after=2)

    null = NullIncidentLog()
    null_records = []
    state = PolicyState()
    for obs in observations:
        decision, state = decide(state, obs, config)
        null_records.append(null.record(obs, decision))
    assert appended == [] and list(tmp_path.iterdir()) == [] and null.path is None

    # the same stream through the real log: the null log returns the same records and counts the same
    real_path = tmp_path / "real" / "incidents.jsonl"
    real = IncidentLog(real_path)
    real_records = []
    state = PolicyState()
    for obs in observations:
        decision, state = decide(state, obs, config)
        real_records.append(real.record(obs, decision))
    assert appended == [real_path] * 3  # the hook does see real writes
    assert null_records == real_records and [r is None for r in null_records] == [
        True, False, True, False, False]
    assert null.summary() == real.summary()
    assert null.summary()["incidents"] == 3 and null.summary()["quarantined"] == [1]
    assert null.summary()["rollbacks"] == 1


def test_read_incidents_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "incidents.jsonl"
    feed(IncidentLog(path), [nan_loss(0)])
    with open(path, "a") as handle:
        handle.write('{"step": 9, "ki')
    assert [r["step"] for r in read_incidents(path)] == [0]
    assert read_incidents(tmp_path / "missing.jsonl") == []


def test_ids_are_plain_json_values():
    class NumpyLikeInt:
        def __index__(self):
            return 42

    obs = Observation(step=0, image_ids=[NumpyLikeInt(), "x"], annotation_ids=[7])
    assert obs.image_ids == (42, "x") and obs.annotation_ids == (7,)
