"""How often is an own loop's bad step explained right, and what does `replay=` cost a healthy loop?

    python benchmarks/own_loop_explain.py                     # 6 faults x 3 steps x 2 seeds + the clean pair
    python benchmarks/own_loop_explain.py --steps-at 4 --seeds 0 --rounds 2

A user's own PyTorch loop (no detector: a small CNN with BatchNorm on 32 px images, batch 16, fused SGD)
with `guard.step(losses, replay=fn, ids=ids)`. Each scenario puts one fault with a known cause at a
step; the diagnosis (`outcome.diagnosis`) never sees the fault, the benchmark scores it:
  nan_pixels     one sample's pixels NaN                       -> bad_image, that sample's id
  inf_pixels     one sample's pixels +inf                      -> bad_image, that sample's id
  loss_transient the loss NaN in this run only (a flaky device) -> transient
  grad_transient one gradient NaN in this run only              -> transient
  lr_spike       the LR x 1e5 for one update                    -> lr_divergence
  weight_bitflip one weight's exponent bit flipped between steps -> corrupted_weights
Right: the first diagnosis at or after the fault has the verdict and, for the images, exactly the id.
Also a clean loop with replay= against the same loop without it (interleaved blocks, --rounds x
--block steps each): the ratio of their seconds per step (goal <= 1.01). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, machine_info, print_table, run_main, summarize, write_json  # noqa: E402

EXPECTED = {"nan_pixels": "bad_image", "inf_pixels": "bad_image", "loss_transient": "transient",
            "grad_transient": "transient", "lr_spike": "lr_divergence", "weight_bitflip": "corrupted_weights"}
BATCH, SIZE, CLASSES, LR = 16, 32, 10, 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(EXPECTED), help="faults (default: all six)")
    parser.add_argument("--steps-at", default="4,9,15", help="steps to put the fault at (default 4,9,15)")
    parser.add_argument("--seeds", default="0,1", help="seeds (default 0,1)")
    parser.add_argument("--rounds", type=int, default=6, help="clean-pair rounds (0: skip)")
    parser.add_argument("--block", type=int, default=20, help="steps per block of the clean pair")
    parser.add_argument("--plain-table", action="store_true")
    parser.add_argument("--json-out", default="bench-out/own_loop_explain.json")
    args = parser.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(args.kinds) - set(EXPECTED)
    if unknown:
        parser.error(f"unknown kind(s) {', '.join(sorted(unknown))}; known: {', '.join(EXPECTED)}")
    args.steps_at = [int(s) for s in args.steps_at.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args


def build(seed: int):
    import torch
    from torch import nn

    from nanguard.backends.torch.guard import Guard
    from nanguard.config import ExplainConfig

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, fused=True)
    guard = Guard(model, optimizer, explain=ExplainConfig(auto="all"))
    return model, optimizer, guard


def batch(seed: int, step: int):
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + step)
    return (torch.randn(BATCH, 3, SIZE, SIZE, generator=generator),
            torch.randint(0, CLASSES, (BATCH,), generator=generator))


def scenario(kind: str, at: int, seed: int) -> dict[str, Any]:
    import torch
    from torch import nn

    model, optimizer, guard = build(seed)
    culprit = (seed * 7 + at) % BATCH
    diagnoses = []
    for step in range(at + 4):
        images, labels = batch(seed, step)
        ids = [f"{step}/{i}" for i in range(BATCH)]
        if step == at and kind in ("nan_pixels", "inf_pixels"):
            images[culprit, :, 3:9, 5:11] = float("nan") if kind == "nan_pixels" else float("inf")
        if step == at and kind == "weight_bitflip":  # between two steps, as a memory fault would
            with torch.no_grad():
                weight = model[3].weight.view(-1)
                weight[culprit] = torch.tensor(weight[culprit].item()).view(torch.int32).bitwise_xor(1 << 30).view(torch.float32)

        def losses_of(index, images=images, labels=labels):
            return {"loss": nn.functional.cross_entropy(model(images[index]), labels[index])}

        losses = losses_of(list(range(BATCH)))
        hook = None
        if step == at and kind == "loss_transient":
            losses = {"loss": losses["loss"] * float("nan")}
        if step == at and kind == "grad_transient":
            hook = model[0].weight.register_hook(lambda grad: grad * float("nan"))
        if step == at and kind == "lr_spike":
            optimizer.param_groups[0]["lr"] = LR * 1e5
        outcomes = guard.step(losses, replay=losses_of, ids=ids)
        optimizer.param_groups[0]["lr"] = LR
        if hook is not None:
            hook.remove()
        diagnoses += [(o.observation.step, o.diagnosis) for o in outcomes if o.diagnosis is not None]
    diagnoses += [(o.observation.step, o.diagnosis) for o in guard.flush() if o.diagnosis is not None]
    found = next(((s, d) for s, d in diagnoses if s >= at), None)
    expected_ids = [f"{at}/{culprit}"] if EXPECTED[kind] == "bad_image" else None
    if found is None:
        return {"kind": kind, "at": at, "seed": seed, "diagnosed": False, "right": False}
    step, diagnosis = found
    right = diagnosis.verdict == EXPECTED[kind] and (expected_ids is None or diagnosis.image_ids == expected_ids)
    return {"kind": kind, "at": at, "seed": seed, "diagnosed": True, "step": step, "verdict": diagnosis.verdict,
            "image_ids": diagnosis.image_ids, "expected_ids": expected_ids, "right": right,
            "seconds": diagnosis.seconds}


def clean_pair(rounds: int, block: int) -> dict[str, Any]:
    """The same clean loop with and without replay=, interleaved: seconds per step and the ratio."""
    from torch import nn

    loops = {}
    for name in ("off", "on"):
        model, _, guard = build(0)

        def step(i: int, model=model, guard=guard, explain=name == "on") -> None:
            images, labels = batch(0, i)

            def losses_of(index):
                return {"loss": nn.functional.cross_entropy(model(images[index]), labels[index])}

            losses = losses_of(list(range(BATCH)))
            guard.step(losses, **(dict(replay=losses_of, ids=range(BATCH)) if explain else {}))

        loops[name] = step
    times = interleaved(loops, rounds=rounds, block=block, warmup=3, sync=lambda: None)
    return summarize(times, baseline="off", block=block, batch_size=BATCH)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # CPU time is then what a step costs, whatever else the machine runs
    started = time.perf_counter()
    results = [scenario(kind, at, seed) for kind in args.kinds for at in args.steps_at for seed in args.seeds]
    rows, per_kind = [], {}
    for kind in args.kinds:
        mine = [r for r in results if r["kind"] == kind]
        seconds = [r["seconds"] for r in mine if r.get("seconds") is not None]
        per_kind[kind] = {"scenarios": len(mine), "right": sum(r["right"] for r in mine),
                          "median_seconds": statistics.median(seconds) if seconds else None,
                          "max_seconds": max(seconds) if seconds else None,
                          "wrong": [r for r in mine if not r["right"]]}
        rows.append([kind, EXPECTED[kind], len(mine), per_kind[kind]["right"],
                     per_kind[kind]["median_seconds"], per_kind[kind]["max_seconds"]])
    right = sum(r["right"] for r in results)
    rows.append(["all", "", len(results), right, None, None])
    print_table("own-loop diagnosis (guard.step(losses, replay=fn, ids=ids))",
                ["fault", "expected", "scenarios", "right", "median s", "max s"], rows, plain=args.plain_table)
    clean = clean_pair(args.rounds, args.block) if args.rounds > 0 else None
    if clean is not None:
        print_table("a clean loop with replay= / without (medians of the rounds)",
                    ["variant", "s/step", "ratio", "CPU s/step", "CPU ratio"],
                    [[name, e["median_step_seconds"], e["time_ratio_median"], e["cpu_median_step_seconds"],
                      e["cpu_time_ratio_median"]] for name, e in clean.items()], plain=args.plain_table)
    write_json(args.json_out, {
        "benchmark": "own_loop_explain", "machine": machine_info(),
        "settings": {"kinds": args.kinds, "steps_at": args.steps_at, "seeds": args.seeds, "batch": BATCH,
                     "size": SIZE, "rounds": args.rounds, "block": args.block},
        "accuracy": right / len(results) if results else None, "per_kind": per_kind, "scenarios": results,
        "clean": clean, "clean_ratio": clean["on"]["time_ratio_median"] if clean else None,
        "clean_cpu_ratio": clean["on"]["cpu_time_ratio_median"] if clean else None,
        "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    run_main(main, __file__)
