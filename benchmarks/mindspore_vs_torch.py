"""The `tiny` Faster R-CNN's guarded train step in MindSpore (graph mode, PyNative) against the PyTorch
backend's, and MindSpore guarded against unguarded, on the CPU (issue #15).

    python benchmarks/mindspore_vs_torch.py                  # batch 8, 128 px (the demo's)
    python benchmarks/mindspore_vs_torch.py --rounds 10 --block 3

Every variant starts from the same weights (the PyTorch model's, converted) and trains on the same
preloaded batches of generated shapes, interleaved in blocks (rotating order):
- torch guarded:        `nanguard.backends.torch.guard.Guard` on torchvision's tiny Faster R-CNN (the
                        PyTorch backend's step; the demo's optimizer and schedule)
- mindspore graph guarded / plain:   the MindSpore tiny model, `GuardedTrainStep` / value_and_grad + clip
                        + Momentum, compiled (graph mode)
- mindspore pynative guarded:        `GuardedTrainStep` in PyNative
The models differ in one respect that costs time: MindSpore's proposals and RoI sampling have static
shapes (a fixed number of slots), torchvision's are as many as there are. Prints a table (images/s, time
ratio against torch guarded, and MindSpore guarded against plain in graph mode) and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = ("torch guarded", "mindspore graph guarded", "mindspore graph plain", "mindspore pynative guarded")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--max-boxes", type=int, default=8, help="ground-truth slots per image (default 8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--plain-table", action="store_true")
    parser.add_argument("--json-out", default="bench-out/mindspore_vs_torch.json")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or "torch guarded" not in args.variants:
        parser.error(f"--variants: a subset of {', '.join(VARIANTS)} that holds 'torch guarded'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ms = common.require_mindspore()
    import numpy as np
    import torch
    from mindspore import Tensor, nn

    from nanguard.backends.mindspore import GuardedTrainStep
    from nanguard.backends.mindspore.batch import to_static
    from nanguard.backends.mindspore.convert import load_arrays, torch_to_mindspore
    from nanguard.backends.mindspore.model import FasterRCNN
    from nanguard.backends.torch.devicestate import LRSchedule
    from nanguard.backends.torch.guard import Guard
    from nanguard.backends.torch.backend import build_optimizer
    from nanguard.guard import GuardConfig

    cfg = common.bench_config("tiny", args.size, "off", args.batch)
    device = torch.device("cpu")
    batches = common.synthetic_batches(args.batches, args.batch, args.size, 3, device)
    [torch_model] = common.build_models(cfg, 3, device, 1)
    arrays = torch_to_mindspore({k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    optimizer = build_optimizer(cfg, torch_model)
    guard = Guard(torch_model, optimizer, config=cfg.guard, policy=cfg.policy, schedule=LRSchedule(cfg.train, device))

    static = []
    for images, targets, _ in batches:
        s = to_static([(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in images],
                      [t["boxes"].numpy() for t in targets], [t["labels"].numpy() for t in targets],
                      args.size, args.size, args.max_boxes)
        static.append((Tensor(s.images), Tensor(s.boxes), Tensor(s.labels), Tensor(s.valid)))
    rng = np.random.default_rng(0)

    def mindspore_step(guarded: bool):
        ms.set_seed(0)
        model = FasterRCNN(cfg.model, 3, (args.size, args.size), max_boxes=args.max_boxes)
        load_arrays(model, arrays)
        opt = nn.Momentum(model.trainable_params(), learning_rate=cfg.train.lr, momentum=cfg.train.momentum,
                          weight_decay=cfg.train.weight_decay)
        # as the run builds it: the weights checked every guard.param_check_every steps (check_weights)
        step = GuardedTrainStep(model, opt, GuardConfig(clip_norm=cfg.guard.clip_norm),
                                param_check_every=cfg.guard.param_check_every) if guarded \
            else common.mindspore_plain_step(model, opt, cfg.guard.clip_norm)
        return model, step

    last: list = []
    variants = {}
    if "torch guarded" in args.variants:
        def torch_step(i: int) -> None:
            common.model_step(torch_model, guard, batches, i, device=device, amp="off")
        variants["torch guarded"] = torch_step
    for name in args.variants:
        if not name.startswith("mindspore"):
            continue
        mode = ms.GRAPH_MODE if " graph " in name else ms.PYNATIVE_MODE
        ms.set_context(mode=mode, device_target="CPU")  # GuardedTrainStep's skip_with follows the mode
        model, step = mindspore_step(guarded=name.endswith("guarded"))

        def run(i: int, step=step, model=model, mode=mode) -> None:
            ms.set_context(mode=mode, device_target="CPU")
            noise = Tensor(rng.random((args.batch, model.noise_size())).astype(np.float32))
            out = step(*static[i % len(static)], noise)
            if isinstance(step, GuardedTrainStep) and i % cfg.guard.param_check_every == 0:
                out = (out[0], step.check_weights(out[1]))
            last[:] = [out]
        variants[name] = run

    def sync() -> None:
        for out in last:
            for tensor in (out if isinstance(out, tuple) else (out,)):
                tensor.asnumpy()

    times = common.interleaved(variants, rounds=args.rounds, block=args.block, warmup=args.warmup, sync=sync)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    summary = common.summarize(times, baseline="torch guarded", block=args.block, batch_size=args.batch)
    rows = [[name, s["median_step_seconds"], s["images_per_second"], s["time_ratio_total"], s["time_ratio_median"],
             s["cpu_time_ratio_median"]] for name, s in summary.items()]
    common.print_table(f"tiny Faster R-CNN train step, batch {args.batch}, {args.size} px, CPU "
                       f"({common.machine_info()['device_name']})",
                       ["variant", "s/step (median)", "img/s", "time / torch guarded", "(median of rounds)",
                        "(cpu time, median)"], rows, plain=args.plain_table)
    result = {"benchmark": "mindspore_vs_torch", "machine": common.machine_info(), "mindspore": ms.__version__,
              "settings": {k: v for k, v in vars(args).items()}, "results": summary}
    if {"mindspore graph guarded", "mindspore graph plain"} <= set(times):
        ratio = common.summarize({k: times[k] for k in ("mindspore graph plain", "mindspore graph guarded")},
                                 baseline="mindspore graph plain", block=args.block, batch_size=args.batch)
        result["mindspore_guarded_over_plain"] = ratio["mindspore graph guarded"]
        g = ratio["mindspore graph guarded"]
        print(f"MindSpore graph mode, guarded / plain step time: {g['time_ratio_total']:.3f} total, "
              f"{g['time_ratio_median']:.3f} median of rounds, {g['cpu_time_ratio_median']:.3f} on CPU time")
    common.write_json(args.json_out, result)
    return 0


if __name__ == "__main__":
    common.run_main(main, __file__)
