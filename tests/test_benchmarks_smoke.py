"""The benchmarks run end to end with the smallest settings and write the JSON they promise: the
single-process PyTorch ones (MindSpore's: test_benchmarks_smoke_mindspore; several processes:
test_benchmarks_smoke_distributed; three modules, so that `make test`'s two workers share them).

Each runs as a user runs it (a subprocess, `python benchmarks/NAME.py ...`). Nothing here looks at a
time or a speed: timing never goes in a unit test (the project's rule: speed is measured in benchmarks/, as ratios).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from benchmark_helpers import TINY, read, run_benchmark  # noqa: E402


def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    stdout = run_benchmark("throughput", *TINY, "--json-out", str(out))
    result = read(out)
    assert result["benchmark"] == "throughput"
    assert {"model", "batch", "size", "amp", "rounds", "block"} <= set(result["settings"])
    assert set(result["results"]) == {"plain", "nanguard"}
    for side in result["results"].values():
        assert side["steps"] == 1 and side["images_per_second"] > 0
    assert result["ratio_images_per_second"] > 0
    assert "nanguard/plain" in stdout


def test_guard_overhead_smoke(tmp_path):
    out = tmp_path / "guard_overhead.json"
    run_benchmark("guard_overhead", *TINY, "--snapshots", "1", "--json-out", str(out))
    result = read(out)
    assert result["benchmark"] == "guard_overhead"
    assert set(result["results"]) == {"unguarded", "guarded", "host_check", "anomaly"}
    for variant in result["results"].values():
        assert {"images_per_second", "time_ratio_median", "time_ratio_total", "block_seconds"} <= set(variant)
    assert result["results"]["unguarded"]["time_ratio_median"] == 1.0
    assert isinstance(result["overhead_guarded"], float)
    assert result["skipped_steps"] == {"unguarded": 0, "guarded": 0, "host_check": 0, "anomaly": 0}
    assert result["snapshot"]["every_steps"] > 0


def test_gpu_check_smoke(tmp_path):
    """The one-shot GPU script (issue #28) on the CPU: what is real here is checked, the CUDA-only sections
    say so instead of faking a result."""
    out = tmp_path / "gpu_check.json"
    stdout = run_benchmark("gpu_check", "--device", "cpu", "--tiny", "--steps", "3", "--out", str(out))
    result = read(out)
    assert result["benchmark"] == "gpu_check" and result["complete"]
    sections = result["sections"]
    assert list(sections) == ["host_syncs", "injection", "step_time_bf16", "step_time_fp16", "throughput",
                              "cuda_graph"]
    for name in ("host_syncs", "cuda_graph"):
        assert sections[name]["status"] == "skipped" and sections[name]["reason"] == "skipped: needs CUDA"
    scenarios = sections["injection"]["scenarios"]
    assert set(scenarios) == {"nan_image_bf16", "nan_image_fp16", "fp16_overflow"}
    for key, scenario in scenarios.items():
        assert scenario["status"] == "pass" and scenario["skipped"], (key, scenario)
        assert len(scenario["injected"]) == 1 and scenario["injected"][0]["step"] == 2
        for group in ("parameters", "bn_buffers", "optimizer", "lr_schedule"):
            assert scenario["state"][group]["identical"] and scenario["state"][group]["tensors"] > 0, (key, group)
    assert "nonfinite_loss" in scenarios["nan_image_bf16"]["kinds"]
    assert "nonfinite_loss" in scenarios["nan_image_fp16"]["kinds"]
    assert scenarios["nan_image_fp16"]["state"]["grad_scaler"] == {"tensors": 2, "identical": True, "differ": [],
                                                                  "differ_count": 0}
    overflow = scenarios["fp16_overflow"]
    assert overflow["scale_overflow"] and overflow["kinds"] == []  # the scaler's business, not an incident
    backoff = overflow["grad_scaler_backoff"]
    assert backoff["as_torch_does"] and backoff["after"] == backoff["before"] * backoff["backoff_factor"]
    for amp in ("bf16", "fp16"):
        timing = sections[f"step_time_{amp}"]
        assert timing["status"] == "measured" and timing["steps_per_side"] == 3  # the 1 % goal is the GPU's
        assert timing["ratio_guarded_over_plain_median"] > 0 and timing["ratio_guarded_over_plain_total"] > 0
    assert sections["throughput"]["ratio_images_per_second"] > 0
    assert sections["throughput"]["results"]["nanguard"]["steps"] == 3
    checks = {(c["section"], c["status"]) for c in result["checks"]}
    assert not any(status in ("error", "fail") for _, status in checks), result["checks"]
    assert result["summary"] == {"pass": 3, "measured": 3, "skipped": 2}
    assert "gpu_check" in stdout and "NaN image, bf16" in stdout


def test_fault_campaign_smoke(tmp_path):
    out = tmp_path / "fault_campaign.json"
    run_benchmark("fault_campaign", "--steps", "1", "--images", "2", "--val-images", "1", "--size", "64",
                  "--kinds", "loss_nan", "--workdir", str(tmp_path / "work"), "--plain-table",
                  "--json-out", str(out), "train.batch_size=1", "train.threads=1")
    result = read(out)
    assert result["benchmark"] == "fault_campaign"
    assert result["settings"]["specs"] == {"loss_nan": "loss_nan@0"}
    runs = {(r["name"], r["mode"]): r for r in result["runs"]}
    assert set(runs) == {("clean", "guarded"), ("clean", "unguarded"), ("loss_nan", "guarded"),
                         ("loss_nan", "unguarded")}
    for run in runs.values():
        assert {"completed", "weights_finite", "mAP50", "delta_mAP50", "skipped_steps", "rollbacks",
                "incidents", "seconds"} <= set(run)
        assert (Path(run["run_dir"]) / "config.yaml").is_file()
    # what the guard is for, on the one step there is: the NaN loss is skipped, not trained on
    assert runs[("loss_nan", "guarded")]["completed"] and runs[("loss_nan", "guarded")]["weights_finite"]
    assert runs[("loss_nan", "guarded")]["skipped_steps"] == 1
    assert runs[("loss_nan", "unguarded")]["weights_finite"] is False


def test_demo_vs_plain_smoke(tmp_path):
    from nanguard.data.synth import generate

    data = tmp_path / "data"
    generate(data, images=4, val_images=2, size=64, classes=3, seed=0, progress=False)
    out = tmp_path / "demo_vs_plain.json"
    stdout = run_benchmark("demo_vs_plain", "--steps", "1", "--data", str(data), "--threads", "1", "--plain-table",
                           "--json-out", str(out), "train.batch_size=2", "train.threads=1")
    result = read(out)
    assert result["benchmark"] == "demo_vs_plain"
    assert set(result["results"]) == {"plain", "nanguard"}
    for side in result["results"].values():
        assert side["steps"] == 1 and side["step_seconds"] > 0 and 0 <= side["mAP50"] <= 1
    assert result["results"]["nanguard"]["status"] == "completed"
    assert result["ratio_step_seconds"] > 0
    assert "nanguard/plain s/step" in stdout


def test_diagnosis_accuracy_smoke(tmp_path):
    out = tmp_path / "diagnosis_accuracy.json"
    stdout = run_benchmark("diagnosis_accuracy", "--kinds", "grad_nan", "--steps-at", "3", "--seeds", "0",
                           "--no-real", "--clean-steps", "4", "--clean-rounds", "1", "--size", "64", "--batch", "2", "--plain-table",
                           "--json-out", str(out))
    result = read(out)
    assert [(s["kind"], s["verdict"], s["right"]) for s in result["scenarios"]] == [("grad_nan", "transient", True)]
    assert result["overall_accuracy"] == 1.0 and result["clean_run"]["ratio_first_over_off"] > 0
    assert "diagnosis accuracy" in stdout


def test_own_loop_explain_smoke(tmp_path):
    out = tmp_path / "own_loop_explain.json"
    stdout = run_benchmark("own_loop_explain", "--kinds", "weight_bitflip,nan_pixels", "--steps-at", "3", "--seeds", "0",
                           "--rounds", "1", "--block", "2", "--plain-table", "--json-out", str(out))
    result = read(out)
    assert [(s["kind"], s["verdict"], s["right"]) for s in result["scenarios"]] == [
        ("weight_bitflip", "corrupted_weights", True), ("nan_pixels", "bad_image", True)]
    assert result["scenarios"][1]["image_ids"] == result["scenarios"][1]["expected_ids"] == ["3/3"]
    assert result["accuracy"] == 1.0 and result["clean_ratio"] > 0
    assert "own-loop diagnosis" in stdout


def test_demo_quality_smoke(tmp_path):
    from nanguard.data.synth import generate

    data = tmp_path / "data"
    generate(data, images=4, val_images=2, size=64, classes=3, seed=0, progress=False)
    out = tmp_path / "demo_quality.json"
    stdout = run_benchmark("demo_quality", "--seeds", "0", "1", "--threads", "1", "--steps", "1", "--plain-steps", "1",
                           "--data", str(data), "--plain-table", "--json-out", str(out), "train.batch_size=2",
                           "model.min_size=64", "model.max_size=64")
    result = read(out)
    assert result["benchmark"] == "demo_quality" and result["goal_met"] is False  # one step learns nothing
    assert [(r["seed"], r["threads"]) for r in result["runs"]] == [(0, 1), (1, 1)]
    for run in result["runs"]:
        assert run["status"] == "completed" and 0 <= run["mAP50"] <= 1 and run["plain_step_seconds"] > 0
        assert run["time_vs_budget"] > 0
    assert "goal (each >= 0.95 / 0.7" in stdout and "not met" in stdout
