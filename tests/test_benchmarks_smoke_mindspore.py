"""The MindSpore benchmarks run end to end with the smallest settings and write the JSON they promise
(as test_benchmarks_smoke: a subprocess each, no time or speed looked at)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from benchmark_helpers import read, run_benchmark  # noqa: E402


def test_mindspore_guard_overhead_smoke(tmp_path):
    pytest.importorskip("mindspore", reason="mindspore is not installed (make install installs it)")
    out = tmp_path / "mindspore_guard_overhead.json"
    stdout = run_benchmark("mindspore_guard_overhead", "--modes", "graph", "--batch", "2", "--size", "32", "--width", "8",
                           "--batches", "2", "--warmup", "0", "--rounds", "1", "--block", "1", "--fault-steps", "3",
                           "--fault-at", "1", "--plain-table", "--json-out", str(out))
    result = read(out)
    assert set(result["modes"]) == {"graph"} and set(result["modes"]["graph"]) == {"unguarded", "guarded"}
    faults = result["faults"]
    assert faults["GuardedTrainStep"]["nonfinite_weights"] == 0 and faults["GuardedTrainStep"]["skipped"] == 1
    assert faults["zoo-style (fixed scale 256, no skip)"]["nonfinite_weights"] > 0
    assert "GuardedTrainStep vs plain MindSpore step" in stdout


def test_mindspore_vs_torch_smoke(tmp_path):
    pytest.importorskip("mindspore", reason="mindspore is not installed (make install installs it)")
    out = tmp_path / "mindspore_vs_torch.json"
    stdout = run_benchmark("mindspore_vs_torch", "--batch", "1", "--size", "64", "--batches", "1", "--warmup", "0",
                           "--rounds", "1", "--block", "1", "--variants", "torch guarded,mindspore pynative guarded",
                           "--plain-table", "--json-out", str(out))
    result = read(out)
    assert set(result["results"]) == {"torch guarded", "mindspore pynative guarded"}
    assert result["results"]["torch guarded"]["time_ratio_median"] == 1.0
    assert "tiny Faster R-CNN train step" in stdout
