"""The model zoo's behaviour against nanguard's on the tiny Faster R-CNN in MindSpore, the same faults
injected (issue #15): are the final weights finite, and what mAP50 does each reach?

    python benchmarks/mindspore_zoo_vs_guard.py                       # 200 demo steps, the default faults
    python benchmarks/mindspore_zoo_vs_guard.py --steps 400 --inject nan_input@100

Two `nanguard train --config demo backend=mindspore` runs on the same data, seed and faults:
- zoo-style: `guard.enabled=false`, the same step built without checks. The model zoo's FasterRCNN
  computes its overflow flag and steps anyway, with a fixed loss scale of 256; in float32 a power-of-two
  scale multiplies and divides exactly, so the step it takes is this one.
- nanguard: `GuardedTrainStep` and the policy.
Reported per run: weights finite, how many of the model's weights are NaN or Inf (from its last
checkpoint), mAP50 / mAP on the validation split, incidents, skipped steps. One run after the other
(a training cannot be interleaved without changing it); speed is not the point here. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DEFAULT_FAULTS = ("nan_input@50", "lr_spike@120:factor=100")
VARIANTS = {"zoo-style (no check, always steps)": ["guard.enabled=false"], "nanguard": []}


def nonfinite_weights(run: Path) -> tuple[int, int]:
    """(non-finite, all) elements of the model's weights in the run's newest checkpoint (not the
    optimizer's moments, not nanguard's own state)."""
    import numpy as np

    from nanguard.backends.mindspore.checkpoint import load_checkpoint

    newest = sorted((run / "checkpoints").glob("step_*.ckpt"))[-1]
    arrays, _ = load_checkpoint(newest)
    model = [v for k, v in arrays.items() if k.split(".")[0] in ("backbone", "rpn", "roi_heads")]
    return sum(int((~np.isfinite(v)).sum()) for v in model), sum(v.size for v in model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for both runs")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--inject", action="append", default=None, metavar="SPEC",
                        help=f"a fault (nanguard's --inject syntax); default: {' '.join(DEFAULT_FAULTS)}")
    parser.add_argument("--data", default=None, help="a synth-layout folder (default: the demo's generated data)")
    parser.add_argument("--keep", default=None, help="keep the run folders here (default: a temp folder)")
    parser.add_argument("--plain-table", action="store_true")
    parser.add_argument("--json-out", default="bench-out/mindspore_zoo_vs_guard.json")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    common.require_mindspore()
    faults = args.inject or list(DEFAULT_FAULTS)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="nanguard-zoo-"))
    results = {}
    for k, (name, extra) in enumerate(VARIANTS.items()):
        run = work / f"run{k}"
        result = common.train_demo(run, args.steps, ["backend=mindspore", f"train.checkpoint_every={args.steps}",
                                                     *extra, *args.overrides], data=args.data, injects=faults)
        if result is None:
            return 1
        result["nonfinite_weights"], result["weights"] = nonfinite_weights(run)
        results[name] = result
    rows = [[name, r["weights_finite"], f"{r['nonfinite_weights']:,} of {r['weights']:,}", r["mAP50"], r["mAP"],
             r["incidents"], r["skipped_steps"]] for name, r in results.items()]
    common.print_table(f"MindSpore tiny Faster R-CNN, {args.steps} demo steps, faults {' '.join(faults)} "
                       f"({common.machine_info()['device_name']})",
                       ["step", "weights finite", "non-finite weights", "mAP50", "mAP", "incidents", "skipped"],
                       rows, plain=args.plain_table)
    common.write_json(args.json_out, {"benchmark": "mindspore_zoo_vs_guard", "machine": common.machine_info(),
                                      "steps": args.steps, "faults": faults, "overrides": args.overrides,
                                      "results": results, "runs": str(work)})
    return 0


if __name__ == "__main__":
    common.run_main(main, __file__)
