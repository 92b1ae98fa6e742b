"""What does the guard's agreement cost a distributed step? 2 ranks (gloo on CPU), side by side.

    python benchmarks/distributed_overhead.py                    # 2 ranks, 30 steps a run, 2 rounds
    python benchmarks/distributed_overhead.py --steps 60 --rounds 3 --nproc 2

1. Whole steps: `nanguard train --nproc N` guarded vs unguarded (guard.enabled=false: DDP's own loop,
   backward, clip, step), the demo's tiny model on generated shapes, alternated --rounds times; the
   ratio of their seconds per step (final.json's train_seconds).
2. The collectives alone, in N spawned processes: the guard's one per-step all-reduce (the agree
   vector: 5 flags and a digest slot per rank, the 4 loss components and the total, float64) against a
   4-byte all-reduce, against the same vector sized for 1,000 ranks (what the per-rank slots cost at
   scale), and against the gradient all-reduce of the tiny model (its parameter count, float32).
3. Rollback at scale, one process: the state of a ResNet-50-FPN Faster R-CNN (random init, with SGD
   momentum) copied into a host snapshot (what the guard keeps every policy.snapshot_every steps),
   copied back (a rollback), and written / read as a nanguard checkpoint (atomic write with fsync, a
   `weights_only` load): the floor for a rollback from memory and from disk (--no-scale skips it).
Prints tables and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, print_table, run_main, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="steps of each training run (default 30)")
    parser.add_argument("--rounds", type=int, default=2, help="guarded/unguarded pairs (default 2)")
    parser.add_argument("--size", type=int, default=96, help="image side (default 96)")
    parser.add_argument("--batch", type=int, default=4, help="images per rank per step (default 4)")
    parser.add_argument("--collective-reps", type=int, default=200)
    parser.add_argument("--no-scale", action="store_true", help="skip part 3 (ResNet-50-FPN state)")
    parser.add_argument("--plain-table", action="store_true")
    parser.add_argument("--json-out", default="bench-out/distributed_overhead.json")
    return parser.parse_args(argv)


def train(run: Path, data: Path, args: argparse.Namespace, guarded: bool) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "-m", "nanguard", "train", "--nproc", str(args.nproc), "--quiet", "--out", str(run),
               f"data.root={data}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
               f"model.min_size={args.size}", f"model.max_size={args.size}", "train.eval_at_end=false",
               "train.threads=1", f"guard.enabled={'true' if guarded else 'false'}", "train.warmup_steps=5"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stderr[-3000:]}")
    return json.loads((run / "final.json").read_text())["train_seconds"] / args.steps


def _collectives(rank: int, world: int, port: int, reps: int, numel_grads: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    tensors = {"4-byte flag (float32)": torch.zeros(1),
               f"guard agree vector, {world} ranks (float64)": torch.zeros(6 * world + 5, dtype=torch.float64),
               "guard agree vector sized for 1,000 ranks (float64)": torch.zeros(6 * 1000 + 5, dtype=torch.float64),
               f"gradients ({numel_grads / 1e6:.1f} M float32)": torch.zeros(numel_grads)}
    results = {}
    for name, tensor in tensors.items():
        for _ in range(5):
            dist.all_reduce(tensor)
        dist.barrier()
        start = time.perf_counter()
        count = reps if tensor.numel() < 10_000 else max(5, reps // 20)
        for _ in range(count):
            dist.all_reduce(tensor)
        results[name] = (time.perf_counter() - start) / count * 1e3
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def collectives(args: argparse.Namespace, numel_grads: int) -> dict[str, float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "collectives.json")
        port = 29500 + os.getpid() % 1000
        mp.spawn(_collectives, args=(args.nproc, port, args.collective_reps, numel_grads, out), nprocs=args.nproc)
        return json.loads(Path(out).read_text())


def rollback_at_scale(reps: int = 3) -> dict[str, float]:
    """Seconds (median of `reps`) to snapshot, restore, save and load a ResNet-50-FPN training state."""
    import torch
    import torchvision

    from nanguard.backends.torch.checkpoint import load_checkpoint, save_checkpoint

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the momentum buffers
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    tensors = [t for t in model.state_dict().values()] + [v["momentum_buffer"] for v in optimizer.state.values()]
    snapshot = [torch.empty_like(t, device="cpu") for t in tensors]
    times: dict[str, list[float]] = {"snapshot (copy to host)": [], "rollback (copy back)": [],
                                     "checkpoint write (atomic, fsync)": [], "checkpoint read (weights_only)": []}
    with tempfile.TemporaryDirectory(prefix="nanguard-ckpt-") as tmp:
        path = Path(tmp) / "step_00000001.pt"
        for _ in range(reps):
            start = time.perf_counter()
            for dst, src in zip(snapshot, tensors):
                dst.copy_(src)
            times["snapshot (copy to host)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                for dst, src in zip(tensors, snapshot):
                    dst.copy_(src)
            times["rollback (copy back)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            save_checkpoint(path, {"backend": state})
            times["checkpoint write (atomic, fsync)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load_checkpoint(path)
            times["checkpoint read (weights_only)"].append(time.perf_counter() - start)
        size = path.stat().st_size
    result = {name: statistics.median(values) for name, values in times.items()}
    result["bytes"] = float(size)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nanguard.backends.torch.model import build_model
    from nanguard.config import load_config
    from nanguard.data.synth import generate

    numel = sum(p.numel() for p in build_model(load_config(None).model, 3).parameters())
    seconds: dict[str, list[float]] = {"guarded": [], "unguarded": []}
    with tempfile.TemporaryDirectory(prefix="nanguard-dist-") as tmp:
        data = Path(tmp) / "shapes"
        generate(data, images=max(64, 4 * args.batch * args.nproc), val_images=2, size=args.size, classes=3, seed=0,
                 progress=False)
        for r in range(args.rounds):
            order = ("guarded", "unguarded") if r % 2 == 0 else ("unguarded", "guarded")
            for mode in order:
                seconds[mode].append(train(Path(tmp) / f"{mode}-{r}", data, args, mode == "guarded"))
                print(f"round {r + 1}: {mode} {seconds[mode][-1]:.3f} s/step", file=sys.stderr)
    guarded, unguarded = statistics.median(seconds["guarded"]), statistics.median(seconds["unguarded"])
    coll = collectives(args, numel)
    scale = None if args.no_scale else rollback_at_scale()
    print_table(f"distributed step, {args.nproc} ranks (gloo, CPU)", ["loop", "s/step (median)", "ratio"],
                [["unguarded (DDP: backward, clip, step)", unguarded, 1.0],
                 ["guarded (nanguard: + hook, one agree all-reduce)", guarded, guarded / unguarded]],
                plain=args.plain_table)
    print_table(f"one all-reduce, {args.nproc} ranks (gloo, loopback)", ["tensor", "ms"],
                [[name, ms] for name, ms in coll.items()], plain=args.plain_table)
    if scale:
        print_table(f"ResNet-50-FPN training state ({scale['bytes'] / 1e6:.0f} MB on disk), one process",
                    ["operation", "seconds (median)"], [[k, v] for k, v in scale.items() if k != "bytes"],
                    plain=args.plain_table)
    write_json(args.json_out, {"benchmark": "distributed_overhead", "machine": machine_info(), "nproc": args.nproc,
                               "steps": args.steps, "s_per_step": seconds, "ratio_guarded_over_unguarded":
                               guarded / unguarded, "collective_ms": coll, "model_parameters": numel,
                               "rollback_at_scale_seconds": scale})
    return 0


if __name__ == "__main__":
    run_main(main, __file__)
