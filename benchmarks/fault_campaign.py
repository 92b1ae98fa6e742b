"""Fault campaign: does a guarded run survive every injected fault with the mAP of a clean run? (issue #5)

    python benchmarks/fault_campaign.py                          # 300 steps of the demo config, all kinds
    python benchmarks/fault_campaign.py --steps 200 --images 400 # quicker
    python benchmarks/fault_campaign.py --amp fp16               # adds fp16_overflow

Runs `nanguard train` (the CLI, in this process with --jobs 1, else one subprocess per run) on the CPU
demo config shortened to --steps (the LR warm-up scaled with it), once clean, once per fault kind, and
once with every kind together, each guarded and with guard.enabled=false. Faults fire from the middle of
the run on, each on its own step (`fault_specs`); the data kinds (nan_input, zero_box) three times, every
steps/20 steps; lr_spike also once early (--early-lr-spike, step 10), before the spike detector's robust
bounds have history. Each run's final.json gives the columns: completed, final weights finite, mAP50, its
difference from the clean guarded run, skipped steps, rollbacks, incidents. A run that crashes (an
unguarded one may) is a row with its error, never the end of the campaign.

Goal: every guarded run completes with mAP50 within 0.02 of the clean one. Prints a table and writes
JSON (--json-out); the run folders stay under --workdir.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

KINDS = ("nan_input", "zero_box", "loss_nan", "grad_nan", "lr_spike", "weight_bitflip", "fp16_overflow")
DATA_KINDS = ("nan_input", "zero_box")  # repeated: a bad sample comes back every epoch in real data
GOAL_MAP50_DELTA = 0.02


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. policy.snapshot_every=25")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--images", type=int, default=2000, help="training images to generate (default 2000)")
    parser.add_argument("--val-images", type=int, default=200, help="validation images (default 200)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="an existing synth-layout folder to use instead of generating one")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--kinds", default=None,
                        help="comma-separated fault kinds (default: all that the amp setting allows)")
    parser.add_argument("--no-all", action="store_true", help="skip the run with every kind together")
    parser.add_argument("--early-lr-spike", type=int, default=10, metavar="STEP",
                        help="also run lr_spike x1000 at this early step (default 10; -1 to skip)")
    parser.add_argument("--modes", default="guarded,unguarded", help="guarded, unguarded or both (default)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; >1 uses subprocesses)")
    parser.add_argument("--workdir", default="bench-out/fault_campaign", help="dataset and run folders go here")
    parser.add_argument("--plain-table", action="store_true", help="aligned text instead of rich")
    parser.add_argument("--json-out", default="bench-out/fault_campaign.json")
    args = parser.parse_args(argv)
    allowed = [k for k in KINDS if k != "fp16_overflow" or args.amp == "fp16"]
    if args.kinds is None:
        args.kinds = allowed
    else:
        args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        bad = [k for k in args.kinds if k not in allowed]
        if bad:
            parser.error(f"--kinds: {', '.join(bad)} not possible here; choose from {', '.join(allowed)}"
                         + ("" if args.amp == "fp16" else " (fp16_overflow needs --amp fp16)"))
    if args.early_lr_spike is not None and args.early_lr_spike < 0:
        args.early_lr_spike = None
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"guarded", "unguarded"}:
        parser.error("--modes: guarded, unguarded or guarded,unguarded")
    if args.steps < 1 or args.jobs < 1:
        parser.error("--steps and --jobs must be >= 1")
    return args


def fault_specs(kinds: list[str], steps: int) -> dict[str, str]:
    """One spec per kind, from the middle of the run. The data kinds fire three times, every steps/20
    steps; the others once each, `gap` steps apart and never on a step another kind already uses: a
    zero_box batch is refused by the model before backward, so a grad_nan or weight_bitflip on the same
    step would never fire, and an lr_spike on a masked step would change nothing."""
    middle, gap, every = steps // 2, max(1, steps // 40), max(1, steps // 20)
    specs, taken = {}, set()
    data_kinds = [k for k in kinds if k in DATA_KINDS]
    for i, kind in enumerate(data_kinds):
        at = min(steps - 1, middle + i)
        specs[kind] = f"{kind}@{at}:every={every}:count=3"
        taken.update(at + k * every for k in range(3))
    cursor = middle + len(data_kinds)
    for kind in kinds:
        if kind in DATA_KINDS:
            continue
        while cursor in taken and cursor < steps - 1:
            cursor += 1
        at = min(steps - 1, cursor)
        specs[kind] = f"{kind}@{at}"
        taken.add(at)
        cursor = at + gap
    return {kind: specs[kind] for kind in kinds}


def campaign(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs to make: (name, mode, specs)."""
    specs = fault_specs(args.kinds, args.steps)
    plans = [("clean", [])] + [(kind, [spec]) for kind, spec in specs.items()]
    if "lr_spike" in specs and args.early_lr_spike is not None:  # before the spike detector has history
        plans.append(("lr_spike_early", [f"lr_spike@{args.early_lr_spike}:factor=1000"]))
    if not args.no_all and len(specs) > 1:
        plans.append(("all", list(specs.values())))
    return [{"name": name, "mode": mode, "inject": inject} for name, inject in plans for mode in args.modes]


def train_argv(run: dict[str, Any], run_dir: Path, data_root: Path, args: argparse.Namespace,
               base_overrides: list[str]) -> list[str]:
    argv = ["train", "--quiet", "--out", str(run_dir), "--device", args.device, f"data.root={data_root}",
            *base_overrides, f"guard.enabled={'true' if run['mode'] == 'guarded' else 'false'}"]
    if args.jobs > 1:  # runs side by side share the cores (before --inject: argparse wants overrides first)
        argv.append(f"train.threads={max(1, (os.cpu_count() or 1) // args.jobs)}")
    for spec in run["inject"]:
        argv += ["--inject", spec]
    return argv


def run_in_process(argv: list[str]) -> tuple[int | None, str]:
    from nanguard.cli import main

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code = main(argv)
        return code, stderr.getvalue()[-2000:]
    except Exception:  # an unguarded run may crash; that is a result, not the end of the campaign
        return None, (stderr.getvalue() + traceback.format_exc())[-2000:]


def run_subprocess(argv: list[str]) -> tuple[int | None, str]:
    env = dict(os.environ, PYTHONPATH=str(common.REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "nanguard.cli", *argv],
                          capture_output=True, text=True, env=env)
    return done.returncode, done.stderr[-2000:]


def execute(run: dict[str, Any], argv: list[str], run_dir: Path, jobs: int) -> dict[str, Any]:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # our own folder from an earlier campaign: `--out` refuses to reuse it
    started = time.perf_counter()
    if jobs == 1:
        code, log = run_in_process(argv)
    else:
        code, log = run_subprocess(argv)
    seconds = time.perf_counter() - started
    final_file = run_dir / "final.json"
    final = json.loads(final_file.read_text()) if final_file.exists() else None
    row = {**run, "run_dir": str(run_dir), "exit_code": code, "seconds": round(seconds, 1)}
    if final is None:
        last = [line for line in log.strip().splitlines() if line.strip()]
        crashed = code is None or "Traceback (most recent call last)" in log
        row.update(completed=False, status="crashed" if crashed else f"exit {code}",
                   weights_finite=None, mAP50=None, skipped_steps=None, rollbacks=None, incidents=None,
                   error=last[-1][:300] if last else "")
        return row
    row.update(
        completed=final.get("status") == "completed" and code == 0,
        status=final.get("status"),
        weights_finite=final.get("weights_finite"),
        mAP50=_number(final.get("mAP50")),
        steps=final.get("steps"),
        skipped_steps=final.get("skipped_steps"),
        rollbacks=final.get("rollbacks"),
        incidents=final.get("incidents"),
        incidents_by_kind=final.get("incidents_by_kind"),
        actions=final.get("actions"),
        injections=final.get("injections"),
        verdict=final.get("verdict"),
    )
    return row


def _number(value: Any) -> float | None:
    """final.json writes a non-finite mAP as "nan"; the table shows it as missing."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.data:
        data_root = Path(args.data)
    else:
        from nanguard.data.synth import generate

        data_root = workdir / f"data-{args.images}-{args.val_images}-{args.size}px"
        print(f"dataset: {data_root}", file=sys.stderr)
        generate(data_root, images=args.images, val_images=args.val_images, size=args.size, progress=False)

    from nanguard.config import load_config

    demo = load_config("demo")
    warmup = demo.train.warmup_steps if args.steps >= demo.train.steps else \
        max(1, demo.train.warmup_steps * args.steps // demo.train.steps)
    base_overrides = ['data.audit="off"',  # the injected faults must reach the model (quoted: bare off is YAML false)
                      f"train.steps={args.steps}", f"train.warmup_steps={warmup}", f'train.amp="{args.amp}"',
                      f"model.min_size={args.size}", f"model.max_size={args.size}", *args.overrides]
    runs = campaign(args)
    print(f"{len(runs)} runs of {args.steps} steps ({args.jobs} at a time); folders under {workdir / 'runs'}",
          file=sys.stderr)

    def launch(run: dict[str, Any]) -> dict[str, Any]:
        run_dir = workdir / "runs" / f"{run['name']}-{run['mode']}"
        row = execute(run, train_argv(run, run_dir, data_root, args, base_overrides), run_dir, args.jobs)
        print(f"  {run['name']:>14s} {run['mode']:>9s}: {row['status']}, mAP50 {row['mAP50']}, "
              f"skipped {row['skipped_steps']}, rollbacks {row['rollbacks']}, {row['seconds']} s", file=sys.stderr)
        return row

    if args.jobs == 1:
        rows = [launch(run) for run in runs]
    else:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(launch, runs))

    clean = next((r for r in rows if r["name"] == "clean" and r["mode"] == "guarded"), None) or \
        next((r for r in rows if r["name"] == "clean"), None)
    reference = clean["mAP50"] if clean else None
    for row in rows:
        row["delta_mAP50"] = (row["mAP50"] - reference) if row["mAP50"] is not None and reference is not None else None
        row["goal_met"] = (row["completed"] and row["delta_mAP50"] is not None
                           and abs(row["delta_mAP50"]) <= GOAL_MAP50_DELTA) if row["mode"] == "guarded" else None
    guarded = [r for r in rows if r["mode"] == "guarded"]
    goal = all(r["goal_met"] for r in guarded) if guarded else None

    table = [[r["name"], r["mode"], r["completed"], r["weights_finite"], r["mAP50"], r["delta_mAP50"],
              r["skipped_steps"], r["rollbacks"], r["incidents"], r["goal_met"], r["seconds"],
              r.get("error") or r.get("verdict") or ""] for r in rows]
    common.print_table(
        f"fault campaign: {args.steps} steps, {args.images} train / {args.val_images} val images, {args.size} px, "
        f"amp {args.amp}, {common.machine_info(args.device)['device_name']}",
        ["run", "mode", "completed", "weights finite", "mAP50", "Δ vs clean", "skipped", "rollbacks",
         "incidents", "goal", "seconds", "note"], table, plain=args.plain_table)
    print(f"goal (every guarded run completes, |Δ mAP50| <= {GOAL_MAP50_DELTA}): "
          f"{'met' if goal else 'NOT met' if goal is not None else 'no guarded runs'}")

    result = {
        "benchmark": "fault_campaign",
        "machine": common.machine_info(args.device),
        "settings": {"device": args.device, "steps": args.steps, "images": args.images, "val_images": args.val_images,
                     "size": args.size, "data": str(data_root), "amp": args.amp, "kinds": args.kinds,
                     "modes": args.modes, "jobs": args.jobs, "overrides": base_overrides,
                     "specs": fault_specs(args.kinds, args.steps)},
        "clean_mAP50": reference,
        "goal_map50_delta": GOAL_MAP50_DELTA,
        "goal_met": goal,
        "runs": rows,
    }
    common.write_json(args.json_out, result)
    return 0


if __name__ == "__main__":
    common.run_main(main, __file__)
