"""`nanguard train`: argument handling around `nanguard.backends.torch.train.train`."""

from __future__ import annotations

import json
import sys

from nanguard.config import load_config, validate
from nanguard.fileio import dumps


def run(args) -> int:
    from dataclasses import replace

    from nanguard.backends.torch.train import pick_device, prepare_run_dir, train
    from nanguard.guard import parse_fault

    for spec in args.inject:
        parse_fault(spec)  # a bad spec is a user error before anything is written

    def make_config(saved):
        cfg = saved if saved is not None else load_config(args.config, args.overrides)
        if saved is not None and args.overrides:
            from nanguard.config import apply_override

            for override in args.overrides:
                cfg = apply_override(cfg, override)
        if args.inject:
            cfg = replace(cfg, inject=list(cfg.inject) + [s for s in args.inject if s not in cfg.inject])
        validate(cfg)
        return cfg

    if args.resume is not None and args.config is not None:
        from nanguard.errors import UserError

        raise UserError("--resume takes the config saved in the run folder; drop --config")
    device = pick_device(args.device)
    run_dir, cfg, resuming = prepare_run_dir(args.out, args.resume, make_config)
    final = train(cfg, run_dir, resuming=resuming, device=device, quiet=args.quiet, stop_at=args.steps)
    if args.json:
        print(dumps(final, indent=2))
    elif not args.quiet:
        summary = {k: final.get(k) for k in ("status", "steps", "mAP", "mAP50", "images_per_second",
                                             "incidents", "skipped_steps", "rollbacks")}
        print(f"{run_dir}: " + json.dumps(summary), file=sys.stderr)
    if final["status"] != "completed":
        print(f"nanguard train: stopped: {final.get('verdict') or final.get('stop_reason')}", file=sys.stderr)
        return 1
    return 0
