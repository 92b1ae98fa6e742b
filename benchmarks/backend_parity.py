"""Does the MindSpore backend learn as the PyTorch backend does? `nanguard train` with the demo config on
each backend for the same steps (same seed, same generated data, same schedule), then the same COCO
evaluation (issue #15: mAP50 within 0.05 at the same steps).

    python benchmarks/backend_parity.py --steps 200
    python benchmarks/backend_parity.py --steps 2200          # the demo's length: hours on a 2-core CPU

The runs are the real command (`python -m nanguard train`), one after the other (not interleaved: a
training cannot be cut into blocks without changing it); the MindSpore one in graph mode. Reported per
backend: mAP50, mAP, training seconds and s/step (final.json's train_seconds), weights finite, incidents.
Prints a table and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BACKENDS = ("torch", "mindspore")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for both runs")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", default=None, help="a synth-layout folder (default: the demo's generated data)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="which to run (default: both)")
    parser.add_argument("--keep", default=None, help="keep the run folders here (default: a temp folder)")
    parser.add_argument("--plain-table", action="store_true")
    parser.add_argument("--json-out", default="bench-out/backend_parity.json")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="nanguard-parity-"))
    results = {}
    for backend in args.backends.split(","):
        if backend not in BACKENDS:
            parser.error(f"--backends: {backend!r} is not one of {', '.join(BACKENDS)}")
        result = common.train_demo(work / backend, args.steps, [f"backend={backend}", *args.overrides], data=args.data)
        if result is None:
            return 1
        results[backend] = result
    rows = [[b, r["mAP50"], r["mAP"], r["s_per_step"], r["train_seconds"], r["weights_finite"], r["incidents"]]
            for b, r in results.items()]
    common.print_table(f"the demo config on each backend, {args.steps} steps ({common.machine_info()['device_name']})",
                       ["backend", "mAP50", "mAP", "s/step", "train s", "weights finite", "incidents"], rows,
                       plain=args.plain_table)
    gap = None
    if all(b in results and results[b]["mAP50"] is not None for b in BACKENDS):
        gap = results["mindspore"]["mAP50"] - results["torch"]["mAP50"]
        print(f"mAP50 mindspore - torch: {gap:+.3f} (goal: within 0.05)")
    common.write_json(args.json_out, {"benchmark": "backend_parity", "machine": common.machine_info(),
                                      "steps": args.steps, "overrides": args.overrides, "results": results,
                                      "map50_gap": gap, "runs": str(work)})
    return 0


if __name__ == "__main__":
    common.run_main(main, __file__)
