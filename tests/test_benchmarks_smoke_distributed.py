"""The distributed benchmark runs end to end with the smallest settings (`--nproc 1`: the launcher, the
collectives, the tables) and writes the JSON it promises (as test_benchmarks_smoke: a subprocess, no time or speed looked at)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from benchmark_helpers import read, run_benchmark  # noqa: E402


def test_distributed_overhead_smoke(tmp_path):
    out = tmp_path / "distributed_overhead.json"
    # one process (each launch of two ranks costs ~16 s of CPU here; test_distributed has the two-rank runs)
    stdout = run_benchmark("distributed_overhead", "--nproc", "1", "--steps", "2", "--rounds", "1", "--size", "64",
                           "--batch", "1", "--collective-reps", "5", "--plain-table", "--no-scale", "--json-out", str(out))
    result = read(out)
    assert result["nproc"] == 1 and result["ratio_guarded_over_unguarded"] > 0
    assert set(result["s_per_step"]) == {"guarded", "unguarded"} and len(result["collective_ms"]) == 4
    assert result["rollback_at_scale_seconds"] is None  # --no-scale
    assert "one all-reduce" in stdout
