"""What the guard costs per step, against the same step with no checks (issue #5).

    python benchmarks/guard_overhead.py                                   # CPU: tiny, batch 8, 128 px
    python benchmarks/guard_overhead.py --device cuda --model resnet50_fpn --batch 8 --size 800 --amp bf16 \
        --rounds 20 --block 5          # a 1 % goal needs more steps than the CPU default
    python benchmarks/guard_overhead.py --threads 1   # on a shared CPU: read the cpu-time columns

Every variant runs the model and its stepper's `step` on its own copy of the same model (same random
init), with the optimizer, LR schedule and GradScaler `nanguard train` builds, on the same preloaded batches,
interleaved in blocks (rotating order):
- unguarded:   `PlainStep`: backward, clip, step, as torchvision's reference runs it, without its
               per-step `loss.item()` (what guard.enabled=false trains with)
- guarded:     `Guard` (device-side checks, masked update, one-step-late observations, param check
               every guard.param_check_every steps)
- host_check:  unguarded + `loss.item()` and `math.isfinite` every step, skipping a non-finite loss
               (what torchvision's reference and most frameworks do: one host sync per step)
- anomaly:     unguarded inside `torch.autograd.detect_anomaly()` (forward and backward)
Also timed once, outside the loop: one rollback snapshot (a host copy of model, optimizer and schedule
state), which the guard takes every policy.snapshot_every steps, reported amortised per step.

Goal on a GPU (ResNet-50-FPN, batch 8, 800 px, bf16): guarded within 1 % of unguarded. Prints a table and
writes JSON (--json-out): time ratios against unguarded (1.0 = same; 1.05 = 5 % slower), by the wall
clock and by this process's CPU time (steadier on a shared machine: use --threads 1 there).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = ("unguarded", "guarded", "host_check", "anomaly")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.step_benchmark_parser(__doc__, "guard_overhead", "guard.param_check_every=1", warmup=2)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (unguarded is always run)")
    parser.add_argument("--snapshots", type=int, default=3, help="rollback snapshots to time (0: skip)")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = ["unguarded"] + [v for v in VARIANTS[1:] if v in chosen]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from nanguard.backends.torch.devicestate import LRSchedule
    from nanguard.backends.torch.guard import Guard
    from nanguard.backends.torch.backend import build_optimizer, pick_device
    from nanguard.backends.torch.step import PlainStep

    class HostCheckedStep(PlainStep):
        """The framework habit: read the loss on the host every step, skip the step if it is not finite."""

        def step(self, losses):
            total = sum(loss.detach().float() for loss in losses.values())
            if not math.isfinite(total.item()):  # the sync: the host waits for the whole forward pass
                self.optimizer.zero_grad(set_to_none=True)
                return []
            return super().step(losses)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cfg = common.bench_config(args.model, args.size, args.amp, args.batch, args.overrides)
    print(f"preparing {args.batches} batches of {args.batch} x {args.size} px on {device} ...", file=sys.stderr)
    batches = common.synthetic_batches(args.batches, args.batch, args.size, args.classes, device, args.seed)
    models = dict(zip(args.variants, common.build_models(cfg, args.classes, device, len(args.variants), args.seed)))
    steppers = {}
    for name, model in models.items():
        common_args = dict(scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
                           schedule=LRSchedule(cfg.train, device))
        if name == "guarded":
            steppers[name] = Guard(model, build_optimizer(cfg, model), config=cfg.guard, policy=cfg.policy,
                                   **common_args)
        else:
            plain = HostCheckedStep if name == "host_check" else PlainStep
            steppers[name] = plain(model, build_optimizer(cfg, model), clip_norm=cfg.guard.clip_norm, **common_args)
    skipped = dict.fromkeys(args.variants, 0)

    def make_step(name: str):
        model, stepper = models[name], steppers[name]

        def run(i: int) -> None:
            if name == "anomaly":
                with torch.autograd.detect_anomaly():
                    outcomes = common.model_step(model, stepper, batches, i, device=device, amp=args.amp)
            else:
                outcomes = common.model_step(model, stepper, batches, i, device=device, amp=args.amp)
            skipped[name] += sum(not o.observation.applied for o in outcomes)
        return run

    print(f"timing {', '.join(args.variants)}: {args.warmup} warm-up steps, then {args.rounds} rounds x "
          f"{args.block} steps each", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Aa]nomaly.*")
        seconds = common.interleaved({name: make_step(name) for name in args.variants}, rounds=args.rounds,
                                     block=args.block, warmup=args.warmup, sync=common.synchronizer(device))
    for name, stepper in steppers.items():
        skipped[name] += sum(not o.observation.applied for o in stepper.flush())
    summary = common.summarize(seconds, baseline="unguarded", block=args.block, batch_size=args.batch)

    snapshot = None
    if args.snapshots and "guarded" in steppers:
        sync, times = common.synchronizer(device), []
        for _ in range(args.snapshots):
            sync()
            started = time.perf_counter()
            steppers["guarded"].device_step.capture()  # what the guard does every policy.snapshot_every steps
            times.append(time.perf_counter() - started)
        every = cfg.policy.snapshot_every
        per_capture = statistics.median(times)
        snapshot = {"seconds": per_capture, "every_steps": every,
                    "amortised_fraction_of_step": per_capture / every / summary["unguarded"]["median_step_seconds"]}

    labels = {"unguarded": "plain step (PlainStep)", "guarded": "guarded (Guard)",
              "host_check": "unguarded + loss.item() check", "anomaly": "unguarded + detect_anomaly"}
    rows = []
    for name in args.variants:
        s = summary[name]
        rows.append([labels[name], s["steps"], s["images_per_second"], s["median_step_seconds"], s["time_ratio_median"],
                     f"{s['time_ratio_min']:.3f}-{s['time_ratio_max']:.3f}", s["time_ratio_total"],
                     s["cpu_time_ratio_median"], f"{(s['time_ratio_median'] - 1) * 100:+.1f}%",
                     f"{(s['cpu_time_ratio_median'] - 1) * 100:+.1f}%"])
    title = (f"guard overhead: {args.model}, batch {args.batch}, {args.size} px, amp {args.amp}, "
             f"{common.machine_info(device.type)['device_name']}, {torch.get_num_threads()} threads")
    columns = ["variant", "steps", "img/s", "median s/step", "time ratio (median)", "range", "time ratio (total)",
               "cpu-time ratio (median)", "overhead", "overhead (cpu)"]
    if device.type != "cpu":  # host CPU time says nothing about a GPU step
        columns, rows = columns[:7] + columns[8:9], [row[:7] + row[8:9] for row in rows]
    common.print_table(title, columns, rows, plain=args.plain_table)
    if snapshot:
        print(f"rollback snapshot: {snapshot['seconds']:.3f} s each, every {snapshot['every_steps']} steps = "
              f"{snapshot['amortised_fraction_of_step'] * 100:.2f}% of an unguarded step, amortised "
              "(not in the table unless a variant ran that many steps)")

    result = {
        "benchmark": "guard_overhead",
        "machine": common.machine_info(device.type),
        "settings": {"device": device.type, "model": args.model, "batch": args.batch, "size": args.size,
                     "amp": args.amp, "classes": args.classes, "batches": args.batches, "warmup": args.warmup,
                     "rounds": args.rounds, "block": args.block, "seed": args.seed, "overrides": args.overrides,
                     "variants": args.variants, "optimizer": f"{cfg.train.optimizer} fused={cfg.train.fused}",
                     "param_check_every": cfg.guard.param_check_every},
        "results": summary,
        "overhead_guarded": summary["guarded"]["time_ratio_median"] - 1 if "guarded" in summary else None,
        "overhead_guarded_cpu": summary["guarded"]["cpu_time_ratio_median"] - 1 if "guarded" in summary else None,
        "skipped_steps": skipped,
        "snapshot": snapshot,
    }
    common.write_json(args.json_out, result)
    return 0


if __name__ == "__main__":
    common.run_main(main, __file__)
