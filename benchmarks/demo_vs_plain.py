"""Does `make demo` learn as well, and step as fast, as a plain torchvision loop on the same data?

    python benchmarks/demo_vs_plain.py                   # 200 steps each on the demo's generated shapes
    python benchmarks/demo_vs_plain.py --steps 2200      # the demo's length
    python benchmarks/demo_vs_plain.py --order nanguard-first train.threads=1

Two trainings of the same number of steps (--steps; the LR schedule of both spans them), one after the
other in this process, on the same data (the demo's generated shapes, or --data DIR), evaluated on the
same validation split with the same COCO evaluation:
- plain: a torchvision loop as one writes it by hand. The model is built here from torchvision's
  classes: mobilenet_v3_large features (nn.BatchNorm2d, trainable), a 64-channel FPN on
  strides 4, 8, 16, 32 plus a max-pool level, one anchor size per level (12, 24, 48, 96, 192 px; ratios
  0.5, 1, 2), RoIAlign over the four conv levels, 100 proposals and 128 sampled RoIs per image, random
  init. Every training image is decoded into memory before the clock starts; each epoch is a seeded
  shuffle, each image flipped with probability 0.5. torch.optim.SGD with the demo config's lr, momentum
  and weight decay, its warm-up and cosine schedule, the gradient clipped at its clip norm; no guard.
- nanguard: `nanguard train` itself (the trainer, in this process) with the demo config and
  train.steps=--steps: the guard on, images decoded by the loader's prefetch thread and cached, the
  audit, the checkpoints it writes.
Reported for each: training seconds (nanguard: final.json's train_seconds; plain: the loop alone, the
up-front decoding shown apart), s/step, img/s, the ratio of s/step nanguard/plain, and mAP50 / mAP.

The two runs are not interleaved (a training cannot be cut into blocks without changing it), so on a
machine that other processes share the ratio moves with their load: the JSON records the load average
before and after each run. Prints a table and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PLAIN_ANCHOR_SIZES = ((12,), (24,), (48,), (96,), (192,))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for the nanguard run (the plain loop takes lr, momentum, weight "
                             "decay, warm-up, schedule floor, clip norm, batch size, seed from the result)")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run (default 200)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a synth-layout folder (default: the demo's generated shapes, made on first use)")
    parser.add_argument("--order", choices=["plain-first", "nanguard-first"], default="plain-first")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--workdir", default=None,
                        help="where the nanguard run folder goes (default: a temporary folder, removed)")
    parser.add_argument("--plain-table", action="store_true", help="aligned text instead of rich")
    parser.add_argument("--json-out", default="bench-out/demo_vs_plain.json")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def build_plain_model(num_classes: int):
    """The plain loop's Faster R-CNN, from torchvision's classes only (`num_classes` foreground)."""
    from torch import nn
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    # nn.BatchNorm2d (momentum 0.1), not mobilenet_v3's default BatchNorm2d(eps=0.001, momentum=0.01): from
    # random init the slow running statistics lag the weights, and eval collapses (measured: 300 steps gave
    # mAP50 0.000 in eval mode, 0.204 with the same weights after re-estimating the BN statistics)
    features = mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d).features
    returned = [3, 6, 12, len(features) - 1]  # the last block at strides 4, 8, 16 and 32
    backbone = BackboneWithFPN(features, {str(i): str(k) for k, i in enumerate(returned)},
                               [features[i].out_channels for i in returned], 64, extra_blocks=LastLevelMaxPool())
    anchors = AnchorGenerator(PLAIN_ANCHOR_SIZES, ((0.5, 1.0, 2.0),) * len(PLAIN_ANCHOR_SIZES))
    return FasterRCNN(
        backbone, min_size=128, max_size=128, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(64 * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes + 1),
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        box_batch_size_per_image=128, box_detections_per_img=100, box_score_thresh=0.01)


def train_plain(cfg, paths, steps: int, device) -> dict[str, Any]:
    """The plain loop; returns seconds (decode, train, eval), s/step and mAP."""
    import numpy as np
    import torch

    from nanguard.run.data import validation_data
    from nanguard.data.coco import build_index, read_coco_json
    from nanguard.data.loader import load_image

    index = build_index(read_coco_json(paths.train_ann), paths.train_ann, paths.train_images)
    started = time.perf_counter()
    images = [torch.from_numpy(np.array(load_image(r.path))).permute(2, 0, 1).contiguous() for r in index.records]
    decode_seconds = time.perf_counter() - started
    boxes = [torch.from_numpy(r.boxes) for r in index.records]
    labels = [torch.from_numpy(r.labels) for r in index.records]

    torch.manual_seed(cfg.seed)
    model = build_plain_model(index.num_classes).to(device)
    model.train()
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to min_lr_ratio
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        return warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    clip = cfg.guard.clip_norm if cfg.guard.clip_norm > 0 else math.inf
    generator = torch.Generator().manual_seed(cfg.seed)
    per_epoch = max(1, len(images) // t.batch_size)
    nonfinite, order = 0, None
    started = time.perf_counter()
    for step in range(steps):
        position = step % per_epoch
        if position == 0:
            order = torch.randperm(len(images), generator=generator)
        batch_images, targets = [], []
        for i in order[position * t.batch_size:(position + 1) * t.batch_size].tolist():
            image, box = images[i], boxes[i]
            if cfg.data.hflip and torch.rand((), generator=generator) < 0.5:
                image = image.flip(-1)
                box = box.clone()
                box[:, [0, 2]] = image.shape[-1] - boxes[i][:, [2, 0]]
            batch_images.append(image.to(device).float().div_(255.0))
            targets.append({"boxes": box.to(device), "labels": labels[i].to(device)})
        losses = sum(model(batch_images, targets).values())
        if not math.isfinite(losses.item()):  # what a plain loop checks, and pays a host sync for
            nonfinite += 1
        optimizer.zero_grad()
        losses.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
    train_seconds = time.perf_counter() - started

    val_index, document = validation_data(paths, index.category_ids)
    started = time.perf_counter()
    from nanguard.backends.torch.backend import TorchBackend
    from nanguard.evaluation.coco import evaluate_boxes
    from nanguard.run.evaluate import predict

    backend = TorchBackend(device)
    backend.model = model  # the plain loop's model, predicted as nanguard's evaluation does
    detections = predict(backend, val_index, batch_size=cfg.eval.batch_size, min_size=cfg.model.min_size,
                         max_size=cfg.model.max_size)
    metrics, _ = evaluate_boxes(document, detections)
    return {"decode_seconds": round(decode_seconds, 3), "train_seconds": round(train_seconds, 3),
            "eval_seconds": round(time.perf_counter() - started, 3), "steps": steps,
            "nonfinite_losses": nonfinite, "mAP50": metrics["mAP50"], "mAP": metrics["mAP"]}


def train_nanguard(cfg, steps: int, device, workdir: Path) -> dict[str, Any]:
    """`nanguard train` with `cfg` in a fresh run folder; its final.json, plus the wall seconds."""
    from nanguard.backends.torch.backend import TorchBackend
    from nanguard.config import dump_yaml
    from nanguard.run.folder import RunFolder
    from nanguard.run.trainer import train

    run_dir = workdir / f"nanguard-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    with RunFolder.create(run_dir, dump_yaml(cfg)) as folder:
        final = train(cfg, folder, TorchBackend(device), resuming=False, quiet=True)
    return {"train_seconds": final["train_seconds"], "wall_seconds": round(time.perf_counter() - started, 3),
            "steps": final["steps"], "status": final["status"], "skipped_steps": final.get("skipped_steps"),
            "incidents": final.get("incidents"), "mAP50": final["mAP50"], "mAP": final["mAP"],
            "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from nanguard.run.data import resolve_data
    from nanguard.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"train.steps={args.steps}", *([f"data.root={args.data}"] if args.data else []), *args.overrides]
    cfg = load_config("demo", overrides)
    device = torch.device("cpu")
    paths = resolve_data(cfg, quiet=True)
    print(f"data: {paths.train_ann.parent.parent}; {args.steps} steps each, {args.order}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="demo_vs_plain-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        results: dict[str, dict[str, Any]] = {}
        names = ["plain", "nanguard"] if args.order == "plain-first" else ["nanguard", "plain"]
        for name in names:
            load_before = _load()
            print(f"training {name} ...", file=sys.stderr)
            if name == "plain":
                results[name] = train_plain(cfg, paths, args.steps, device)
            else:
                results[name] = train_nanguard(cfg, args.steps, device, workdir)
            results[name].update(load_average_before=load_before, load_average_after=_load())
            r = results[name]
            r["step_seconds"] = r["train_seconds"] / max(1, r["steps"])
            r["images_per_second"] = r["steps"] * cfg.train.batch_size / max(r["train_seconds"], 1e-9)
            print(f"  {name}: {r['step_seconds']:.3f} s/step, mAP50 {r['mAP50']:.3f}, mAP {r['mAP']:.3f}",
                  file=sys.stderr)

    plain, ours = results["plain"], results["nanguard"]
    ratio = ours["step_seconds"] / plain["step_seconds"]
    title = (f"demo vs plain torchvision loop: {args.steps} steps, batch {cfg.train.batch_size}, "
             f"{common.machine_info()['device_name']}, {torch.get_num_threads()} threads")
    columns = ["loop", "steps", "train s", "s/step", "img/s", "s/step vs plain", "mAP50", "mAP", "load before/after"]
    rows = [[label, r["steps"], r["train_seconds"], r["step_seconds"], r["images_per_second"],
             r["step_seconds"] / plain["step_seconds"], r["mAP50"], r["mAP"],
             f"{r['load_average_before']}/{r['load_average_after']}"]
            for label, r in (("plain torchvision loop", plain), ("nanguard train (demo config)", ours))]
    common.print_table(title, columns, rows, plain=args.plain_table)
    print(f"nanguard/plain s/step: {ratio:.3f}; mAP50 {ours['mAP50']:.3f} vs {plain['mAP50']:.3f}, "
          f"mAP {ours['mAP']:.3f} vs {plain['mAP']:.3f}")

    result = {
        "benchmark": "demo_vs_plain",
        "machine": common.machine_info("cpu"),
        "settings": {"steps": args.steps, "order": args.order, "threads": args.threads,
                     "data": str(paths.train_ann.parent.parent), "overrides": args.overrides,
                     "batch": cfg.train.batch_size, "lr": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
                     "config": cfg.to_dict()},
        "results": results,
        "ratio_step_seconds": ratio,
    }
    common.write_json(args.json_out, result)
    return 0


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


if __name__ == "__main__":
    common.run_main(main, __file__)
