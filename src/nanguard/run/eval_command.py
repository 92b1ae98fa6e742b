"""`nanguard eval RUN_DIR|CHECKPOINT`: COCO mAP on the validation split, the 12-line table, eval.json.

Which validation split: the run's own (from the config saved in the checkpoint), unless `data.*`
overrides name another one. Every data.* key given on the command line either takes effect or is
refused with the reason; none is dropped silently:
- `data.root=DIR`: the validation split of another synth-layout folder (annotations/instances_val.json, val/);
- `data.val_ann=FILE data.val_images=DIR`: any COCO split (the two go together, and not with data.root);
- `data.cache=DIR`: where the run's generated dataset lives (runs on the generated shapes only);
- refused: data.train_* (eval reads no training split), data.synth_* (a different generated dataset is
  made with `nanguard synth DIR`, then `data.root=DIR`), data.audit / hflip / prefetch (training only).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from nanguard.errors import UserError
from nanguard.fileio import OUTPUT_MARK, atomic_write_json, check_output_path, dumps, json_safe

# data.* keys with no meaning for eval, and why.
_TRAINING_ONLY = {
    "data.train_ann": "eval reads only the validation split",
    "data.train_images": "eval reads only the validation split",
    "data.audit": "eval does not audit (run `nanguard audit` on the split)",
    "data.hflip": "eval does not augment",
    "data.prefetch": "eval does not prefetch",
}
# The keys eval reads besides data.*: how images are resized, proposed, scored and kept, and batched.
_EVAL_KEYS = ("model.min_size", "model.max_size", "model.rpn_pre_nms_top_n_test", "model.rpn_post_nms_top_n_test",
              "model.box_detections_per_img", "model.box_score_thresh", "eval.batch_size", "eval.max_images")
_SYNTH_KEYS = ("data.synth_images", "data.synth_val_images", "data.synth_size", "data.synth_classes",
               "data.synth_seed")


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _is_data_key(override: str) -> bool:
    return _key(override) == "data" or _key(override).startswith("data.")


def validation_paths(run_cfg, overrides: list[str], quiet: bool):
    """(val_ann, val_images) for eval: the run's validation split, or the one the data.* overrides name.
    `UserError` for a data.* key that eval cannot honour."""
    from nanguard.config import apply_override

    data_overrides = [o for o in overrides if _is_data_key(o)]
    keys = [_key(o) for o in data_overrides]
    if "data" in keys:
        raise UserError("data=...: set the data.* keys one by one on eval, e.g. data.val_ann=FILE data.val_images=DIR")
    for key in keys:
        if key in _TRAINING_ONLY:
            raise UserError(f"{key}: has no effect on eval ({_TRAINING_ONLY[key]}); drop it")
        if key in _SYNTH_KEYS:
            raise UserError(f"{key}: eval cannot change the generated dataset; generate one with "
                            "`nanguard synth DIR` and evaluate on it with data.root=DIR")
    cfg = run_cfg
    for override in data_overrides:
        cfg = apply_override(cfg, override)  # typed values and unknown-key errors, as for train
    wanted = set(keys)
    if "data.root" in wanted and wanted & {"data.val_ann", "data.val_images"}:
        raise UserError("data.root and data.val_ann/data.val_images both set; use data.root=DIR for a "
                        "synth-layout folder, or data.val_ann=FILE data.val_images=DIR, not both")
    pair = wanted & {"data.val_ann", "data.val_images"}
    if len(pair) == 1:
        given, missing = ("data.val_ann", "data.val_images") if "data.val_ann" in pair else \
            ("data.val_images", "data.val_ann")
        raise UserError(f"{given} without {missing}: set both, e.g. data.val_ann=FILE data.val_images=DIR")
    if pair and (cfg.data.val_ann is None or cfg.data.val_images is None):
        raise UserError("data.val_ann and data.val_images need paths, not null")
    if "data.root" in wanted and cfg.data.root is None:
        raise UserError("data.root=null on eval: name a synth-layout folder, or leave data.root out to use the run's data")
    run_data = run_cfg.data
    synthetic_run = run_data.root is None and run_data.val_ann is None
    if "data.cache" in wanted and (not synthetic_run or wanted - {"data.cache"}):
        raise UserError("data.cache: only locates the generated dataset of a run trained without data.root or "
                        "data.*_ann; drop it")

    if pair:
        return Path(cfg.data.val_ann), Path(cfg.data.val_images)
    if "data.root" in wanted or run_data.root is not None:
        root = Path(cfg.data.root)
        key = "data.root" if "data.root" in wanted else "the run's data.root"
        if not root.is_dir():
            raise UserError(f"{key}={root}: no such folder; pass data.root=DIR, or data.val_ann=FILE "
                            "data.val_images=DIR")
        ann = root / "annotations" / "instances_val.json"
        if not ann.is_file():
            raise UserError(f"{key}={root}: no annotations/instances_val.json; not a synth-layout folder (use "
                            "data.val_ann=FILE data.val_images=DIR)")
        return ann, root / "val"
    if run_data.val_ann is not None:
        return Path(run_data.val_ann), Path(run_data.val_images)
    from nanguard.run.data import resolve_data

    paths = resolve_data(cfg, quiet)  # the generated shapes (made again in data.cache if missing)
    return paths.val_ann, paths.val_images


def _check_eval_key(key: str) -> None:
    """An override eval would apply and never use is refused, not dropped: the training keys, and the
    model's shape, which the checkpoint fixes."""
    if key in _EVAL_KEYS or key in ("eval", "model.weights"):  # model.weights: its own message below
        return
    training_only = key.endswith("_train") or key == "model.box_batch_size_per_image"
    if (key.startswith("model.") or key in ("model", "backend")) and not training_only:
        raise UserError(f"{key}: fixed by the checkpoint (eval builds the model it holds); drop it")
    raise UserError(f"{key}: has no effect on eval, which reads data.val_* / data.root, "
                    f"{', '.join(_EVAL_KEYS)}; drop it")


def _check_detections_path(path: Path) -> None:
    """nanguard never overwrites a file it did not write; the detections path is a new file."""
    if path.is_dir():
        raise UserError(f"--detections {path}: is a folder; name a new .json file")
    if path.exists() or path.is_symlink():
        raise UserError(f"--detections {path}: the file exists and nanguard never overwrites a file; remove it "
                        "or pick another path")


def run(args) -> int:
    from nanguard.config import apply_override, config_from_dict, validate
    from nanguard.run.backend import create_backend
    from nanguard.run.checkpoints import Checkpoints, list_checkpoints
    from nanguard.run.data import DataPaths, validation_data
    from nanguard.run.evaluate import evaluate

    if args.detections:
        _check_detections_path(Path(args.detections))
    target = Path(args.target)
    backend = create_backend(_backend_of(target), args.device)
    if target.is_dir():
        if not list_checkpoints(target, backend.checkpoint_suffix):
            raise UserError(f"{target}: no checkpoints/step_*{backend.checkpoint_suffix}; not a run folder, or the "
                            "run saved none yet")
        checkpoints = Checkpoints(target, backend, keep=0)
        state = checkpoints.load_newest()
        path, out_dir = checkpoints.loaded_from, target
    elif target.is_file():
        path = target
        state = backend.load_checkpoint(path)
        out_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
    else:
        raise UserError(f"{target}: no such run folder or checkpoint")
    run_cfg = config_from_dict(state["config"], f"{path} (config)")
    cfg = run_cfg
    for override in args.overrides:
        if not _is_data_key(override):
            _check_eval_key(_key(override))
            cfg = apply_override(cfg, override)
    validate(dataclasses.replace(cfg, data=run_cfg.data))
    if any(_key(o) == "model.weights" for o in args.overrides):
        raise UserError("model.weights: eval uses the weights in the checkpoint; drop it (or evaluate another "
                        "checkpoint)")
    # the checkpoint holds the weights: the file the run started from is neither needed nor read again
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None))
    val_ann, val_images = validation_paths(run_cfg, list(args.overrides), args.quiet)
    in_run = (out_dir / "config.yaml").is_file() and (out_dir / "checkpoints").is_dir()  # its eval.json is ours
    if not in_run:  # beside a checkpoint somewhere: never over a user's own eval.json (or the ground truth)
        check_output_path(out_dir / "eval.json", "eval (it writes eval.json beside the checkpoint):", inputs=(val_ann, args.detections))
    category_ids = tuple(int(c) for c in state["category_ids"])
    backend.setup(cfg, len(category_ids), train=False)
    backend.restore(state["backend"])
    paths = DataPaths(val_ann, val_images, val_ann, val_images)  # validation_data reads the val_* pair only
    val_index, document = validation_data(paths, category_ids)
    metrics, table, detections = evaluate(backend, val_index, document, batch_size=cfg.eval.batch_size,
                                          min_size=cfg.model.min_size, max_size=cfg.model.max_size,
                                          max_images=cfg.eval.max_images)
    step = int(state["run"]["step"])
    metrics = {"checkpoint": str(path), "step": step, "val_ann": str(val_ann), "val_images": str(val_images),
               **metrics}
    # The numbers first: a run folder that cannot take eval.json must not cost the evaluation.
    if args.json:
        print(dumps(json_safe(metrics), indent=2), flush=True)
    else:
        print(table, flush=True)
    if args.detections:
        atomic_write_json(args.detections, detections, indent=None)
    try:
        atomic_write_json(out_dir / "eval.json", {OUTPUT_MARK: "eval", **json_safe(metrics)})
    except UserError as err:
        raise UserError(f"eval.json not written, the metrics are above only: {err}") from None
    if not args.json and not args.quiet:
        print(f"{path}: step {step}, {metrics['images']} images, eval.json in {out_dir}", file=sys.stderr)
    return 0


def _backend_of(target: Path) -> str:
    """The backend whose checkpoints `target` (a run folder or a checkpoint file) holds: MindSpore's
    .ckpt files, or PyTorch's .pt (the default, and what an empty folder is told it lacks)."""
    from nanguard.run.checkpoints import list_checkpoints

    if target.is_file():
        return "mindspore" if ".ckpt" in target.suffixes else "torch"  # also step_N.ckpt.damaged
    if target.is_dir() and not list_checkpoints(target, ".pt") and list_checkpoints(target, ".ckpt"):
        return "mindspore"
    return "torch"
