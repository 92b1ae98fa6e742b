"""`nanguard eval RUN_DIR|CHECKPOINT`: COCO mAP on the validation split, the 12-line table, eval.json."""

from __future__ import annotations

import sys
from pathlib import Path

from nanguard.errors import UserError
from nanguard.fileio import atomic_write_json, dumps, json_safe


def run(args) -> int:
    from nanguard.backends.torch import checkpoint as ckpt
    from nanguard.backends.torch.data import resolve_data, validation_data
    from nanguard.backends.torch.evaluate import evaluate
    from nanguard.backends.torch.model import build_model
    from nanguard.backends.torch.train import pick_device
    from nanguard.config import apply_override, config_from_dict

    target = Path(args.target)
    if target.is_dir():
        found = ckpt.list_checkpoints(target)
        if not found:
            raise UserError(f"{target}: no checkpoints/step_*.pt; not a run folder, or the run saved none yet")
        path, out_dir = found[-1][1], target
    elif target.is_file():
        path = target
        out_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
    else:
        raise UserError(f"{target}: no such run folder or checkpoint")
    state = ckpt.load_checkpoint(path)
    cfg = config_from_dict(state["config"], f"{path} (config)")
    for override in args.overrides:
        cfg = apply_override(cfg, override)
    device = pick_device(args.device)
    category_ids = tuple(int(c) for c in state["category_ids"])
    model = build_model(cfg.model, len(category_ids)).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit model.name={cfg.model.name}; drop the model.* "
                        "overrides") from None
    paths = resolve_data(cfg, args.quiet)
    val_index, document = validation_data(paths, category_ids)
    metrics, table, detections = evaluate(model, val_index, document, batch_size=cfg.eval.batch_size,
                                          device=device, max_images=cfg.eval.max_images)
    metrics = {"checkpoint": str(path), "step": int(state["step"]), **metrics}
    atomic_write_json(out_dir / "eval.json", json_safe(metrics))
    if args.detections:
        atomic_write_json(args.detections, detections, indent=None)
    if args.json:
        print(dumps(json_safe(metrics), indent=2))
    else:
        print(table)
        if not args.quiet:
            print(f"{path}: step {state['step']}, {metrics['images']} images, eval.json in {out_dir}",
                  file=sys.stderr)
    return 0
