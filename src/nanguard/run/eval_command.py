"""`nanguard eval RUN_DIR|CHECKPOINT`: COCO mAP on the validation split, the 12-line table, eval.json."""

from __future__ import annotations

import sys
from pathlib import Path

from nanguard.errors import UserError
from nanguard.fileio import atomic_write_json, dumps, json_safe


def run(args) -> int:
    from nanguard.config import apply_override, config_from_dict
    from nanguard.evaluation.coco import evaluate_boxes
    from nanguard.run.backend import create_backend
    from nanguard.run.checkpoints import Checkpoints, list_checkpoints
    from nanguard.run.data import resolve_data, validation_data

    target = Path(args.target)
    backend = create_backend("torch", args.device)
    if target.is_dir():
        if not list_checkpoints(target, backend.checkpoint_suffix):
            raise UserError(f"{target}: no checkpoints/step_*{backend.checkpoint_suffix}; not a run folder, or the "
                            "run saved none yet")
        checkpoints = Checkpoints(target, backend, keep=0)
        state = checkpoints.load_newest()
        path, out_dir = checkpoints.loaded_from, target
    elif target.is_file():
        path = target
        out_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        state = backend.load_checkpoint(path)
    else:
        raise UserError(f"{target}: no such run folder or checkpoint")
    cfg = config_from_dict(state["config"], f"{path} (config)")
    for override in args.overrides:
        cfg = apply_override(cfg, override)
    category_ids = tuple(int(c) for c in state["category_ids"])
    backend.setup_model(cfg, len(category_ids), state["backend"])
    paths = resolve_data(cfg, args.quiet)
    val_index, document = validation_data(paths, category_ids)
    detections = backend.predict(val_index, batch_size=cfg.eval.batch_size, max_images=cfg.eval.max_images)
    image_ids = [r.image_id for r in val_index.records[:cfg.eval.max_images]] if cfg.eval.max_images else None
    metrics, table = evaluate_boxes(document, detections, image_ids)
    metrics = {"checkpoint": str(path), "step": int(state["run"]["step"]), **metrics}
    atomic_write_json(out_dir / "eval.json", json_safe(metrics))
    if args.detections:
        atomic_write_json(args.detections, detections, indent=None)
    if args.json:
        print(dumps(json_safe(metrics), indent=2))
    else:
        print(table)
        if not args.quiet:
            print(f"{path}: step {state['run']['step']}, {metrics['images']} images, eval.json in {out_dir}",
                  file=sys.stderr)
    return 0
