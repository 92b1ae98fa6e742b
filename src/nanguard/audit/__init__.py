"""Dataset audit (issue #11): find what turns a detection loss into NaN before training, and clean it.

numpy only: this package imports neither torch nor mindspore, so `nanguard audit` starts fast and the
training loader of any backend can call it.

    report = audit_file("instances_train2017.json", images_dir="train2017")
    report, clean = audit_and_clean("instances_train2017.json")   # one read, for training
    clean = cleaned_dataset(report)                                # report from audit_file(keep_document=True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nanguard.audit.checks import CHECKS, run_annotation_checks, run_category_checks, run_image_checks
from nanguard.audit.fix import apply_fix, plan_fix
from nanguard.audit.images import inspect
from nanguard.audit.load import load
from nanguard.audit.report import AuditReport, Finding
from nanguard.errors import UserError

__all__ = ["CHECKS", "AuditReport", "Finding", "audit_and_clean", "audit_file", "cleaned_dataset"]

PathLike = str | os.PathLike[str]


def audit_file(
    ann_path: PathLike,
    *,
    images_dir: PathLike | None = None,
    min_size: float = 1.0,
    decode: bool = False,
    jobs: int | None = None,
    progress: bool = False,
    keep_document: bool = False,
) -> AuditReport:
    """Audit a COCO detection file; with `images_dir`, also its image files (headers, or full decode
    when `decode`). `keep_document` keeps the full COCO dict on the report (`report.document`) so that
    `cleaned_dataset(report)` needs no second read; it costs a full decode (more time and memory).

    Raises `UserError` when the file itself is unusable (missing, not JSON, not COCO)."""
    if not (isinstance(min_size, (int, float)) and min_size >= 0 and min_size == min_size and min_size != float("inf")):
        raise UserError(f"--min-size {min_size}: must be a finite number >= 0 (pixels; default 1)")
    status = _Progress(progress)
    with status:
        status.update(f"reading {Path(ann_path).name}")
        loaded = load(ann_path, keep_document=keep_document)
        status.update("checking annotations")
        cols = loaded.columns
        ann_hits, geometry = run_annotation_checks(cols, float(min_size))
        img_hits = run_image_checks(cols)
        cat_hits = run_category_checks(cols)
        facts = None
        if images_dir is not None:
            facts = inspect(cols, images_dir, decode=decode, jobs=jobs, on_progress=status.advance)
            img_hits.update(facts.hits)
        plan = plan_fix(cols, ann_hits, img_hits, geometry, float(min_size), cat_hits)
    report = AuditReport(loaded.path, cols, ann_hits, img_hits, geometry, plan, min_size=float(min_size),
                         image_facts=facts, document=loaded.document, cat_hits=cat_hits)
    report.options = {"images_dir": images_dir, "min_size": float(min_size), "decode": decode, "jobs": jobs}
    return report


def cleaned_dataset(report_or_path: AuditReport | PathLike, **audit_kwargs: Any) -> dict[str, Any]:
    """The COCO dict after the --fix rules, in memory: full original records for what is kept (a
    changed record is a shallow copy with the changed fields), boxes clipped, repeated ids renumbered.

    Given a report made with `keep_document=True`, nothing is read again; given a report without its
    document, the file is read and audited once more with the report's options (images_dir, min_size,
    ...; `audit_kwargs` override them); given a path, it is audited first with
    `audit_kwargs` (those of `audit_file`)."""
    if isinstance(report_or_path, AuditReport):
        report = report_or_path
        if report.document is None:
            return audit_and_clean(report.path, **{**report.options, **audit_kwargs})[1]
    else:
        report = audit_file(report_or_path, keep_document=True, **audit_kwargs)
    return apply_fix(report.document, report.plan, report.columns.boxes)


def audit_and_clean(
    ann_path: PathLike,
    *,
    images_dir: PathLike | None = None,
    min_size: float = 1.0,
    decode: bool = False,
    jobs: int | None = None,
    progress: bool = False,
) -> tuple[AuditReport, dict[str, Any]]:
    """Audit and clean with one read of the file: what `nanguard train` (data.audit=drop) calls."""
    report = audit_file(ann_path, images_dir=images_dir, min_size=min_size, decode=decode, jobs=jobs,
                        progress=progress, keep_document=True)
    clean = apply_fix(report.document, report.plan, report.columns.boxes)
    if report.columns.n_images and not clean["images"]:
        # Said here, with the cause: the training index would only see an empty file ("has no images").
        first = next(f for f in report.findings if f.severity == "error" and CHECKS[f.check].target == "image")
        raise UserError(f"{report.path}: the audit dropped all {report.columns.n_images} images "
                        f"({_error_counts(report)}); e.g. {first.message}; fix the file, `nanguard audit "
                        f"{report.path}` lists every finding")
    if report.columns.category_record_ok is not None and not clean["categories"]:
        raise UserError(f"{report.path}: no category has an integer id; a detection file must name its classes "
                        "as {\"id\": 1, \"name\": ...}")
    return report, clean


def _error_counts(report: AuditReport) -> str:
    return ", ".join(f"{name}: {count}" for name, count in report.by_check.items()
                     if count and CHECKS[name].severity == "error")


class _Progress:
    """A rich progress display on stderr, or nothing at all (a null object, not `if progress:`)."""

    def __init__(self, enabled: bool) -> None:
        self._progress = None
        self._task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(stderr=True), transient=True)

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("audit", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def advance(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description="checking images", completed=done, total=total)
