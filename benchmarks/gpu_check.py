"""One prepared command for a lent GPU (issue #28): everything the guard claims on a CUDA device, measured
in one process, within a wall-clock budget, each section on its own so that one failing is recorded and
the rest still run.

    PYTHONPATH=src python benchmarks/gpu_check.py --out $OUT/gpu_check.json          # the GPU run (< 8 min)
    python benchmarks/gpu_check.py --device cpu --tiny --steps 3 --out /tmp/g.json   # CI's smoke test (CPU)

Sections (in the order they run; `--sections` picks a subset):
- host_syncs      (CUDA only) each step run under `torch.cuda.set_sync_debug_mode("warn")`, the warnings
                  counted with `warnings.catch_warnings(record=True)`: forward, backward and update of
                  `Guard` against `PlainStep`, the guard's own part (`Guard.update`: check, agree, apply,
                  send) alone, and a masked (NaN-loss) step; bf16 and fp16 + GradScaler. Only the syncs
                  torch itself reports are counted (`.item()`, `nonzero`, a blocking copy, a stream or
                  device synchronize, ...); a wait on a `torch.cuda.Event` (the guard's one-step-late read
                  of the previous step's numbers) is, to our knowledge, not reported, so not counted.
                  Goal: the guard adds 0, and its own part has 0.
- injection       a NaN image (`nan_input`, bf16 and fp16) and an fp16 overflow (`fp16_overflow`) injected
                  with nanguard's own fault hooks (`TorchFaults`) after 2 healthy steps: the step must be
                  skipped, parameters, optimizer state, BatchNorm buffers, the LR schedule's count and the
                  GradScaler's state bit-identical (for the overflow the scaler must back off, exactly as
                  torch's GradScaler does, and nothing else move), and the incident named.
- step_time_bf16,
  step_time_fp16  guarded (`Guard`) / plain (`PlainStep`) step time, the same model twice, interleaved in
                  blocks in one process (benchmarks/common.py), `--steps` timed steps a side after
                  `--warmup`. Goal on the GPU recipe: median of per-round ratios <= 1.01.
- throughput      nanguard's step (`Guard`) vs torchvision's reference loop (`loss.item()`, plain SGD,
                  `clip_grad_norm_`, LinearLR), bf16, img/s ratio (as benchmarks/throughput.py).
- cuda_graph      (CUDA only) whether the guard's device part can be captured in a CUDA graph
                  (`torch.cuda.graph`): `GuardedStep._check`, then check + agree, then the whole
                  `GuardedStep.update` (check, agree, apply), bf16; and the update with fp16 + GradScaler.
                  Success (and one replay), or the exception text and the nanguard line that broke it.
                  Runs last: a failed capture could leave the CUDA context unusable.

Defaults are the GPU recipe: resnet50_fpn, batch 8, 800 px, 30 timed steps a side. `--tiny` (with
`--device cpu`) shrinks everything for CI. The table goes to stdout, progress to stderr, and the JSON
(`--out`) is rewritten after every section, so whatever ran is kept even if the process is killed.
`--budget-s` (default 420): a section that would not finish inside it is skipped ("skipped: out of
time"), and a running one stops at the budget; a watchdog writes the JSON and exits (code 3) at
budget + 45 s. Exit code 0 when the script ran, whatever the checks found (each check has its status:
pass, fail, measured (no goal on this setup), error, skipped); 1 when the setup itself failed (the JSON
says why); 2 for `--device cuda` without a visible CUDA device.

Needs: torch, torchvision (and Pillow, which torchvision itself requires), numpy, this repository's src/.
Not needed: PyYAML and msgspec (if missing, stand-ins let nanguard.config and nanguard.data import: the
config is built from its presets with `dataclasses.replace`, no YAML or COCO file is read), rich (the
table is plain text unless --rich-table), faster-coco-eval, pydantic, tensorboard, mindspore. What stood
in is listed under "stand_ins" in the JSON.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here: imports included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import faulthandler  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the checkout's src/ on sys.path; imports nanguard.fileio only)

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("host_syncs", "injection", "step_time_bf16", "step_time_fp16", "throughput", "cuda_graph")
CUDA_ONLY = {"host_syncs", "cuda_graph"}
STEP_TIME_GOAL = 1.01  # guarded / plain step time, median of rounds (issue #28)
WATCHDOG_GRACE_S = 45.0
SYNC_WARNING = "synchroniz"  # torch: "called a synchronizing CUDA operation"
TINY_MODEL = {"fpn_channels": 16, "representation_size": 64, "rpn_pre_nms_top_n_train": 100,
              "rpn_post_nms_top_n_train": 32, "box_batch_size_per_image": 32}


class OutOfTime(Exception):
    """The budget ran out in the middle of a section."""


# ---------------------------------------------------------------------------------------------------
# Options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="CI's smoke settings: the tiny model made smaller, batch 2, 64 px, 1 warm-up step, "
                             "1 thread (each may still be set explicitly)")
    parser.add_argument("--model", choices=["tiny", "mobilenet_v3_fpn", "resnet50_fpn"], default=None,
                        help="default resnet50_fpn (tiny with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8; 2 with --tiny)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 800; 64 with --tiny)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--batches", type=int, default=None,
                        help="distinct preloaded batches (default 4; 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (default 30)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per variant first (default 5; 1 with --tiny)")
    parser.add_argument("--block", type=int, default=None,
                        help="steps per variant per interleaved round (default 3; 1 with --tiny)")
    parser.add_argument("--sync-steps", type=int, default=3, help="steps counted per side in host_syncs (default 3)")
    parser.add_argument("--healthy-steps", type=int, default=2,
                        help="healthy steps before an injected fault (default 2: fewer than the spike detector's "
                             "early history, so the fp16 overflow's scaled loss is not also a loss spike)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget from the start of the script (default 420)")
    parser.add_argument("--plain-table", action="store_true", help="aligned text (the default; kept for symmetry)")
    parser.add_argument("--rich-table", action="store_true", help="a rich table instead of aligned text")
    parser.add_argument("--out", default="bench-out/gpu_check.json",
                        help="the JSON file (default bench-out/gpu_check.json)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {"model": "tiny" if tiny else "resnet50_fpn", "batch": 2 if tiny else 8, "size": 64 if tiny else 800,
                "batches": 2 if tiny else 4, "warmup": 1 if tiny else 5, "block": 1 if tiny else 3,
                "threads": 1 if tiny else 0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in chosen]
    for name in ("steps", "batch", "size", "batches", "block", "sync_steps", "healthy_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    args.block = min(args.block, args.steps)
    args.rounds = math.ceil(args.steps / args.block)
    return args


# ---------------------------------------------------------------------------------------------------
# Stand-ins for packages the GPU machine may lack (never used when the real one is installed)


def install_stand_ins() -> dict[str, str]:
    """Modules nanguard imports at the top for features this script does not use, each installed only
    where the real package cannot be found: PyYAML (nanguard.config: YAML files and KEY=VALUE overrides)
    and msgspec (nanguard.data.cocofile, imported by the torch step module: COCO files)."""
    found: dict[str, str] = {}
    if importlib.util.find_spec("yaml") is None:
        yaml = types.ModuleType("yaml")

        class YAMLError(Exception):
            pass

        def safe_load(text):  # scalars only: enough for an override, should anything call it
            text = str(text).strip()
            lowered = text.lower()
            if lowered in ("", "null", "~", "none"):
                return None
            if lowered in ("true", "false"):
                return lowered == "true"
            for parse in (int, float):
                try:
                    return parse(text)
                except ValueError:
                    pass
            return text.strip("'\"")

        def safe_dump(*_args, **_kwargs):
            raise YAMLError("PyYAML is not installed (gpu_check's stand-in cannot write YAML)")

        yaml.YAMLError, yaml.safe_load, yaml.safe_dump = YAMLError, safe_load, safe_dump
        yaml.__nanguard_stand_in__ = True
        sys.modules["yaml"] = yaml
        found["yaml"] = "PyYAML is not installed: a stand-in lets nanguard.config import (no YAML is parsed here)"
    if importlib.util.find_spec("msgspec") is None:
        msgspec = types.ModuleType("msgspec")
        json_module = types.ModuleType("msgspec.json")

        class DecodeError(ValueError):
            pass

        class ValidationError(DecodeError):
            pass

        def decode(*_args, **_kwargs):
            raise RuntimeError("msgspec is not installed (gpu_check's stand-in cannot decode COCO files)")

        json_module.decode = decode
        msgspec.DecodeError, msgspec.ValidationError, msgspec.json = DecodeError, ValidationError, json_module
        msgspec.__nanguard_stand_in__ = True
        sys.modules["msgspec"], sys.modules["msgspec.json"] = msgspec, json_module
        found["msgspec"] = ("msgspec is not installed: a stand-in lets nanguard.data (imported by the torch step "
                            "module) import; no COCO file is read here")
    return found


# ---------------------------------------------------------------------------------------------------
# The JSON, the budget, the watchdog


class Report:
    """The result, rewritten (atomically) after every section."""

    def __init__(self, path: str, args: argparse.Namespace) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {
            "benchmark": "gpu_check",
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": False,
            "machine": {},
            "settings": {k: v for k, v in vars(args).items()},
            "stand_ins": {},
            "sections": {},
            "checks": [],
        }

    def write(self, quiet: bool = True) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(time.monotonic() - T0, 2)
            self.data["checks"] = [dict(c, section=name) for name, entry in self.data["sections"].items()
                                   for c in entry.get("checks", [])]
            self.data["summary"] = dict(Counter(c["status"] for c in self.data["checks"]))
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                common.atomic_write_json(self.path, common.json_safe(_plain(self.data)))
            except Exception as exc:  # the table on stdout is still there
                print(f"gpu_check: cannot write {self.path}: {exc}", file=sys.stderr)
                return
        if not quiet:
            print(f"wrote {self.path}")


def _plain(value: Any) -> Any:
    """JSON-able: tuples to lists, numbers to floats/ints, anything else to its str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class Clock:
    """The budget: sections that would not fit are skipped; a step past it raises OutOfTime."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.seconds_per_step: float | None = None  # measured by the sections that ran

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def check(self) -> None:
        if self.elapsed() > self.budget_s:
            raise OutOfTime(f"the budget of {self.budget_s:.0f} s ran out ({self.elapsed():.0f} s elapsed)")

    def estimate(self, steps: int) -> float | None:
        return None if self.seconds_per_step is None else steps * self.seconds_per_step

    def learn(self, seconds: float, steps: int) -> None:
        """The latest section's seconds per planned step, its model builds included (so: on the safe side)."""
        if steps > 0:
            self.seconds_per_step = seconds / steps


def start_watchdog(report: Report, clock: Clock) -> None:
    def fire() -> None:
        report.data["watchdog"] = (f"the script was still running {clock.budget_s + WATCHDOG_GRACE_S:.0f} s after "
                                   f"it started (--budget-s + {WATCHDOG_GRACE_S:.0f} s): stopped by the watchdog; "
                                   "only the sections listed ran")
        report.write()
        print(report.data["watchdog"], file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(3)

    timer = threading.Timer(max(1.0, clock.budget_s + WATCHDOG_GRACE_S - clock.elapsed()), fire)
    timer.daemon = True
    timer.start()


def check(name: str, status: str, value: Any, goal: str = "", **extra: Any) -> dict[str, Any]:
    return {"check": name, "status": status, "value": value, "goal": goal, **extra}


def error_text(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def where(exc: BaseException) -> dict[str, str | None]:
    """The innermost frame in nanguard's src/ and the innermost frame overall of an exception."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(REPO / "src") in f.filename]

    def fmt(f):
        return f"{_short(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}" if f else None
    return {"nanguard_frame": fmt(ours[-1] if ours else None), "innermost_frame": fmt(frames[-1] if frames else None)}


def _short(filename: str) -> str:
    path = str(filename)
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep, str(REPO) + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# ---------------------------------------------------------------------------------------------------
# The run's pieces, as `nanguard train` builds them


class Bench:
    """Device, config, batches and builders shared by the sections."""

    def __init__(self, args: argparse.Namespace, clock: Clock) -> None:
        import torch

        from nanguard.backends.torch.backend import build_optimizer, pick_device
        from nanguard.backends.torch.devicestate import LRSchedule

        self.args, self.clock, self.torch = args, clock, torch
        self.device = pick_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.build_optimizer, self.LRSchedule = build_optimizer, LRSchedule
        self.sync = common.synchronizer(self.device)
        started = time.monotonic()
        self.batches, self.data_source = self._batches()
        self.data_seconds = time.monotonic() - started

    def _batches(self):
        a = self.args
        try:
            return (common.synthetic_batches(a.batches, a.batch, a.size, a.classes, self.device, a.seed),
                    "nanguard's synthetic shapes (nanguard.data.synth.render)")
        except Exception as exc:  # Pillow broken or missing: random images and boxes, same shapes
            print(f"gpu_check: synthetic shapes unavailable ({error_text(exc, 200)}); using random images",
                  file=sys.stderr)
            torch = self.torch
            generator = torch.Generator().manual_seed(a.seed)
            batches = []
            for b in range(a.batches):
                images, targets, ids = [], [], []
                for i in range(a.batch):
                    images.append(torch.rand(3, a.size, a.size, generator=generator).to(self.device))
                    n = 3
                    xy = torch.rand(n, 2, generator=generator) * a.size * 0.6
                    wh = (torch.rand(n, 2, generator=generator) * 0.3 + 0.05) * a.size
                    boxes = torch.cat([xy, (xy + wh).clamp(max=a.size - 1)], dim=1)
                    labels = torch.randint(1, a.classes + 1, (n,), generator=generator)
                    targets.append({"boxes": boxes.to(self.device), "labels": labels.to(self.device)})
                    ids.append(b * a.batch + i + 1)
                batches.append((images, targets, tuple(ids)))
            return batches, f"random images and boxes ({error_text(exc, 200)})"

    def config(self, amp: str):
        """The config `nanguard train` would use (coco_r50 for resnet50_fpn, demo otherwise), the model's
        resize set to the images' size, built with dataclasses.replace: no YAML."""
        from nanguard.config import load_config, validate

        a = self.args
        cfg = load_config("coco_r50" if a.model == "resnet50_fpn" else "demo")
        model = {"name": a.model, "min_size": a.size, "max_size": max(a.size, cfg.model.max_size)}
        if a.tiny:
            model.update(TINY_MODEL)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                                  train=dataclasses.replace(cfg.train, amp=amp, batch_size=a.batch))
        validate(cfg)
        return cfg

    def models(self, cfg, copies: int) -> list:
        return common.build_models(cfg, self.args.classes, self.device, copies, self.args.seed)

    def scaler(self, amp: str):
        return self.torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

    def guard(self, cfg, model, amp: str, **extra):
        from nanguard.backends.torch.guard import Guard

        return Guard(model, self.build_optimizer(cfg, model), scaler=self.scaler(amp), config=cfg.guard,
                     policy=cfg.policy, schedule=self.LRSchedule(cfg.train, self.device), **extra)

    def plain(self, cfg, model, amp: str):
        from nanguard.backends.torch.step import PlainStep

        return PlainStep(model, self.build_optimizer(cfg, model), scaler=self.scaler(amp),
                         clip_norm=cfg.guard.clip_norm, schedule=self.LRSchedule(cfg.train, self.device))

    def forward(self, model, i: int, amp: str, images=None):
        from nanguard.backends.torch.step import autocast

        batch_images, targets, _ = self.batches[i % len(self.batches)]
        with autocast(self.device, amp):
            return model(batch_images if images is None else images, targets)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Section: step time, guarded / plain


def step_time(bench: Bench, amp: str) -> dict[str, Any]:
    args, clock = bench.args, bench.clock
    cfg = bench.config(amp)
    guarded_model, plain_model = bench.models(cfg, 2)
    steppers = {"plain": bench.plain(cfg, plain_model, amp), "guarded": bench.guard(cfg, guarded_model, amp)}
    models = {"plain": plain_model, "guarded": guarded_model}
    skipped = dict.fromkeys(steppers, 0)

    def make(name: str):
        model, stepper = models[name], steppers[name]

        def run(i: int) -> None:
            clock.check()
            outcomes = stepper.step(bench.forward(model, i, amp))
            skipped[name] += sum(not o.observation.applied for o in outcomes)
        return run

    print(f"step_time {amp}: {args.warmup} warm-up steps, then {args.rounds} rounds x {args.block} steps a side",
          file=sys.stderr)
    times = common.interleaved({name: make(name) for name in steppers}, rounds=args.rounds, block=args.block,
                               warmup=args.warmup, sync=bench.sync, progress=False)  # the log stays short
    for name, stepper in steppers.items():
        skipped[name] += sum(not o.observation.applied for o in stepper.flush())
    summary = common.summarize(times, baseline="plain", block=args.block, batch_size=args.batch)
    guarded, plain = summary["guarded"], summary["plain"]
    ratio = guarded["time_ratio_median"]
    judged = bench.device.type == "cuda" and not args.tiny
    status = ("pass" if ratio <= STEP_TIME_GOAL else "fail") if judged else "measured"
    value = (f"{ratio:.4f} median of {args.rounds} rounds (total {guarded['time_ratio_total']:.4f}; "
             f"{guarded['median_step_seconds'] * 1000:.1f} vs {plain['median_step_seconds'] * 1000:.1f} ms/step)")
    goal = f"<= {STEP_TIME_GOAL}" + ("" if judged else " on the GPU recipe")
    return {
        "amp": amp, "optimizer": f"{cfg.train.optimizer} fused={cfg.train.fused}",
        "param_check_every": cfg.guard.param_check_every, "steps_per_side": args.rounds * args.block,
        "results": summary, "ratio_guarded_over_plain_median": ratio,
        "ratio_guarded_over_plain_total": guarded["time_ratio_total"],
        "ratio_range": [guarded["time_ratio_min"], guarded["time_ratio_max"]],
        "guarded_s_per_step": guarded["median_step_seconds"], "plain_s_per_step": plain["median_step_seconds"],
        "skipped_steps": skipped,
        "checks": [check(f"guarded / plain step time, {amp}", status, value, goal)],
        "_steps": 2 * (args.warmup + args.rounds * args.block),
    }


# ---------------------------------------------------------------------------------------------------
# Section: host syncs (CUDA)


def lines_text(lines: dict[str, int]) -> str:
    """": devicestate.py:44 x6, devicestate.py:45 x6" (file names only), or ""."""
    return (": " + ", ".join(f"{Path(line).name} x{n}" for line, n in lines.items())) if lines else ""


class SyncCounter:
    """Counts the synchronizing CUDA operations torch reports under set_sync_debug_mode("warn"): one
    UserWarning each, recorded with `warnings.catch_warnings(record=True)`; by phase and by source line."""

    def __init__(self, torch) -> None:
        self.torch = torch
        self.counts: Counter[str] = Counter()
        self.lines: dict[str, Counter[str]] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        torch = self.torch
        torch.cuda.synchronize()  # outside the debug mode: what was queued before is not this phase's
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
        self.counts[name] += len(syncs)
        lines = self.lines.setdefault(name, Counter())
        lines.update(f"{_short(w.filename)}:{w.lineno}" for w in syncs)

    def top(self, name: str, n: int = 8) -> dict[str, int]:
        return dict(self.lines.get(name, Counter()).most_common(n))


def host_syncs(bench: Bench) -> dict[str, Any]:
    from nanguard.backends.torch.faults import TorchFaults
    from nanguard.guard import FaultPlan, NullInjectionLog
    from nanguard.guard.host import StepContext

    torch, args = bench.torch, bench.args
    out: dict[str, Any] = {"counted": "only the synchronizing operations torch reports under "
                                      "torch.cuda.set_sync_debug_mode('warn') (one UserWarning each); a wait "
                                      "on a torch.cuda.Event (the guard's one-step-late read) is, to our "
                                      "knowledge, not reported",
                           "steps_counted_per_side": args.sync_steps, "checks": []}
    steps = 0
    for amp in ("bf16", "fp16"):
        bench.clock.check()
        cfg = bench.config(amp)
        guarded_model, plain_model = bench.models(cfg, 2)
        guard, plain = bench.guard(cfg, guarded_model, amp), bench.plain(cfg, plain_model, amp)
        sides = {"guarded": (guarded_model, guard), "plain": (plain_model, plain)}
        for i in range(2):  # warm-up, not counted: lazy init, the first pinned buffer, cuBLAS handles
            for model, stepper in sides.values():
                stepper.step(bench.forward(model, i, amp))
        counter = SyncCounter(torch)
        for i in range(2, 2 + args.sync_steps):
            bench.clock.check()
            for side, (model, stepper) in sides.items():
                ids = bench.batches[i % len(bench.batches)][2]
                with counter.phase(f"{side}/forward"):
                    losses = bench.forward(model, i, amp)
                with counter.phase(f"{side}/backward"):
                    backward = stepper.backward(losses)
                with counter.phase(f"{side}/update"):
                    stepper.update(backward, StepContext(image_ids=ids))
        # a masked step: the guard's skip path (a NaN loss component, injected by nanguard's fault hooks)
        bad = 2 + args.sync_steps
        hooks = TorchFaults(FaultPlan([f"loss_nan@{bad}"]), bad, NullInjectionLog())
        losses = hooks.on_losses(dict(bench.forward(guarded_model, bad, amp)))
        with counter.phase("masked/backward"):
            backward = guard.backward(losses)
        with counter.phase("masked/update"):
            guard.update(backward, StepContext(image_ids=bench.batches[bad % len(bench.batches)][2]))
        outcomes = guard.flush()
        plain.flush()
        masked_seen = any(o.observation.step == bad and not o.observation.applied for o in outcomes)
        steps += 2 * (2 + args.sync_steps) + 1
        c = counter.counts
        n = args.sync_steps
        guard_step = c["guarded/backward"] + c["guarded/update"]
        plain_step = c["plain/backward"] + c["plain/update"]
        entry = {
            "counts": dict(c),
            "per_step": {k: v / (1 if k.startswith("masked") else n) for k, v in c.items()},
            "guarded_step_total": c["guarded/forward"] + guard_step,
            "plain_step_total": c["plain/forward"] + plain_step,
            "guard_adds": guard_step - plain_step,
            "where": {name: counter.top(name) for name in sorted(counter.lines) if counter.lines[name]},
            "masked_step_skipped": masked_seen,
        }
        out[amp] = entry
        out["checks"] += [
            check(f"syncs the guard adds, {amp}", "pass" if guard_step <= plain_step else "fail",
                  f"{guard_step - plain_step} (Guard.step {guard_step} vs PlainStep.step {plain_step} in {n} steps; "
                  f"forward {c['guarded/forward']} vs {c['plain/forward']})", "0"),
            check(f"syncs in the guard's own part (update), {amp}", "pass" if c["guarded/update"] == 0 else "fail",
                  f"{c['guarded/update']} in {n} steps{lines_text(counter.top('guarded/update', 3))}", "0"),
            check(f"syncs in a masked step (NaN loss), {amp}",
                  "pass" if c["masked/update"] == 0 and masked_seen else "fail",
                  f"{c['masked/update']} in update{lines_text(counter.top('masked/update', 3))}; "
                  f"{c['masked/backward']} in backward; skipped: {masked_seen}", "0, skipped"),
        ]
        del guard, plain, sides, guarded_model, plain_model, losses, backward
        bench.free()
    out["_steps"] = steps
    return out


# ---------------------------------------------------------------------------------------------------
# Section: fault injection, state bit-identical


class ListLog:
    """An injection log in memory (nanguard's InjectionLog writes injections.jsonl)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.count = 0

    def record(self, step, spec, rank=0, detail=""):
        line = {"step": int(step), "kind": spec.kind, "rank": int(rank), "detail": detail}
        self.records.append(line)
        self.count += 1
        return line


def state_tensors(model, optimizer, scaler, schedule, guard) -> dict[str, dict[str, Any]]:
    """Every piece of training state, by group, as device copies."""
    from nanguard.backends.torch.devicestate import bn_buffers

    bn = {id(b) for b in bn_buffers(model)}
    groups: dict[str, dict[str, Any]] = {"parameters": {}, "bn_buffers": {}, "other_buffers": {}, "optimizer": {},
                                         "lr_schedule": {}, "grad_scaler": {}, "spike_windows": {}}
    for name, p in model.named_parameters():
        groups["parameters"][name] = p.detach().clone()
    for name, b in model.named_buffers():
        groups["bn_buffers" if id(b) in bn else "other_buffers"][name] = b.detach().clone()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if hasattr(value, "detach"):
                groups["optimizer"][f"{names.get(id(p), id(p))}/{key}"] = value.detach().clone()
    for key, value in (schedule.state_dict() if schedule is not None else {}).items():
        groups["lr_schedule"][key] = value.detach().clone()
    if scaler is not None and scaler.is_enabled() and getattr(scaler, "_scale", None) is not None:
        groups["grad_scaler"]["scale"] = scaler._scale.detach().clone()
        groups["grad_scaler"]["growth_tracker"] = scaler._growth_tracker.detach().clone()
    for which in ("loss_spikes", "grad_spikes"):
        for key, value in getattr(guard.device_step, which).state_dict().items():
            groups["spike_windows"][f"{which}/{key}"] = value.detach().clone()
    return groups


def same_bits(a, b) -> bool:
    """Bit for bit (a NaN equals the same NaN; -0.0 differs from 0.0)."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8).cpu(),
                       b.detach().contiguous().reshape(-1).view(torch.uint8).cpu())


def compare(before: dict, after: dict) -> dict[str, dict[str, Any]]:
    result = {}
    for group in before:
        keys = sorted(set(before[group]) | set(after[group]))
        differ = [k for k in keys if k not in before[group] or k not in after[group]
                  or not same_bits(before[group][k], after[group][k])]
        result[group] = {"tensors": len(keys), "identical": not differ, "differ": differ[:6],
                         "differ_count": len(differ)}
    return result


SCENARIOS = (("nan_image_bf16", "NaN image, bf16", "bf16", "nan_input"),
             ("nan_image_fp16", "NaN image, fp16 + GradScaler", "fp16", "nan_input"),
             ("fp16_overflow", "fp16 overflow, fp16 + GradScaler", "fp16", "fp16_overflow"))


def injection(bench: Bench) -> dict[str, Any]:
    out: dict[str, Any] = {"healthy_steps_before": bench.args.healthy_steps, "scenarios": {}, "checks": []}
    steps = 0
    for key, label, amp, kind in SCENARIOS:
        bench.clock.check()
        try:
            entry = inject_one(bench, amp, kind)
        except OutOfTime:
            raise
        except Exception as exc:
            entry = {"error": error_text(exc), **where(exc), "traceback": traceback.format_exc()[-3000:],
                     "status": "error"}
        finally:
            bench.free()
        steps += bench.args.healthy_steps + 1
        out["scenarios"][key] = dict(entry, label=label)
        out["checks"].append(check(label, entry["status"], entry.get("summary", entry.get("error")),
                                   entry.get("goal", "")))
    out["_steps"] = steps
    return out


def inject_one(bench: Bench, amp: str, kind: str) -> dict[str, Any]:
    from nanguard.backends.torch.faults import TorchFaults
    from nanguard.backends.torch.step import NO_HOOKS
    from nanguard.guard import FaultPlan
    from nanguard.guard.host import StepContext

    cfg = bench.config(amp)
    [model] = bench.models(cfg, 1)
    guard = bench.guard(cfg, model, amp)
    scaler = guard.device_step.scaler.scaler
    k = bench.args.healthy_steps
    plan, log = FaultPlan([f"{kind}@{k}"], seed=bench.args.seed), ListLog()
    raised: list[str] = []

    def run_step(step: int, hooks) -> list:
        """One step as the trainer's (TorchBackend.step) runs it, with the fault hooks at their points."""
        images, targets, ids = bench.batches[step % len(bench.batches)]
        images = [image.clone() for image in images]  # nan_input writes into the batch: keep ours clean
        hooks.on_batch(images, targets, ids)
        try:
            losses = bench.forward(model, step, amp, images=images)
        except Exception as exc:  # the model refused the batch: the trainer's model_error path
            raised.append(error_text(exc, 300))
            return guard.skip_batch(exc, image_ids=ids)
        backward = guard.backward(hooks.on_losses(dict(losses)))
        hooks.after_backward(guard.params)
        outcomes = guard.update(backward, StepContext(image_ids=ids))
        hooks.after_update(guard.params)
        return outcomes

    outcomes = []
    for step in range(k):
        bench.clock.check()
        outcomes += run_step(step, NO_HOOKS)
    outcomes += guard.flush()
    bench.sync()
    before = state_tensors(model, guard.optimizer, scaler, guard.schedule, guard)
    scale_before = float(scaler.get_scale()) if scaler.is_enabled() else None  # sync-ok: outside the step
    outcomes += run_step(k, TorchFaults(plan, k, log))
    outcomes += guard.flush()
    bench.sync()
    after = state_tensors(model, guard.optimizer, scaler, guard.schedule, guard)
    diff = compare(before, after)

    [bad] = [o for o in outcomes if o.observation.step == k] or [None]
    if bad is None:
        return {"status": "fail", "summary": f"no outcome for step {k}", "injected": log.records}
    obs, decision = bad.observation, bad.decision
    skipped = not obs.applied
    judged_groups = ["parameters", "bn_buffers", "other_buffers", "optimizer", "lr_schedule"]
    entry: dict[str, Any] = {
        "injected": log.records, "forward_raised": raised or None,
        "skipped": skipped, "action": decision.action, "kinds": list(decision.kinds), "reason": decision.reason,
        "scale_overflow": obs.scale_overflow, "loss_scale": obs.loss_scale,
        "nonfinite_loss": obs.nonfinite_loss, "nonfinite_grad": obs.nonfinite_grad,
        "state": diff, "healthy_outcomes": [(o.observation.step, o.observation.applied, o.decision.action)
                                            for o in outcomes if o.observation.step < k],
    }
    if kind == "nan_input":
        named = bool({"nonfinite_loss", "model_error"} & set(decision.kinds))
        scaler_ok = diff["grad_scaler"]["identical"]
        judged_groups.append("grad_scaler")
        entry["expected"] = ("skipped; every group bit-identical, the GradScaler's too; named nonfinite_loss "
                             "(or model_error, should the model refuse the batch)")
        entry["goal"] = "skipped, state identical, named"
        scaler_text = "scaler unchanged" if scaler.is_enabled() else "no scaler"
    else:  # an fp16 overflow is the scaler's: it backs off (scale x backoff, tracker 0); not an incident
        named = obs.scale_overflow and not decision.kinds
        backoff = scaler.get_backoff_factor()
        new_scale = float(after["grad_scaler"]["scale"].reshape(()).item())  # sync-ok: outside the step
        tracker = int(after["grad_scaler"]["growth_tracker"].reshape(()).item())  # sync-ok: outside the step
        scaler_ok = scale_before is not None and new_scale == scale_before * backoff and tracker == 0
        entry["grad_scaler_backoff"] = {"before": scale_before, "after": new_scale, "backoff_factor": backoff,
                                        "growth_tracker_after": tracker, "as_torch_does": scaler_ok}
        entry["expected"] = ("skipped; every group bit-identical but the GradScaler, which backs off (scale x "
                             "backoff_factor, growth tracker 0) as torch's does; named scale_overflow, not an incident")
        entry["goal"] = "skipped, state identical, scaler backs off"
        scaler_text = f"scaler {scale_before:g} -> {new_scale:g}"
    identical = all(diff[g]["identical"] for g in judged_groups)
    entry["status"] = "pass" if skipped and identical and scaler_ok and named else "fail"
    moved = [g for g in judged_groups if not diff[g]["identical"]]
    tensors = sum(diff[g]["tensors"] for g in judged_groups)
    names = list(decision.kinds) or (["scale_overflow (not an incident)"] if obs.scale_overflow else ["nothing"])
    entry["summary"] = ("skipped" if skipped else "APPLIED") + "; " + (
        f"{tensors} state tensors bit-identical" if identical else f"MOVED: {', '.join(moved)}") + (
        f"; {scaler_text}" + ("" if scaler_ok else " (WRONG)")) + f"; named {', '.join(names)}" + (
        f"; the forward raised: {raised[0][:80]}" if raised else "")
    entry["spike_windows_identical"] = diff["spike_windows"]["identical"]  # reported, not judged
    return entry


# ---------------------------------------------------------------------------------------------------
# Section: nanguard vs a plain torchvision loop (img/s)


def throughput(bench: Bench) -> dict[str, Any]:
    torch, args, clock = bench.torch, bench.args, bench.clock
    amp = "bf16"
    cfg = bench.config(amp)
    guarded_model, plain_model = bench.models(cfg, 2)
    guard = bench.guard(cfg, guarded_model, amp)
    outcomes: list = []

    def nanguard_step(i: int) -> None:
        clock.check()
        outcomes.extend(guard.step(bench.forward(guarded_model, i, amp)))

    # torchvision's references/detection/engine.py train_one_epoch (as benchmarks/throughput.py)
    params = [p for p in plain_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    warmup = max(1, cfg.train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    clip = cfg.guard.clip_norm if cfg.guard.clip_norm > 0 else math.inf
    nonfinite = [0]

    def plain_step(i: int) -> None:
        clock.check()
        losses = sum(loss for loss in bench.forward(plain_model, i, amp).values())
        if not math.isfinite(losses.item()):  # the reference's sync: it logs the value, exits if not finite
            nonfinite[0] += 1
        optimizer.zero_grad()
        losses.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()

    print(f"throughput {amp}: {args.warmup} warm-up steps, then {args.rounds} rounds x {args.block} steps a side",
          file=sys.stderr)
    times = common.interleaved({"plain": plain_step, "nanguard": nanguard_step}, rounds=args.rounds,
                               block=args.block, warmup=args.warmup, sync=bench.sync, progress=False)
    outcomes.extend(guard.flush())
    summary = common.summarize(times, baseline="plain", block=args.block, batch_size=args.batch)
    ours, plain = summary["nanguard"], summary["plain"]
    ratio = ours["images_per_second"] / plain["images_per_second"]
    ratio_median = 1.0 / ours["time_ratio_median"]
    value = (f"{ratio_median:.4f} median of rounds (total {ratio:.4f}; {ours['images_per_second']:.1f} vs "
             f"{plain['images_per_second']:.1f} img/s)")
    return {
        "amp": amp, "results": summary, "ratio_images_per_second": ratio,
        "ratio_images_per_second_median": ratio_median,
        "plain": "torch.optim.SGD (default implementation), loss.item() every step, clip_grad_norm_, LinearLR",
        "plain_nonfinite_losses": nonfinite[0],
        "nanguard_skipped_steps": sum(not o.observation.applied for o in outcomes),
        "checks": [check("nanguard / torchvision loop img/s, bf16", "measured", value, "none set")],
        "_steps": 2 * (args.warmup + args.rounds * args.block),
    }


# ---------------------------------------------------------------------------------------------------
# Section: CUDA graph capture of the guard's device part (CUDA)


def cuda_graph(bench: Bench) -> dict[str, Any]:
    from nanguard.backends.torch.guard import GuardedStep

    torch = bench.torch
    out: dict[str, Any] = {"attempts": {}, "checks": []}
    healthy = [True]

    def attempt(label: str, step: GuardedStep, model, amp: str, body: Callable[[Any], Any], i: int) -> None:
        if not healthy[0]:
            entry = {"status": "skipped", "reason": "skipped: the CUDA context failed after an earlier attempt"}
        else:
            try:
                entry = capture(step, model, amp, body, i)
            except OutOfTime:
                raise
            except Exception as exc:  # outside the capture itself (the eager forward/backward before it)
                entry = {"status": "error", "error": error_text(exc), **where(exc)}
                healthy[0] = False
        out["attempts"][label] = entry
        if entry.get("replayed"):
            value = "captured and replayed"
        elif entry.get("captured"):
            value = "captured; the replay failed: " + entry.get("replay_error", "")[:200]
        else:
            frame = entry.get("nanguard_frame") or entry.get("innermost_frame") or ""
            value = entry.get("reason") or f"{entry.get('error', '')[:200]} at {frame[:160]}"
        out["checks"].append(check(f"capture {label}", entry["status"], value, "captured (a report)"))

    def capture(step: GuardedStep, model, amp: str, body, i: int) -> dict[str, Any]:
        bench.clock.check()
        backward = step.backward(bench.forward(model, i, amp))
        kept = [p.grad for p in step.params]  # the graph reads these: alive for the replay
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream()
        graph = torch.cuda.CUDAGraph()
        entry: dict[str, Any] = {"captured": False}
        try:
            with torch.cuda.graph(graph):
                result = body(backward)
            entry["captured"] = True
        except Exception as exc:
            chain, seen = [], exc
            while seen is not None and len(chain) < 4:
                chain.append({"error": error_text(seen), **where(seen)})
                seen = seen.__context__
            # the original failure: the first with a nanguard frame (the graph's own exit error has none)
            first = next((c for c in chain if c["nanguard_frame"]), chain[-1])
            with contextlib.suppress(Exception):  # a failed capture_end leaves its side stream current
                torch.cuda.set_stream(stream)
            entry.update(status="fail", error=first["error"], nanguard_frame=first["nanguard_frame"],
                         innermost_frame=first["innermost_frame"], chain=chain)
        if entry["captured"]:
            try:
                graph.replay()
                torch.cuda.synchronize()
                entry["replayed"] = True
                if isinstance(result, torch.Tensor):
                    entry["vector_finite_fields"] = int(torch.isfinite(result).sum().item())  # sync-ok: report
                entry["status"] = "pass"
            except Exception as exc:
                entry.update(status="fail", replayed=False, replay_error=error_text(exc))
        try:
            torch.cuda.synchronize()
            entry["context_ok_after"] = True
        except Exception as exc:
            entry["context_ok_after"] = False
            entry["context_error"] = error_text(exc)
            healthy[0] = False
        del kept, graph
        return entry

    def prepared(amp: str):
        cfg = bench.config(amp)
        [model] = bench.models(cfg, 1)
        scaler = bench.scaler(amp)
        step = GuardedStep(model, bench.build_optimizer(cfg, model), scaler=scaler if amp == "fp16" else None,
                           config=cfg.guard, schedule=bench.LRSchedule(cfg.train, bench.device))
        side = torch.cuda.Stream()  # torch's recipe: warm up eagerly on a side stream before capturing
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(2):
                step.update(step.backward(bench.forward(model, i, amp)))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        return step, model

    step, model = prepared("bf16")
    attempt("check, bf16", step, model, "bf16", lambda b: step._check(b), 2)
    attempt("check + agree, bf16", step, model, "bf16", lambda b: step._agree(step._check(b), b), 3)
    attempt("check + agree + apply (update), bf16", step, model, "bf16", lambda b: step.update(b), 4)
    del step, model
    bench.free()
    if healthy[0]:
        step, model = prepared("fp16")
        attempt("update, fp16 + GradScaler", step, model, "fp16", lambda b: step.update(b), 5)
        del step, model
    out["capturable"] = all(a.get("status") == "pass" for a in out["attempts"].values())
    out["_steps"] = 10
    return out


# ---------------------------------------------------------------------------------------------------
# The run


def run_section(name: str, fn: Callable[[], dict[str, Any]], bench: Bench, report: Report, clock: Clock,
                planned_steps: int) -> None:
    """Run one section unless it is not chosen, needs CUDA here, or would not fit the budget; whatever
    happens, its entry (status, checks, seconds) goes into the JSON, which is rewritten at once."""
    device = bench.device.type
    entry: dict[str, Any]
    if name not in bench.args.sections:
        entry = {"status": "skipped", "reason": "skipped: not in --sections"}
    elif name in CUDA_ONLY and device != "cuda":
        entry = {"status": "skipped", "reason": "skipped: needs CUDA"}
    elif clock.elapsed() > clock.budget_s or (
            (estimate := clock.estimate(planned_steps)) is not None and clock.elapsed() + estimate > clock.budget_s):
        entry = {"status": "skipped",
                 "reason": f"skipped: out of time ({clock.elapsed():.0f} s elapsed of {clock.budget_s:.0f} s)"}
    else:
        print(f"--- {name} ({clock.elapsed():.0f} s elapsed)", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            entry = fn()
            statuses = {c["status"] for c in entry.get("checks", [])}
            entry["status"] = ("error" if "error" in statuses else "fail" if "fail" in statuses else
                               "pass" if "pass" in statuses else "measured" if "measured" in statuses else "skipped")
        except OutOfTime as exc:
            entry = {"status": "skipped", "reason": f"skipped: out of time (stopped in the middle: {exc})"}
        except Exception as exc:
            entry = {"status": "error", "error": error_text(exc), **where(exc),
                     "traceback": traceback.format_exc()[-4000:]}
            print(f"gpu_check: section {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
        finally:
            if device == "cuda":
                with contextlib.suppress(Exception):
                    bench.torch.cuda.set_sync_debug_mode("default")
            with contextlib.suppress(Exception):
                bench.free()
        entry["seconds"] = round(time.monotonic() - started, 2)
        steps = entry.pop("_steps", 0)
        if entry["status"] in ("pass", "fail", "measured") and steps:
            clock.learn(entry["seconds"], steps)
    if not entry.get("checks"):
        entry["checks"] = [check(name, entry["status"], entry.get("reason") or entry.get("error") or "", "")]
    report.data["sections"][name] = entry
    report.write()
    for c in entry["checks"]:  # as it goes (stderr): the log shows what ran even if the process is killed
        print(f"  [{c['status']}] {c['check']}: {c['value']}", file=sys.stderr, flush=True)


def print_summary(report: Report, plain: bool = True) -> None:
    data = report.data
    rows = [[c["section"], c["check"], c["status"], c["value"], c["goal"]] for c in data["checks"]]
    machine = data.get("machine", {})
    s = data["settings"]
    title = (f"gpu_check: {s['model']}, batch {s['batch']}, {s['size']} px, {s['steps']} steps a side, "
             f"{machine.get('device_name', s['device'])}, torch {machine.get('torch', '?')}")
    common.print_table(title, ["section", "check", "status", "value", "goal"], rows, plain=plain)
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(data["summary"].items()))
          + f"; {data['elapsed_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faulthandler.enable()
    clock = Clock(args.budget_s)
    report = Report(args.out, args)
    start_watchdog(report, clock)
    report.data["stand_ins"] = install_stand_ins()
    for why in report.data["stand_ins"].values():
        print(f"gpu_check: {why}", file=sys.stderr)
    try:
        report.data["machine"] = common.machine_info(args.device)
        bench = Bench(args, clock)
        report.data["data"] = {"source": bench.data_source, "seconds": round(bench.data_seconds, 2)}
        if bench.device.type == "cuda":
            torch = bench.torch
            props = torch.cuda.get_device_properties(0)
            report.data["machine"].update(gpu_memory_gib=round(props.total_memory / 2**30, 1),
                                          capability=f"{props.major}.{props.minor}",
                                          cudnn=torch.backends.cudnn.version())
    except Exception as exc:
        from nanguard.errors import UserError

        report.data["setup_error"] = {"error": error_text(exc), **where(exc),
                                      "traceback": traceback.format_exc()[-4000:]}
        report.write(quiet=False)
        print(f"gpu_check: setup failed: {error_text(exc)}", file=sys.stderr)
        if not isinstance(exc, UserError):
            traceback.print_exc()
        return 2 if isinstance(exc, UserError) else 1
    report.write()

    plan = {
        "host_syncs": (lambda: host_syncs(bench), 2 * (2 * (2 + args.sync_steps) + 1)),
        "injection": (lambda: injection(bench), 3 * (args.healthy_steps + 1)),
        "step_time_bf16": (lambda: step_time(bench, "bf16"), 2 * (args.warmup + args.rounds * args.block)),
        "step_time_fp16": (lambda: step_time(bench, "fp16"), 2 * (args.warmup + args.rounds * args.block)),
        "throughput": (lambda: throughput(bench), 2 * (args.warmup + args.rounds * args.block)),
        "cuda_graph": (lambda: cuda_graph(bench), 10),
    }
    for name in SECTIONS:
        fn, planned = plan[name]
        run_section(name, fn, bench, report, clock, planned)
    report.data["complete"] = True
    report.write()
    print_summary(report, plain=not args.rich_table)
    print(f"wrote {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
