"""How often is the diagnosis right? A campaign of bad steps with a known cause, each diagnosed by a real
replay during training (explain.auto=all), scored against the cause.

    python benchmarks/diagnosis_accuracy.py                        # 6 fault kinds x 3 steps x 2 seeds + real data
    python benchmarks/diagnosis_accuracy.py --steps-at 5,9 --seeds 0 --size 64 --batch 4
    python benchmarks/diagnosis_accuracy.py --backend mindspore --seeds 0 --steps-at 4,9 --no-real

Scenarios:
- every inject kind at several steps and seeds, on generated shapes (the diagnosis never reads
  injections.jsonl; the benchmark does, to score it): nan_input -> bad_image (the injected image),
  zero_box -> bad_annotation (the image of the box), grad_nan -> transient, loss_nan -> numerical_op (the
  component), lr_spike -> lr_divergence, weight_bitflip -> corrupted_weights;
- real bad data with data.audit=off: a NaN coordinate in one annotation -> bad_annotation (that
  annotation), an image file that cannot be decoded -> bad_image (that image).
Also: a clean run (no incident) with explain.auto=first against one with explain.auto=off (and
explain.keep=0: nothing kept), --clean-steps each, alternated --clean-rounds times: the ratio of their
seconds per step (the explain machinery must cost nothing until a step is bad).
A scenario is right when the first diagnosed incident at or after the fault has the expected verdict
and, where the cause names them, the right image / annotation ids. A fault that made no incident (a bit
flip in a harmless place) is counted apart, not as a miss. Reports per kind: scenarios, right, accuracy,
seconds per diagnosis (median, max); overall accuracy; JSON (--json-out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, print_table, run_main, write_json  # noqa: E402

from nanguard.cli import main as nanguard  # noqa: E402
from nanguard.data.synth import generate  # noqa: E402

EXPECTED = {"nan_input": "bad_image", "zero_box": "bad_annotation", "grad_nan": "transient",
            "loss_nan": "numerical_op", "lr_spike": "lr_divergence", "weight_bitflip": "corrupted_weights",
            "nan_coordinate": "bad_annotation", "unreadable_image": "bad_image"}
INJECTED = ("nan_input", "zero_box", "grad_nan", "loss_nan", "lr_spike", "weight_bitflip")
PARAMS = {"loss_nan": ":component=loss_box_reg", "lr_spike": ":factor=1000"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(INJECTED), help="inject kinds (default: all six)")
    parser.add_argument("--steps-at", default="4,9,15", help="steps to inject at (default 4,9,15)")
    parser.add_argument("--seeds", default="0,1", help="seeds (default 0,1)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (default 128, the demo's)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8, the demo's)")
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch",
                        help="the backend every run trains with (default torch)")
    parser.add_argument("--no-real", action="store_true", help="skip the real bad-data scenarios")
    parser.add_argument("--clean-steps", type=int, default=60, help="steps of each clean run (0: skip)")
    parser.add_argument("--clean-rounds", type=int, default=2, help="clean pairs (0: skip)")
    parser.add_argument("--plain-table", action="store_true")
    parser.add_argument("--json-out", default="bench-out/diagnosis_accuracy.json")
    args = parser.parse_args(argv)
    if args.clean_steps < 0 or args.clean_rounds < 0:
        parser.error("--clean-steps and --clean-rounds must be >= 0")
    return args


BATCH = 8
BACKEND = ["backend=torch"]  # --backend


def train(run: Path, data: Path, size: int, seed: int, steps: int, *extra: str) -> None:
    """The demo config (the tiny model, its RPN and RoI settings), on `size`-px images."""
    nanguard(["train", "--quiet", "--out", str(run), f"data.root={data}", f"seed={seed}", f"train.steps={steps}",
              f"model.min_size={size}", f"model.max_size={size}", f"train.batch_size={BATCH}", "train.warmup_steps=2",
              "train.eval_at_end=false", "data.audit=off", "explain.auto=all", "train.threads=0", *BACKEND, *extra])


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def score(run: Path, kind: str, at: int, culprit: dict[str, Any]) -> dict[str, Any]:
    """The first diagnosed incident at or after `at`, against the cause."""
    diagnosed = [r for r in lines(run / "incidents.jsonl") if r["step"] >= at and r.get("diagnosis")]
    if not diagnosed:
        return {"kind": kind, "step": at, "incident": False, "right": None, "verdict": None, "seconds": None}
    d = diagnosed[0]["diagnosis"]
    right = d["verdict"] == EXPECTED[kind]
    if right and "image_id" in culprit:
        right = d["image_ids"] == [culprit["image_id"]]
    if right and "annotation_id" in culprit:
        right = d["annotation_ids"] == [culprit["annotation_id"]]
    return {"kind": kind, "step": at, "incident": True, "right": right, "verdict": d["verdict"],
            "image_ids": d["image_ids"], "annotation_ids": d["annotation_ids"], "seconds": d["seconds"],
            "expected": EXPECTED[kind], "culprit": culprit}


def injected_scenario(work: Path, data: Path, kind: str, at: int, seed: int, size: int) -> dict[str, Any]:
    run = work / f"{kind}-{at}-{seed}"
    train(run, data, size, seed, at + 6, "--inject", f"{kind}@{at}{PARAMS.get(kind, '')}")
    fired = next((r for r in lines(run / "injections.jsonl") if r["kind"] == kind), None)
    culprit = {}
    if fired and kind in ("nan_input", "zero_box"):
        culprit["image_id"] = fired["detail"]["image_id"]
    return {**score(run, kind, at, culprit), "seed": seed}


def real_scenarios(work: Path, data: Path, size: int) -> list[dict[str, Any]]:
    results = []
    # one annotation with a NaN width, as a broken exporter writes it
    broken = work / "nan-coordinate-data"
    shutil_copy(data, broken)
    ann_path = broken / "annotations" / "instances_train.json"
    doc = json.loads(ann_path.read_text())
    target = doc["annotations"][len(doc["annotations"]) // 3]
    target["bbox"][2] = float("nan")
    ann_path.write_text(json.dumps(doc))
    run = work / "nan-coordinate"
    train(run, broken, size, 0, 12)
    results.append({**score(run, "nan_coordinate", 0, {"annotation_id": target["id"]}), "seed": 0})
    # an image file that cannot be decoded
    broken = work / "unreadable-data"
    shutil_copy(data, broken)
    doc = json.loads((broken / "annotations" / "instances_train.json").read_text())
    image = doc["images"][5]
    (broken / "train" / image["file_name"]).write_bytes(b"not a png at all")
    run = work / "unreadable"
    train(run, broken, size, 0, 12)
    first = next((r for r in lines(run / "incidents.jsonl") if r.get("diagnosis")), None)
    scored = score(run, "unreadable_image", 0, {})
    if first is not None:
        scored["right"] = first["diagnosis"]["verdict"] == "bad_image" and image["id"] in first["diagnosis"]["image_ids"]
    results.append({**scored, "seed": 0})
    return results


def shutil_copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def clean_overhead(work: Path, data: Path, size: int, steps: int, rounds: int) -> dict[str, Any]:
    """s/step of clean runs, explain on (auto=first, the default) vs off, alternated."""
    seconds: dict[str, list[float]] = {"first": [], "off": []}
    for r in range(rounds):
        for mode in (("first", "off") if r % 2 == 0 else ("off", "first")):
            run = work / f"clean-{mode}-{r}"
            extra = ["explain.auto=first"] if mode == "first" else ["explain.auto=off", "explain.keep=0"]
            train(run, data, size, 0, steps, *extra)
            final = json.loads((run / "final.json").read_text())
            assert final["incidents"] == 0, f"{run}: a clean run had incidents"
            seconds[mode].append(final["train_seconds"] / steps)
    first, off = statistics.median(seconds["first"]), statistics.median(seconds["off"])
    return {"steps": steps, "rounds": rounds, "s_per_step_first": first, "s_per_step_off": off,
            "ratio_first_over_off": first / off, "samples": seconds}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kind in dict.fromkeys(r["kind"] for r in results):
        mine = [r for r in results if r["kind"] == kind]
        scored = [r for r in mine if r["incident"]]
        seconds = [r["seconds"] for r in scored if r["seconds"] is not None]
        rows.append({"kind": kind, "expected": EXPECTED[kind], "scenarios": len(mine), "no_incident": len(mine) - len(scored),
                     "right": sum(bool(r["right"]) for r in scored),
                     "accuracy": sum(bool(r["right"]) for r in scored) / len(scored) if scored else None,
                     "seconds_median": statistics.median(seconds) if seconds else None,
                     "seconds_max": max(seconds) if seconds else None,
                     "wrong": [(r["step"], r.get("seed"), r["verdict"]) for r in scored if not r["right"]]})
    return rows


def main(argv: list[str] | None = None) -> int:
    global BATCH, BACKEND
    args = parse_args(argv)
    BATCH, BACKEND = args.batch, [f"backend={args.backend}"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nanguard-diagnosis-") as tmp:
        work = Path(tmp)
        data = work / "shapes"
        generate(data, images=8 * args.batch, val_images=4, size=args.size, classes=3, seed=0, progress=False)
        results = []
        for kind in args.kinds.split(","):
            for at in (int(s) for s in args.steps_at.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    results.append(injected_scenario(work, data, kind, at, seed, args.size))
                    print(f"{kind}@{at} seed {seed}: {results[-1]['verdict']} "
                          f"({'right' if results[-1]['right'] else 'WRONG' if results[-1]['incident'] else 'no incident'})",
                          file=sys.stderr)
        if not args.no_real:
            results += real_scenarios(work, data, args.size)
        clean = clean_overhead(work, data, args.size, args.clean_steps, args.clean_rounds) if args.clean_steps and args.clean_rounds else None
    rows = summarize(results)
    scored = [r for r in results if r["incident"]]
    overall = sum(bool(r["right"]) for r in scored) / len(scored) if scored else None
    print_table("diagnosis accuracy", ["kind", "expected", "scenarios", "no incident", "right", "accuracy",
                                       "s/diagnosis (median)", "s (max)"],
                [[r["kind"], r["expected"], r["scenarios"], r["no_incident"], r["right"], r["accuracy"],
                  r["seconds_median"], r["seconds_max"]] for r in rows], plain=args.plain_table)
    print(f"overall: {sum(bool(r['right']) for r in scored)}/{len(scored)} right "
          f"({overall:.1%}); goal 95%" if overall is not None else "overall: no incidents")
    if clean:
        print_table("clean run: explain.auto=first vs off", ["s/step first", "s/step off", "ratio first/off"],
                    [[clean["s_per_step_first"], clean["s_per_step_off"], clean["ratio_first_over_off"]]],
                    plain=args.plain_table)
    write_json(args.json_out, {"machine": machine_info(), "backend": args.backend, "overall_accuracy": overall, "per_kind": rows,
                               "clean_run": clean,
                               "scenarios": results, "seconds": round(time.perf_counter() - started, 1)})
    return 0 if overall is not None and overall >= 0.95 else 1


if __name__ == "__main__":
    run_main(main, __file__)
