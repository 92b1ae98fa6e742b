"""The `nanguard` command: synth, audit, train, eval, diagnose, report.

`main(argv)` is the in-process entry point and returns the exit code: 0 ok, 1 findings or a failed run,
2 bad input (a `UserError`, printed on one line without a traceback). Each command's implementation is
imported only when that command runs, so `nanguard audit` never imports torch and starts fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from nanguard import __version__
from nanguard.errors import UserError

# command name -> module whose `run(args) -> int` implements it (imported lazily).
COMMANDS = {
    "synth": "nanguard.data.synth_command",
    "audit": "nanguard.audit.command",
    "train": "nanguard.run.train_command",
    "eval": "nanguard.run.eval_command",
    "diagnose": "nanguard.run.diagnose_command",
    "report": "nanguard.report.command",
}


def _config_keys() -> str:
    """Every config key a KEY=VALUE override can set, with the demo preset's value."""
    from nanguard.config import config_keys

    return "config keys (KEY=VALUE), with the demo preset's values (src/nanguard/config.py says what each does):\n" + \
        "\n".join(f"  {key}={_yaml_value(value)}" for key, value in config_keys())


class _TrainParser(argparse.ArgumentParser):
    """`nanguard train`'s parser: its help ends with every config key, worked out only when the help is
    printed (resolving the demo preset costs every other command's start ~40 ms)."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + _config_keys() + "\n"


def _yaml_value(value) -> str:
    """A value as an override writes it (null, true/false, [], numbers and words as they are)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanguard", allow_abbrev=False,  # `--npr 2` is not `--nproc 2`: a typo must not pass silently
        description="Train Faster R-CNN so that a NaN or Inf can neither kill nor silently ruin a run.",
    )
    parser.add_argument("--version", action="version", version=f"nanguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", allow_abbrev=False, help="generate a COCO dataset of coloured shapes")
    p.add_argument("out", metavar="OUT", help="output folder (annotations/, train/, val/)")
    p.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val-images", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--classes", type=int, default=3, help="number of shape classes, 1-8 (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("audit", allow_abbrev=False, help="find boxes and images that can turn into NaN, before training")
    p.add_argument("ann", metavar="ANN.json", help="COCO detection annotation file")
    p.add_argument("--images", metavar="DIR", help="image folder: check files exist, decode and measure them")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write findings as JSON")
    p.add_argument("--fix", metavar="CLEAN.json", help="write a cleaned copy (never overwrites the input)")
    p.add_argument("--min-size", type=float, default=1.0, metavar="PX",
                   help="boxes narrower or lower than this are tiny_box (default 1)")
    p.add_argument("--no-decode", action="store_true", help="with --images: read headers only")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="decoding processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")

    p = sub.add_parser("train", allow_abbrev=False, help="train a Faster R-CNN (guarded)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.__class__ = _TrainParser  # its help appends the config keys
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=0.01")
    p.add_argument("--config", metavar="FILE|PRESET", default=None,
                   help="a YAML file or a preset name: demo (default), coco_r50")
    p.add_argument("--out", metavar="RUN_DIR", default=None, help="run folder (default runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="resume the run in RUN_DIR from its last checkpoint")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="stop after step N (default train.steps); the LR schedule still spans train.steps, so a run "
                        "stopped early resumes exactly")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes (torch.distributed's launcher; gloo on CPU, NCCL on GPU)")
    p.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="fault injection KIND@STEP[:key=value...] (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print final.json to stdout")

    p = sub.add_parser("eval", allow_abbrev=False, help="COCO mAP of a run or checkpoint on the validation set")
    p.add_argument("target", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.val_ann=FILE data.val_images=DIR")
    p.add_argument("--detections", metavar="OUT.json", help="write COCO-format detections")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("diagnose", allow_abbrev=False, help="replay a run's incidents: transient or not, the first bad op, the culprits")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--incident", type=int, default=None, metavar="STEP", help="only the incident at STEP")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--json", action="store_true", help="print the diagnoses as JSON")

    p = sub.add_parser("report", allow_abbrev=False, help="write RUN_DIR/report.html: curves, incidents, audit, final numbers")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (nanguard train --out)")
    p.add_argument("--quiet", action="store_true", help="do not print the path written")
    return parser


# OSErrors that say a path itself is unusable: too long, a symlink loop, a file where a folder belongs
PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR})
# every argument that names a path (its dest: as the user sees it); '' names none, and would mean "."
PATH_ARGS = {"out": "--out / OUT", "ann": "ANN.json", "images": "--images", "json_out": "--json OUT.json",
             "fix": "--fix CLEAN.json", "config": "--config", "resume": "--resume", "target": "RUN_DIR|CHECKPOINT",
             "detections": "--detections OUT.json", "run": "RUN_DIR", "run_dir": "RUN_DIR"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (train --nproc passes it on)
    # KEY=VALUE overrides may stand anywhere, also after options (`eval RUN --json data.root=D`),
    # which argparse alone does not allow for a positional list
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        for dest, flag in PATH_ARGS.items():
            if getattr(args, dest, None) == "":
                raise UserError(f"{flag}: an empty path names nothing; give the path")
        module = importlib.import_module(COMMANDS[args.command])
        return int(module.run(args))
    except UserError as err:
        print(f"nanguard {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None or err.errno not in PATH_ERRNOS:
            raise
        # a path the user gave that the system refuses outright, wherever it is first touched
        print(f"nanguard {args.command}: error: {err.filename}: {err.strerror.lower()}; check the path",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanguard {args.command}: interrupted", file=sys.stderr)
        return 130


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())  # argparse's own usage errors exit 2 already


if __name__ == "__main__":
    main_entry()
