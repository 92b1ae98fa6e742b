"""Speed and peak memory of `nanguard audit` against pycocotools merely loading the same file.

    python benchmarks/audit_speed.py --annotations 1000000 [--repeat 3] [--workdir /tmp/x] [--json-out bench-out/audit_speed.json]

Builds a COCO file by replicating coco_tiny's val records (segmentation included) with new ids, then runs,
each as its own process (so max RSS is that process's alone): pycocotools.coco.COCO(file), `nanguard
audit` on it (all annotation checks, no images), `nanguard audit` on a copy with a few NaN / Infinity
literals (the tolerant path), and `audit_and_clean` (what training calls: full records kept, cleaned
dict built). Prints a table with ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = Path(os.environ.get("NANGUARD_COCO_TINY", REPO.parent / "shared/data/coco_tiny"))


def build(source: Path, out: Path, n_annotations: int) -> None:
    """Write `out` with `n_annotations` annotations cycled from `source`, images replicated to match."""
    coco = json.loads(source.read_text())
    images, annotations = coco["images"], coco["annotations"]
    per_image: dict[int, list[dict]] = {}
    for ann in annotations:
        per_image.setdefault(ann["image_id"], []).append(ann)
    copies = -(-n_annotations // len(annotations))
    next_image_id, next_ann_id, written = 1, 1, 0
    with out.open("w") as handle:
        handle.write('{"info": {"description": "nanguard audit benchmark"}, "categories": ')
        handle.write(json.dumps(coco["categories"]))
        handle.write(', "images": [')
        first = True
        for copy in range(copies):
            for index, image in enumerate(images):
                record = dict(image, id=next_image_id + copy * len(images) + index)
                handle.write(("" if first else ",") + json.dumps(record))
                first = False
        handle.write('], "annotations": [')
        first = True
        for copy in range(copies):
            for index, image in enumerate(images):
                for ann in per_image.get(image["id"], []):
                    if written == n_annotations:
                        break
                    record = dict(ann, id=next_ann_id, image_id=next_image_id + copy * len(images) + index)
                    next_ann_id += 1
                    written += 1
                    handle.write(("" if first else ",") + json.dumps(record))
                    first = False
        handle.write("]}\n")


def add_literals(source: Path, out: Path, count: int = 5) -> None:
    """A copy with NaN / Infinity literals (as Python's json writes them) in the first coordinate of
    `count` boxes spread evenly over the annotations, the last one near the end (the worst case for
    the tolerant path, which scans from the first literal and restores up to the last)."""
    data = source.read_bytes()
    start = data.index(b'"annotations": [')
    result, cursor = bytearray(data[:start]), start
    literals = [b"NaN", b"Infinity", b"-Infinity"]
    span = len(data) - start
    for i in range(count):
        target = start + i * span // count + (span // count - 2000 if i == count - 1 else 0)
        at = data.index(b'"bbox": [', max(cursor, target)) + len(b'"bbox": [')
        end = data.index(b",", at)
        result += data[cursor:at] + literals[i % 3]
        cursor = end
    result += data[cursor:]
    out.write_bytes(bytes(result))


def measure(command: list[str], repeat: int = 1) -> dict:
    """Best of `repeat` runs: the fastest wall time, and the largest max RSS seen."""
    runs = [measure_once(command) for _ in range(repeat)]
    best = min(runs, key=lambda run: run["seconds"])
    return {**best, "max_rss_mb": max(run["max_rss_mb"] for run in runs), "all_seconds": [r["seconds"] for r in runs]}


def measure_once(command: list[str]) -> dict:
    """Wall time and max RSS of one child process (RUSAGE_CHILDREN of a fresh wrapper, so it is this one)."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "dt = time.perf_counter() - t\n"
        "print(rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    rc, seconds, max_rss_kib = out.stdout.split()
    return {"rc": int(rc), "seconds": float(seconds), "max_rss_mb": int(max_rss_kib) / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=int, default=1_000_000)
    parser.add_argument("--workdir", default=None, help="where the generated files go (default: a temp folder)")
    parser.add_argument("--json-out", default="bench-out/audit_speed.json")
    parser.add_argument("--skip-pycocotools", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per command, best time kept (a shared machine is noisy; default 1)")
    args = parser.parse_args(argv)

    source = COCO_TINY / "annotations/instances_val2017.json"
    if not source.is_file():
        print(f"coco_tiny not found at {COCO_TINY} (set NANGUARD_COCO_TINY)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nanguard-audit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    clean_file = workdir / f"coco_{args.annotations}.json"
    nan_file = workdir / f"coco_{args.annotations}_nan.json"
    t = time.perf_counter()
    if not clean_file.exists():
        build(source, clean_file, args.annotations)
    if not nan_file.exists():
        add_literals(clean_file, nan_file)
    print(f"files ready in {time.perf_counter() - t:.1f} s: {clean_file} ({clean_file.stat().st_size / 1e6:.0f} MB)")

    env_python = [sys.executable]
    os.environ["PYTHONPATH"] = str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    runs = {}
    if not args.skip_pycocotools:
        runs["pycocotools COCO(file)"] = measure(env_python + ["-c", "import sys; from pycocotools.coco import COCO; COCO(sys.argv[1])", str(clean_file)], args.repeat)
    runs["nanguard audit"] = measure(env_python + ["-m", "nanguard.cli", "audit", str(clean_file), "--quiet"], args.repeat)
    runs["nanguard audit (NaN literals)"] = measure(env_python + ["-m", "nanguard.cli", "audit", str(nan_file), "--quiet"], args.repeat)
    runs["audit_and_clean (training path)"] = measure(env_python + ["-c", "import sys; from nanguard.audit import audit_and_clean; audit_and_clean(sys.argv[1])", str(clean_file)], args.repeat)
    runs["audit_and_clean (NaN literals)"] = measure(env_python + ["-c", "import sys; from nanguard.audit import audit_and_clean; audit_and_clean(sys.argv[1])", str(nan_file)], args.repeat)
    runs["nanguard audit coco_tiny (startup)"] = measure(env_python + ["-m", "nanguard.cli", "audit", str(source), "--quiet"], args.repeat)

    base = runs.get("pycocotools COCO(file)")
    print(f"\n{args.annotations:,} annotations, {clean_file.stat().st_size / 1e6:.0f} MB, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'run':34s} {'rc':>3s} {'seconds':>9s} {'max RSS MB':>11s} {'time ratio':>11s} {'mem ratio':>10s}")
    for name, run in runs.items():
        ratio_t = f"{run['seconds'] / base['seconds']:.3f}" if base else "-"
        ratio_m = f"{run['max_rss_mb'] / base['max_rss_mb']:.3f}" if base else "-"
        if base:
            run["time_ratio"], run["memory_ratio"] = run["seconds"] / base["seconds"], run["max_rss_mb"] / base["max_rss_mb"]
        print(f"{name:34s} {run['rc']:>3d} {run['seconds']:>9.2f} {run['max_rss_mb']:>11.0f} {ratio_t:>11s} {ratio_m:>10s}")

    result = {
        "annotations": args.annotations,
        "file_mb": clean_file.stat().st_size / 1e6,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "repeat": args.repeat,
        "runs": runs,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
