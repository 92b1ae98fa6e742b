"""Is the demo above its bar whatever the seed and thread count, within the plain loop's time?

    python benchmarks/demo_quality.py                                # seeds 0 1 x threads 1 2: 4 full demo runs
    python benchmarks/demo_quality.py --seeds 0 --threads 1 --steps 200 train.lr=0.03

Runs `nanguard train --config demo` (the whole demo, each in its own process, explain off) for every
seed x thread count, one after the other, and reads mAP50 / mAP and the training seconds from its run
folder. In the same run it times a plain torchvision loop (`demo_vs_plain.train_plain`, the same data,
batch and schedule) for --plain-steps steps at each thread count, and sets each demo run's training time
against the time the plain loop takes for --plain-budget steps (2,523: the steps in which it reaches
mAP50 0.978 / mAP 0.780 on these data). Goal (issue "the demo above its bar"): every run mAP50 >= 0.95
and mAP >= 0.70, the mean >= 0.97 / 0.74, and no run slower than the plain loop's budget. Prints a table
and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

GOAL_EACH = (0.95, 0.70)
GOAL_MEAN = (0.97, 0.74)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="train.threads values (default 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="demo steps (default: the demo's train.steps)")
    parser.add_argument("--plain-steps", type=int, default=100, help="plain-loop steps timed per thread count")
    parser.add_argument("--plain-budget", type=int, default=2523,
                        help="plain-loop steps whose time is the demo's budget (default 2523)")
    parser.add_argument("--data", default=None, help="a synth-layout folder (default: the demo's generated shapes)")
    parser.add_argument("--plain-table", action="store_true")
    parser.add_argument("--json-out", default="bench-out/demo_quality.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every demo run")
    return parser.parse_args(argv)


def plain_step_seconds(threads: int, steps: int, data: str | None, overrides: list[str]) -> float:
    """s/step of the plain torchvision loop at `threads`, over `steps` steps of the demo's data."""
    import torch

    from demo_vs_plain import train_plain
    from nanguard.config import load_config
    from nanguard.run.data import resolve_data

    torch.set_num_threads(threads)
    cfg = load_config("demo", [f"train.steps={steps}", *([f"data.root={data}"] if data else []), *overrides])
    result = train_plain(cfg, resolve_data(cfg, quiet=True), steps, torch.device("cpu"))
    return result["train_seconds"] / steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nanguard.config import load_config

    steps = args.steps or load_config("demo", args.overrides).train.steps
    plain = {threads: plain_step_seconds(threads, args.plain_steps, args.data, args.overrides) for threads in args.threads}
    runs = []
    with tempfile.TemporaryDirectory(prefix="demo_quality-") as tmp:
        for seed in args.seeds:
            for threads in args.threads:
                run = Path(tmp) / f"seed{seed}-threads{threads}"
                result = common.train_demo(run, steps, [f"seed={seed}", f"train.threads={threads}", *args.overrides],
                                           data=args.data)
                if result is None:
                    raise SystemExit(f"the demo run seed={seed} threads={threads} failed (its stderr is above)")
                budget = plain[threads] * args.plain_budget
                runs.append({"seed": seed, "threads": threads, **result, "plain_step_seconds": plain[threads],
                             "plain_budget_seconds": budget, "time_vs_budget": result["train_seconds"] / budget})
                print(f"seed {seed}, {threads} thread(s): mAP50 {result['mAP50']:.3f}, mAP {result['mAP']:.3f}, "
                      f"{result['train_seconds']:.0f} s", file=sys.stderr)
    mean50 = statistics.mean(r["mAP50"] for r in runs)
    mean = statistics.mean(r["mAP"] for r in runs)
    each_ok = all(r["mAP50"] >= GOAL_EACH[0] and r["mAP"] >= GOAL_EACH[1] for r in runs)
    time_ok = all(r["time_vs_budget"] <= 1.0 for r in runs)
    goal = each_ok and mean50 >= GOAL_MEAN[0] and mean >= GOAL_MEAN[1] and time_ok
    columns = ["seed", "threads", "mAP50", "mAP", "train s", "s/step", "plain s/step",
               f"train s / plain x {args.plain_budget}"]
    rows = [[r["seed"], r["threads"], r["mAP50"], r["mAP"], r["train_seconds"], r["s_per_step"],
             r["plain_step_seconds"], r["time_vs_budget"]] for r in runs]
    common.print_table(f"the demo, {steps} steps, {common.machine_info()['device_name']}", columns, rows,
                       plain=args.plain_table)
    print(f"mean mAP50 {mean50:.3f}, mAP {mean:.3f}; goal (each >= {GOAL_EACH[0]} / {GOAL_EACH[1]}, mean >= "
          f"{GOAL_MEAN[0]} / {GOAL_MEAN[1]}, within the plain loop's {args.plain_budget} steps): "
          f"{'met' if goal else 'not met'}")
    common.write_json(args.json_out, {
        "benchmark": "demo_quality", "machine": common.machine_info("cpu"),
        "settings": {"steps": steps, "seeds": args.seeds, "threads": args.threads, "plain_steps": args.plain_steps,
                     "plain_budget_steps": args.plain_budget, "data": args.data, "overrides": args.overrides},
        "runs": runs, "mean_mAP50": mean50, "mean_mAP": mean, "goal_met": goal})
    return 0


if __name__ == "__main__":
    common.run_main(main, __file__)
