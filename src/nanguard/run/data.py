"""Where the data comes from and the audit before step 0 (framework-neutral).

Three ways to name the data (config `data.*`):
- nothing: the synthetic shapes are generated once into `data.cache` and reused;
- `data.root=DIR`: a synth-layout folder (annotations/instances_{train,val}.json, train/, val/);
- `data.train_ann`, `data.train_images`, `data.val_ann`, `data.val_images`: e.g. COCO 2017 itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanguard.config import Config
from nanguard.data.coco import CocoIndex, build_index, read_coco_json
from nanguard.errors import UserError


@dataclass(frozen=True)
class DataPaths:
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


def resolve_data(cfg: Config, quiet: bool) -> DataPaths:
    d = cfg.data
    if d.train_ann is not None:
        return DataPaths(Path(d.train_ann), Path(d.train_images), Path(d.val_ann), Path(d.val_images))
    if d.root is None:
        from nanguard.data.synth import generate

        root = Path(os.path.expanduser(d.cache)) / (
            f"synth-{d.synth_images}-{d.synth_val_images}-{d.synth_size}px-{d.synth_classes}c-seed{d.synth_seed}")
        with _generating(root):  # the ranks of a run (or two runs) generate it once, one after the other
            generate(root, images=d.synth_images, val_images=d.synth_val_images, size=d.synth_size,
                     classes=d.synth_classes, seed=d.synth_seed, progress=not quiet)
    else:
        root = Path(d.root)
        if not root.is_dir():
            raise UserError(f"data.root={root}: no such folder; generate one with `nanguard synth {root}`")
    paths = DataPaths(root / "annotations/instances_train.json", root / "train",
                      root / "annotations/instances_val.json", root / "val")
    if not paths.train_ann.exists():
        raise UserError(f"data.root={root}: no annotations/instances_train.json; it is not a synth-layout "
                        "folder (use data.train_ann=... and friends for other layouts)")
    return paths


@contextlib.contextmanager
def _generating(root: Path):
    """An exclusive lock (`.<name>.lock` beside `root`, in nanguard's own data.cache) for as long as the
    dataset is generated or found complete: a second process waits, then finds it complete."""
    import fcntl

    lock_path = root.parent / f".{root.name}.lock"
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")
    except OSError as exc:
        raise UserError(f"data.cache={root.parent}: cannot write there ({exc.strerror or exc}); point data.cache "
                        "at a writable folder or name the data with data.root") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def training_index(cfg: Config, paths: DataPaths, write_audit, quiet: bool) -> CocoIndex:
    """The training split after the audit (`data.audit`): drop error-level records (default), stop on
    any (strict), or let everything through (off: fault-injection tests use it)."""
    if cfg.data.audit == "off":
        document = read_coco_json(paths.train_ann)
    else:
        from nanguard.audit import CHECKS, audit_and_clean

        if not paths.train_images.is_dir():
            raise UserError(f"{paths.train_images}: no such image folder; check data.train_images")
        report, document = audit_and_clean(paths.train_ann, images_dir=paths.train_images, decode=False)
        audit_path = write_audit("audit.json", report.to_json())
        if report.errors and cfg.data.audit == "strict":
            checks = ", ".join(f"{name} ({count})" for name, count in report.summary["by_check"].items()
                               if count and name in CHECKS and CHECKS[name].severity == "error")
            raise UserError(f"{paths.train_ann}: the audit found {report.errors} error(s): {checks}; see "
                            f"{audit_path}, or clean it with `nanguard audit --fix`")
        if not quiet:
            print(f"audit: {report.summary['images']} images, {report.summary['annotations']} annotations, "
                  f"{report.errors} error(s) dropped, {report.warnings} warning(s) (audit.json)", file=sys.stderr)
    return build_index(document, paths.train_ann, paths.train_images)


def validation_data(paths: DataPaths, category_ids: tuple[int, ...]) -> tuple[CocoIndex, dict[str, Any]]:
    document = read_coco_json(paths.val_ann)
    return build_index(document, paths.val_ann, paths.val_images, category_ids), document


def check_validation_split(paths: DataPaths, category_ids: tuple[int, ...]) -> None:
    """Before step 0 of a run that evaluates at its end: the validation file reads as COCO, its categories
    fit the training split's, and every image it names is a file, so that none of this is found only
    after the whole training. (An image that is present but cannot be decoded is left out of the
    evaluation then, with a warning: `nanguard.run.evaluate.predict`.)"""
    val_index, _ = validation_data(paths, category_ids)
    missing = [record for record in val_index.records if not record.path.is_file()]
    if missing:
        raise UserError(f"{missing[0].path}: validation image id {missing[0].image_id} is not a file "
                        f"({len(missing)} of {len(val_index)} are missing); check data.val_images, or set "
                        "train.eval_at_end=false")
