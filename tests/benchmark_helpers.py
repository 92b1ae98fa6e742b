"""What the benchmark smoke tests share: a benchmark run as a user runs it, and its JSON read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--batch", "1", "--size", "64", "--batches", "1", "--warmup", "0", "--rounds", "1",
        "--block", "1", "--threads", "1", "--plain-table"]
MACHINE_KEYS = {"cpu_count", "torch", "torchvision", "device_name"}


def run_benchmark(name: str, *argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *argv], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def read(path: Path) -> dict:
    assert path.is_file(), f"{path} not written"
    result = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert MACHINE_KEYS <= set(result["machine"]), result["machine"]
    return result
