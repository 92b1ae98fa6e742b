"""The distributed benchmark runs end to end with the smallest settings (two ranks, gloo) and writes the
JSON it promises (as test_benchmarks_smoke: a subprocess, no time or speed looked at)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from benchmark_helpers import read, run_benchmark  # noqa: E402


def test_distributed_overhead_smoke(tmp_path):
    out = tmp_path / "distributed_overhead.json"
    stdout = run_benchmark("distributed_overhead", "--steps", "2", "--rounds", "1", "--size", "64", "--batch", "1",
                           "--collective-reps", "5", "--plain-table", "--no-scale", "--json-out", str(out))
    result = read(out)
    assert result["nproc"] == 2 and result["ratio_guarded_over_unguarded"] > 0
    assert set(result["s_per_step"]) == {"guarded", "unguarded"} and len(result["collective_ms"]) == 4
    assert result["rollback_at_scale_seconds"] is None  # --no-scale
    assert "one all-reduce" in stdout
