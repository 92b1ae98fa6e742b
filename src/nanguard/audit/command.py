"""`nanguard audit ANN.json [--images DIR] [--json OUT.json] [--fix CLEAN.json] ...`: exit 0 when no
error-level finding, 1 when there is one, 2 when the input itself is unusable (a `UserError`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nanguard.audit import audit_file
from nanguard.audit.fix import apply_fix
from nanguard.errors import UserError
from nanguard.fileio import OUTPUT_MARK, atomic_write_json, check_output_path


def write_clean(report, out: str | os.PathLike[str]) -> Path:
    """Write the cleaned copy; never over the audited file itself."""
    out = check_output_path(out, "--fix", inputs=(report.path,))
    clean = {OUTPUT_MARK: f"audit --fix of {report.path}", **apply_fix(report.document, report.plan, report.columns.boxes)}
    try:
        return atomic_write_json(out, clean, indent=None)
    except ValueError as err:  # allow_nan=False met a NaN the checks do not cover (e.g. in a segmentation)
        raise UserError(f"--fix {out}: a kept record still holds a NaN or Inf outside bbox/area ({err}); "
                        f"fix that field in {report.path} by hand") from None
    except OSError as err:
        raise UserError(f"--fix {out}: cannot write ({err.strerror or err}); pick a writable path") from None


def run(args: argparse.Namespace) -> int:
    if args.no_decode and not args.images:
        raise UserError("--no-decode only applies with --images DIR; add --images or drop --no-decode")
    # Checked before the (possibly long) audit, so a wrong path fails at once: never the audited file,
    # never the other output, never a file nanguard did not write (the split's other annotation file).
    if args.fix and args.json_out and Path(args.fix).resolve() == Path(args.json_out).resolve():
        raise UserError(f"--json {args.json_out} and --fix {args.fix}: the same file; give each its own path")
    for flag, out in (("--fix", args.fix), ("--json", args.json_out)):
        if out:
            check_output_path(out, flag, inputs=(args.ann,))
    report = audit_file(
        args.ann,
        images_dir=args.images,
        min_size=args.min_size,
        decode=not args.no_decode,
        jobs=args.jobs,
        progress=not args.quiet,
        keep_document=bool(args.fix),
    )
    if args.json_out:
        try:
            atomic_write_json(args.json_out, report.to_json())
        except OSError as err:
            raise UserError(f"--json {args.json_out}: cannot write ({err.strerror or err}); pick a writable path") from None
    if args.fix:
        write_clean(report, args.fix)
    if not args.quiet:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # a log file or CI: rich's 80-column default folds the table badly
            console.width = max(console.width, 120)
        report.print_table(console)
        if args.fix:
            fix = report.summary["fix"]
            console.print(f"wrote {args.fix}: dropped {fix['annotations_dropped']} annotation(s) and "
                          f"{fix['images_dropped']} image(s), clipped {fix['annotations_clipped']}, "
                          f"renumbered {fix['annotations_renumbered']}")
    return 1 if report.errors else 0
