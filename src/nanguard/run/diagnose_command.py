"""`nanguard diagnose RUN_DIR [--incident STEP] [--json]`: the verdict on a run's incidents, from the
evidence kept in RUN_DIR/incidents/<step>/ (replayed on this machine, which may be another one).

A run command, like train and eval: it opens the run folder and builds a backend (both `nanguard.run`'s),
then hands the evidence to `nanguard.explain.diagnose`. It lives in run, not explain, so that run
imports explain and explain never imports run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nanguard.config import load_config
from nanguard.errors import UserError
from nanguard.explain.diagnose import diagnose, incident_dir
from nanguard.fileio import json_safe
from nanguard.guard import read_incidents
from nanguard.run.folder import RunFolder


def run(args) -> int:
    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a nanguard run folder (no config.yaml); pass the --out folder of "
                        "`nanguard train`")
    cfg = load_config(str(run_dir / "config.yaml"), [])
    records = read_incidents(run_dir)
    if args.incident is not None:
        records = [r for r in records if r.get("step") == args.incident]
        if not records:
            steps = ", ".join(str(r.get("step")) for r in read_incidents(run_dir)[:10]) or "none"
            raise UserError(f"{run_dir}: no incident at step {args.incident} (incidents at: {steps})")
    if not records:
        print(f"{run_dir}: no incidents to diagnose", file=sys.stderr)
        if args.json:
            print("[]")
        return 0
    from nanguard.run.backend import create_backend

    backend = create_backend(cfg.backend, args.device)
    # diagnosis.json goes into the run only when no other process holds it (a run folder has one writer)
    folder = RunFolder.open_if_free(run_dir)
    if folder is None:
        print(f"{run_dir}: in use by another process (still training?): diagnosing without writing "
              "diagnosis.json", file=sys.stderr)
    try:
        results = _diagnose_all(records, run_dir, backend, cfg, args, write=folder is not None)
    finally:
        if folder is not None:
            folder.close()
    if args.json:
        print(json.dumps(json_safe(results), indent=2))
    return 0


def _diagnose_all(records, run_dir: Path, backend, cfg, args, *, write: bool) -> list[dict]:
    results = []
    for record in records:
        diagnosis = diagnose(record, incident_dir(run_dir, record["step"]), backend, cfg, write=write)
        results.append({"step": record["step"], "kind": record.get("kind"), **diagnosis.to_dict()})
        if not args.json:
            print(diagnosis.line(record["step"]))
            for fact in diagnosis.evidence:
                print(f"    - {fact}")
    return results
