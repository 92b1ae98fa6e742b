"""What `GuardedTrainStep` costs per step in MindSpore, against the plain step it replaces (issue #15).

    python benchmarks/mindspore_guard_overhead.py               # CPU: a small conv net, batch 8, 64 px
    python benchmarks/mindspore_guard_overhead.py --rounds 20 --block 5

Both variants train their own copy of the same network (same seed) with the same optimizer on the same
preloaded batches, interleaved in blocks (rotating order), once in graph mode and once in PyNative:
- unguarded: value_and_grad of the summed loss components, `ops.clip_by_global_norm`, the optimizer
  (what `TrainOneStepCell` with a clip does; MindSpore's CPU has no overflow-skipping cell)
- guarded:   `nanguard.backends.mindspore.GuardedTrainStep` (every Parameter saved, each loss component,
  the gradients, BatchNorm statistics and the weights checked, spikes, clip, masked update, the step's
  numbers returned)

Then the same faults through both: a NaN pixel in one image of batch --fault-at, trained for
--fault-steps steps by the model zoo's way (a fixed loss scale of 256, the overflow flag computed and the
optimizer stepping anyway, as `official/cv/FasterRCNN` does; here the plain step with that scale) and by
`GuardedTrainStep`: the share of weights left non-finite at the end, and the steps skipped.

The network is a small residual conv net with BatchNorm and two loss components, not Faster R-CNN (the
MindSpore Faster R-CNN is not built yet). Goal on CPU: guarded within 5 % of unguarded. Prints a table
and writes JSON (--json-out): time ratios against unguarded (1.0 = same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="graph,pynative", help="comma-separated: graph, pynative")
    parser.add_argument("--optimizer", choices=["momentum", "adamw"], default="momentum")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="channels of the conv net (default 32)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--fault-steps", type=int, default=20, help="steps of the fault comparison (0: skip)")
    parser.add_argument("--fault-at", type=int, default=5, help="the step whose batch holds a NaN pixel")
    parser.add_argument("--plain-table", action="store_true")
    parser.add_argument("--json-out", default="bench-out/mindspore_guard_overhead.json")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"graph", "pynative"}:
        parser.error("--modes: choose from graph, pynative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ms = common.require_mindspore()
    import numpy as np
    from mindspore import Tensor, nn, ops

    from nanguard.backends.mindspore import GuardedTrainStep
    from nanguard.guard import GuardConfig

    class Block(nn.Cell):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(width, width, 3), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3), nn.BatchNorm2d(width)

        def construct(self, x):
            return ops.relu(x + self.bn2(self.conv2(ops.relu(self.bn1(self.conv1(x))))))

    class Net(nn.Cell):
        """conv-BN stem, 3 residual blocks (one strided), a classifier and a box-like regressor."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.stem = nn.SequentialCell([nn.Conv2d(3, width, 3, stride=2), nn.BatchNorm2d(width), nn.ReLU()])
            self.blocks = nn.SequentialCell([Block(width), nn.Conv2d(width, width, 3, stride=2), Block(width),
                                             Block(width)])
            self.cls, self.reg = nn.Dense(width, 4), nn.Dense(width, 4)

        def construct(self, x, labels, boxes):
            h = self.blocks(self.stem(x)).mean(axis=(2, 3))
            cls = ops.cross_entropy(self.cls(h), labels)
            reg = ops.smooth_l1_loss(self.reg(h), boxes, beta=1.0 / 9).mean()
            return cls, reg

    rng = np.random.default_rng(0)
    batches = [(Tensor(rng.normal(size=(args.batch, 3, args.size, args.size)).astype(np.float32)),
                Tensor(rng.integers(0, 4, size=args.batch).astype(np.int32)),
                Tensor(rng.normal(size=(args.batch, 4)).astype(np.float32))) for _ in range(args.batches)]

    def make(kind: str, scale: float = 1.0):
        ms.set_seed(0)
        net = Net(args.width)
        opt = (nn.Momentum(net.trainable_params(), 0.01, 0.9) if args.optimizer == "momentum"
               else nn.AdamWeightDecay(net.trainable_params(), 1e-3, weight_decay=1e-4))
        return GuardedTrainStep(net, opt, GuardConfig(clip_norm=10.0)) if kind == "guarded" \
            else common.mindspore_plain_step(net, opt, 10.0, scale)

    result = {"benchmark": "mindspore_guard_overhead", "machine": common.machine_info(), "mindspore": ms.__version__, "args": vars(args), "modes": {}}
    rows = []
    for mode in args.modes:
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
        steps = {kind: make(kind) for kind in ("unguarded", "guarded")}
        last: list = []

        def variant(kind: str):
            def step(i: int) -> None:
                out = steps[kind](*batches[i % len(batches)])
                last[:] = [out]
            return step

        def sync() -> None:
            if last:
                for tensor in (last[0] if isinstance(last[0], tuple) else (last[0],)):
                    tensor.asnumpy()

        print(f"{mode}:", file=sys.stderr)
        times = common.interleaved({k: variant(k) for k in steps}, rounds=args.rounds, block=args.block,
                                   warmup=args.warmup, sync=sync)
        summary = common.summarize(times, baseline="unguarded", block=args.block, batch_size=args.batch)
        result["modes"][mode] = summary
        for kind in steps:
            s = summary[kind]
            rows.append([f"{mode} {kind}", s["median_step_seconds"], s["images_per_second"],
                         s["time_ratio_total"], s["time_ratio_median"], s["cpu_time_ratio_median"]])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    if args.fault_steps:
        result["faults"] = fault_comparison(args, make, batches, ms, np, Tensor)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    common.print_table(f"GuardedTrainStep vs plain MindSpore step ({args.optimizer}, batch {args.batch}, "
                       f"{args.size} px, CPU)", ["variant", "s/step (median)", "img/s", "time ratio",
                                                 "ratio (median of rounds)", "cpu ratio (median)"],
                       rows, plain=args.plain_table)
    if args.fault_steps:
        common.print_table(f"A NaN pixel at step {args.fault_at}, {args.fault_steps} steps (graph mode)",
                           ["step", "weights non-finite at the end", "steps skipped", "loss, last step"],
                           [[name, f"{r['nonfinite_weights']:,} of {r['weights']:,}", r["skipped"], r["losses"][-1]]
                            for name, r in result["faults"].items()], plain=args.plain_table)
    common.write_json(args.json_out, result)
    return 0


def fault_comparison(args, make, batches, ms, np, Tensor) -> dict:
    """The model zoo's step (fixed loss scale 256, no skip) and GuardedTrainStep on the same faulty
    batches: how many weights end non-finite, how many steps were skipped."""
    from nanguard.guard import STEP_FIELDS

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    out = {}
    for name, step in (("zoo-style (fixed scale 256, no skip)", make("unguarded", 256.0)),
                       ("GuardedTrainStep", make("guarded"))):
        skipped, losses = 0, []
        for i in range(args.fault_steps):
            images, labels, boxes = batches[i % len(batches)]
            if i == args.fault_at:
                poisoned = images.asnumpy().copy()
                poisoned[0, 0, 3, 3] = np.nan
                images = Tensor(poisoned)
            result = step(images, labels, boxes)
            if isinstance(result, tuple):
                skipped += int(result[1].asnumpy()[STEP_FIELDS.index("applied")] < 0.5)
                losses.append(float(result[0].asnumpy().sum()))
            else:
                losses.append(float(result.asnumpy()))
        params = [p.asnumpy() for p in step.network.get_parameters()]
        out[name] = {"weights": int(sum(p.size for p in params)),
                     "nonfinite_weights": int(sum((~np.isfinite(p)).sum() for p in params)),
                     "skipped": skipped if isinstance(result, tuple) else None,
                     "losses": losses}
    return out


if __name__ == "__main__":
    common.run_main(main, __file__)
