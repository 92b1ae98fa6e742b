"""`nanguard synth OUT`: generate (or find already made) the coloured-shapes COCO dataset."""

from __future__ import annotations

import argparse

from nanguard.data.synth import generate


def run(args: argparse.Namespace) -> int:
    summary = generate(args.out, images=args.images, val_images=args.val_images, size=args.size,
                       classes=args.classes, seed=args.seed, progress=not args.quiet)
    verb = "already complete, kept" if summary["skipped"] else f"wrote in {summary['seconds']:.1f} s"
    print(f"synth: {summary['out']}: {summary['train_images']} train + {summary['val_images']} val images "
          f"({summary['train_objects']} + {summary['val_objects']} objects), {summary['size']} px, "
          f"{summary['classes']} classes, seed {summary['seed']}; {verb}")
    return 0
