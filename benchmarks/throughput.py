"""Training images/s: nanguard's guarded step against a plain torchvision-reference loop (issue #3).

    python benchmarks/throughput.py                                   # CPU: tiny, batch 8, 128 px
    python benchmarks/throughput.py --device cuda --model resnet50_fpn --batch 8 --size 800 --amp bf16
    python benchmarks/throughput.py --threads 1       # on a shared CPU: read the cpu-time columns

Both sides train the same model (same random init, two copies) on the same batches, in one process,
interleaved in blocks (rotating order) so that other load on the machine hits both alike:
- nanguard: the model and `Guard.step`, with the optimizer, LR schedule and GradScaler `nanguard train` builds
  (fused SGD with a device-side LR), guard settings from the config;
- plain: torchvision's detection reference loop: forward, sum the losses, `loss.item()` (the reference
  logs it and exits on a non-finite value), zero_grad, backward, `clip_grad_norm_`, `optimizer.step()`
  (plain `torch.optim.SGD`, its default implementation), a linear warm-up scheduler step.
Batches are nanguard's synthetic shapes rendered at --size px and put on the device once, before
timing: data loading and host-to-device copies are measured on neither side.

Prints a table and writes JSON (--json-out) with the machine, the settings, the block times and the
ratio nanguard/plain of images per second (1.0 = as fast; below 1 = slower), by the wall clock and by
this process's CPU time (steadier on a machine that other processes share: use --threads 1 there).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.step_benchmark_parser(__doc__, "throughput", "guard.clip_norm=0", warmup=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from nanguard.backends.torch.devicestate import LRSchedule
    from nanguard.backends.torch.guard import Guard
    from nanguard.backends.torch.backend import build_optimizer, pick_device
    from nanguard.backends.torch.step import autocast

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cfg = common.bench_config(args.model, args.size, args.amp, args.batch, args.overrides)
    print(f"preparing {args.batches} batches of {args.batch} x {args.size} px on {device} ...", file=sys.stderr)
    batches = common.synthetic_batches(args.batches, args.batch, args.size, args.classes, device, args.seed)
    guarded_model, plain_model = common.build_models(cfg, args.classes, device, 2, args.seed)

    # nanguard: what `nanguard train` builds
    optimizer = build_optimizer(cfg, guarded_model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    guard = Guard(guarded_model, optimizer, scaler=scaler, config=cfg.guard, policy=cfg.policy,
                  schedule=LRSchedule(cfg.train, device))

    outcomes = []

    def nanguard_step(i: int) -> None:
        outcomes.extend(common.model_step(guarded_model, guard, batches, i, device=device, amp=args.amp))

    # plain: torchvision's references/detection/engine.py train_one_epoch
    params = [p for p in plain_model.parameters() if p.requires_grad]
    plain_optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                      weight_decay=cfg.train.weight_decay)
    warmup = max(1, cfg.train.warmup_steps)
    plain_warmup = torch.optim.lr_scheduler.LinearLR(plain_optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    plain_scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    clip = cfg.guard.clip_norm if cfg.guard.clip_norm > 0 else math.inf
    plain_nonfinite = [0]

    def plain_step(i: int) -> None:
        images, targets, _ = batches[i % len(batches)]
        with autocast(device, args.amp):
            loss_dict = plain_model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()  # the reference's sync: it logs the value and exits if not finite
        if not math.isfinite(loss_value):
            plain_nonfinite[0] += 1
        plain_optimizer.zero_grad()
        if plain_scaler is not None:
            plain_scaler.scale(losses).backward()
            plain_scaler.unscale_(plain_optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
            plain_scaler.step(plain_optimizer)
            plain_scaler.update()
        else:
            losses.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            plain_optimizer.step()
        plain_warmup.step()

    print(f"timing: {args.warmup} warm-up steps, then {args.rounds} rounds x {args.block} steps per side",
          file=sys.stderr)
    seconds = common.interleaved({"plain": plain_step, "nanguard": nanguard_step}, rounds=args.rounds,
                                 block=args.block, warmup=args.warmup, sync=common.synchronizer(device))
    outcomes.extend(guard.flush())
    summary = common.summarize(seconds, baseline="plain", block=args.block, batch_size=args.batch)
    plain, ours = summary["plain"], summary["nanguard"]
    ratio = ours["images_per_second"] / plain["images_per_second"]
    ratio_median = 1.0 / ours["time_ratio_median"]
    cpu_ratio_median = 1.0 / ours["cpu_time_ratio_median"]

    title = (f"training throughput: {args.model}, batch {args.batch}, {args.size} px, amp {args.amp}, "
             f"{common.machine_info(device.type)['device_name']}, {torch.get_num_threads()} threads")
    rows = [[label, s["steps"], s["images_per_second"], s["median_step_seconds"], s["cpu_images_per_second"],
             s["images_per_second"] / plain["images_per_second"], 1.0 / s["time_ratio_median"],
             f"{1 / s['time_ratio_max']:.3f}-{1 / s['time_ratio_min']:.3f}", 1.0 / s["cpu_time_ratio_median"]]
            for label, s in (("plain torchvision loop", plain), ("nanguard model + Guard.step", ours))]
    columns = ["loop", "steps", "img/s", "median s/step", "img/s (cpu time)", "ratio (total)",
               "ratio (median of rounds)", "range", "ratio (cpu time, median)"]
    if device.type != "cpu":  # host CPU time says nothing about a GPU step
        columns, rows = columns[:4] + columns[5:8], [row[:4] + row[5:8] for row in rows]
    common.print_table(title, columns, rows, plain=args.plain_table)
    print(f"nanguard/plain img/s: {ratio:.3f} over all blocks, {ratio_median:.3f} median of per-round ratios, "
          f"{cpu_ratio_median:.3f} on CPU time")

    result = {
        "benchmark": "throughput",
        "machine": common.machine_info(device.type),
        "settings": {"device": device.type, "model": args.model, "batch": args.batch, "size": args.size,
                     "amp": args.amp, "classes": args.classes, "batches": args.batches, "warmup": args.warmup,
                     "rounds": args.rounds, "block": args.block, "seed": args.seed, "overrides": args.overrides,
                     "optimizer_nanguard": f"{cfg.train.optimizer} fused={cfg.train.fused}",
                     "optimizer_plain": "torch.optim.SGD (default implementation)",
                     "clip_norm": cfg.guard.clip_norm},
        "results": summary,
        "ratio_images_per_second": ratio,
        "ratio_images_per_second_median": ratio_median,
        "ratio_images_per_second_cpu_median": cpu_ratio_median,
        "plain_nonfinite_losses": plain_nonfinite[0],
        "nanguard_skipped_steps": sum(not o.observation.applied for o in outcomes),
    }
    common.write_json(args.json_out, result)
    return 0


if __name__ == "__main__":
    common.run_main(main, __file__)
