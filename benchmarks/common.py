"""Shared pieces of the training benchmarks: the machine description, synthetic batches held as tensors,
models built the way `nanguard train` builds them, interleaved timing, the table, and the JSON file.

Interleaved timing: variants run in blocks of a few steps, in rotating order (A B C, B C A, C A B, ...),
so that whatever else the machine is doing (another process, thermal drift) lands on every variant
alike. Ratios are taken per round between neighbouring blocks and summarised by their median, which a
slow block now and then does not move.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from nanguard.fileio import atomic_write_json, json_safe  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# Machine and output


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU, core count, torch and torchvision versions, the device's name."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import torch
        import torchvision

        info.update(torch=torch.__version__, torchvision=torchvision.__version__,
                    torch_threads=torch.get_num_threads())
        if device == "cuda" and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
        else:
            info["device_name"] = f"cpu ({info['cpu_model']}, {os.cpu_count()} cores)"
    except ImportError:
        info["device_name"] = "cpu"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_benchmark_parser(doc: str | None, name: str, overrides_example: str, warmup: int) -> argparse.ArgumentParser:
    """The options the step benchmarks (throughput, guard_overhead) share: model, batch, timing, output."""

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {overrides_example}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="tiny", choices=["tiny", "mobilenet_v3_fpn", "resnet50_fpn"])
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--size", type=int, default=128, help="image side in px; the model resizes to it (default 128)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8, help="distinct preloaded batches, cycled (default 8)")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps per variant first (default {warmup})")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--block", type=int, default=2, help="steps per variant per round (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-table", action="store_true", help="aligned text instead of rich")
    parser.add_argument("--json-out", default=f"bench-out/{name}.json")
    return parser


def write_json(path: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Strict JSON (non-finite numbers become "nan"/"inf" strings), written atomically."""
    out = atomic_write_json(path, json_safe(result))
    print(f"wrote {out}")
    return out


def run_main(main: Callable[[], int], script: str) -> None:
    """Exit with main()'s code; a user error (--device cuda without a GPU, a bad override, a bad
    --data folder) is one line and exit 2."""
    from nanguard.errors import UserError

    try:
        sys.exit(main())
    except UserError as err:
        print(f"{Path(script).name}: error: {err}", file=sys.stderr)
        sys.exit(2)


def print_table(title: str, columns: list[str], rows: list[list[Any]], *, plain: bool = False) -> None:
    """A table on stdout: rich when it is installed (and not `plain`), aligned text otherwise."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title)
            for i, name in enumerate(columns):
                table.add_column(name, justify="left" if i == 0 else "right")
            for row in cells:
                table.add_row(*row)
            widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
            Console(width=max(80, sum(widths) + 3 * len(columns) + 2)).print(table)
            return
        except ImportError:
            pass
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    for row in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# ---------------------------------------------------------------------------------------------------
# Data and models


def synthetic_batches(count: int, batch_size: int, size: int, classes: int, device, seed: int = 0):
    """`count` batches of nanguard's synthetic shapes rendered at `size` px (in memory, no files), as
    device tensors: a list of (images: list of [3, S, S] float32 in [0, 1], targets: list of
    {boxes: [N, 4] xyxy float32, labels: [N] int64}, image_ids)."""
    import numpy as np

    from nanguard.backends.torch.step import to_tensors
    from nanguard.data.loader import Batch, BatchKey
    from nanguard.data.synth import render

    batches = []
    for b in range(count):
        images, boxes, labels, ids = [], [], [], []
        for i in range(batch_size):
            index = b * batch_size + i + 1
            pixels, shapes = render(seed, 0, index, size, classes)
            images.append(pixels)
            boxes.append(np.asarray([s.box for s in shapes], dtype=np.float32).reshape(-1, 4))
            labels.append(np.asarray([s.category_id for s in shapes], dtype=np.int64))  # ids 1..K = labels
            ids.append(index)
        batch = Batch(BatchKey(0, b, tuple(ids)), images, boxes, labels, tuple(ids),
                      tuple(tuple(range(len(x))) for x in boxes))
        tensors = to_tensors(batch, device)
        batches.append((*tensors, tuple(ids)))
    return batches


def bench_config(model: str, size: int, amp: str, batch: int, overrides: list[str] = ()):
    """The run config `nanguard train` would use: the demo preset for the CPU models, coco_r50 (800 px,
    torchvision's proposal counts) for resnet50_fpn; the model's resize set to the images' size."""
    from nanguard.config import load_config

    preset = "coco_r50" if model == "resnet50_fpn" else "demo"
    base = load_config(preset)
    max_size = max(size, base.model.max_size)
    return load_config(preset, [f"model.name={model}", f"model.min_size={size}", f"model.max_size={max_size}",
                                f"train.amp=\"{amp}\"", f"train.batch_size={batch}", *overrides])


def model_step(model, stepper, batches: list, i: int, *, device, amp: str) -> list:
    """Batch `i` (cycled) of `synthetic_batches` through the model and `stepper.step` (a `Guard` or a
    `PlainStep`): the hot path of a training step, with the data already on the device on every side."""
    from nanguard.backends.torch.step import autocast

    images, targets, _ = batches[i % len(batches)]
    with autocast(device, amp):
        losses = model(images, targets)
    return stepper.step(losses)


def build_models(cfg, num_classes: int, device, copies: int, seed: int = 0) -> list:
    """`copies` models with identical random weights, in train mode."""
    import torch

    from nanguard.backends.torch.model import build_model

    torch.manual_seed(seed)
    first = build_model(cfg.model, num_classes).to(device)
    first.train()
    return [first] + [copy.deepcopy(first) for _ in range(copies - 1)]


def synchronizer(device) -> Callable[[], None]:
    """Waits for the device (CUDA) before a clock is read; a no-op on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# ---------------------------------------------------------------------------------------------------
# Interleaved timing


def interleaved(variants: dict[str, Callable[[int], None]], *, rounds: int, block: int, warmup: int,
                sync: Callable[[], None], progress: bool = True) -> dict[str, dict[str, list[float]]]:
    """Run each variant's `step(i)` (i counts that variant's steps) `warmup` times, then `rounds` rounds
    of one block of `block` steps per variant, the order rotated every round. Returns, per variant, the
    wall seconds (`wall`) and this process's CPU seconds (`cpu`, all threads) of each timed block, in
    round order. CPU time is what a step costs when other processes take the cores away (the wall
    clock counts their time too); it is meaningful with --threads 1 (idle OpenMP threads spin)."""
    names = list(variants)
    counters = dict.fromkeys(names, 0)

    def run(name: str, steps: int) -> None:
        fn = variants[name]
        for _ in range(steps):
            fn(counters[name])
            counters[name] += 1

    for name in names:
        started = time.perf_counter()
        run(name, warmup)
        sync()
        if progress:
            print(f"  warm-up {name}: {warmup} steps, {time.perf_counter() - started:.1f} s", file=sys.stderr)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            started, cpu_started = time.perf_counter(), time.process_time()
            run(name, block)
            sync()
            times[name]["wall"].append(time.perf_counter() - started)
            times[name]["cpu"].append(time.process_time() - cpu_started)
        if progress:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {times[n]['wall'][-1] / block:.3f} s/step (cpu {times[n]['cpu'][-1] / block:.3f})"
                for n in names), file=sys.stderr)
    return times


def summarize(times: dict[str, dict[str, list[float]]], *, baseline: str, block: int,
              batch_size: int) -> dict[str, Any]:
    """Per variant: img/s over all timed steps, median s/step, and the time ratio against `baseline`
    (total, and the median of the per-round ratios, with their min and max); the same on CPU time
    (`cpu_` keys)."""
    out: dict[str, Any] = {}
    for name, clocks in times.items():
        entry: dict[str, Any] = {"steps": block * len(clocks["wall"])}
        for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
            blocks, base = clocks[clock], times[baseline][clock]
            total = sum(blocks)
            per_round = [b / a for a, b in zip(base, blocks)]
            entry.update({
                f"{prefix}block_seconds": [round(s, 5) for s in blocks],
                f"{prefix}seconds": round(total, 4),
                f"{prefix}images_per_second": block * len(blocks) * batch_size / total,
                f"{prefix}median_step_seconds": statistics.median(blocks) / block,
                f"{prefix}time_ratio_total": total / sum(base),
                f"{prefix}time_ratio_median": statistics.median(per_round),
                f"{prefix}time_ratio_min": min(per_round),
                f"{prefix}time_ratio_max": max(per_round),
            })
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------------------------
# MindSpore


def require_mindspore():
    """The mindspore module, or a one-line UserError (exit 2) saying how to get it."""
    try:
        import mindspore
    except ImportError:
        from nanguard.errors import UserError

        raise UserError("mindspore is not installed: `make install` installs it") from None
    return mindspore


def mindspore_plain_step(network, optimizer, clip_norm: float, scale: float = 1.0):
    """MindSpore's plain train step, as `TrainOneStepCell` with a clip: value_and_grad of the summed loss
    components, `ops.clip_by_global_norm`, the optimizer; no checks, no masking. `scale`: a fixed loss
    scale, divided out of the gradients again (the model zoo's FasterRCNN uses 256)."""
    from mindspore import nn, ops

    class PlainStep(nn.Cell):
        def __init__(self) -> None:
            super().__init__(auto_prefix=False)
            self.network, self.optimizer = network, optimizer
            self.network.set_train()
            self.grad_fn = ops.value_and_grad(self.total, None, optimizer.parameters)

        def total(self, *inputs):
            losses = self.network(*inputs)
            total = losses[0]
            for loss in losses[1:]:
                total = total + loss
            return total * scale

        def construct(self, *inputs):
            loss, grads = self.grad_fn(*inputs)
            grads = ops.clip_by_global_norm(tuple(g / scale for g in grads), clip_norm)
            return ops.depend(loss / scale, self.optimizer(grads))

    return PlainStep()


def train_demo(run: Path, steps: int, overrides: list[str], *, data: str | None = None,
               injects: list[str] = ()) -> dict | None:
    """`python -m nanguard train --config demo` for `steps` steps into `run` (explain off), then what
    final.json and eval.json say; None (the stderr tail printed) when the command fails."""
    import json
    import os
    import subprocess

    command = [sys.executable, "-m", "nanguard", "train", "--config", "demo", "--quiet", "--out", str(run),
               f"train.steps={steps}", "explain.auto=off", *overrides]
    if data:
        command.append(f"data.root={data}")
    for spec in injects:
        command += ["--inject", spec]
    print(" ".join(command[3:]), file=sys.stderr)
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
                          capture_output=True, text=True)
    if done.returncode not in (0, 1) or not (run / "final.json").exists():  # 1: a run the policy stopped
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    final = json.loads((run / "final.json").read_text())
    eval_ = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    seconds = final.get("train_seconds")
    return {"status": final["status"], "mAP50": eval_.get("mAP50"), "mAP": eval_.get("mAP"),
            "train_seconds": seconds, "s_per_step": seconds / steps if seconds else None,
            "weights_finite": final.get("weights_finite"), "incidents": final.get("incidents"),
            "skipped_steps": final.get("skipped_steps"), "runtime": final.get("runtime")}
