"""`nanguard report RUN_DIR [--quiet]`: write RUN_DIR/report.html and print its path.

Exit 0 when written, 2 for a folder that holds no run or a report.html nanguard did not write (a
`UserError`). Reads the run's files only, so it also reports a run that is still training.
"""

from __future__ import annotations

import argparse

from nanguard.report.html import write_report


def run(args: argparse.Namespace) -> int:
    path = write_report(args.run_dir)
    if not args.quiet:
        print(path)
    return 0
