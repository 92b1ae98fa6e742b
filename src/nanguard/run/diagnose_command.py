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
    records, unusable = [], 0
    for number, record in enumerate(read_incidents(run_dir), 1):
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            records.append(record)
        else:  # one line each; the others are still diagnosed
            unusable += 1
            print(f"{run_dir / 'incidents.jsonl'}: record {number} has no step (a number >= 0); left out",
                  file=sys.stderr)
    if args.incident is not None:
        records = [r for r in records if r.get("step") == args.incident]
        if not records:
            steps = ", ".join(str(r["step"]) for r in records[:10]) or "none"
            raise UserError(f"{run_dir}: no incident at step {args.incident} (incidents at: {steps})")
    if not records:
        print(f"{run_dir}: no incidents to diagnose", file=sys.stderr)
        if args.json:
            print("[]")
        return 2 if unusable else 0
    from nanguard.run.backend import create_backend

    backend = create_backend(cfg.backend, args.device)
    # diagnosis.json goes into the run only when no other process holds it (a run folder has one writer)
    # and the folder can be written; the verdicts are printed either way
    try:
        folder = RunFolder.open(run_dir)
    except UserError as err:
        folder = None
        print(f"nanguard diagnose: diagnosing without writing diagnosis.json: {err}", file=sys.stderr)
    try:
        results, failed = _diagnose_all(records, run_dir, backend, cfg, args, write=folder is not None)
    finally:
        if folder is not None:
            folder.close()
    if args.json:
        print(json.dumps(json_safe(results), indent=2))
    return 2 if failed or unusable else 0


def _diagnose_all(records, run_dir: Path, backend, cfg, args, *, write: bool) -> tuple[list[dict], int]:
    """The diagnoses, and how many incidents could not be diagnosed (a damaged replay file: one line
    each, the others still diagnosed)."""
    results, failed = [], 0
    for record in records:
        try:
            diagnosis = diagnose(record, incident_dir(run_dir, record["step"]), backend, cfg, write=write)
        except UserError as err:
            failed += 1
            print(f"nanguard diagnose: step {record['step']}: not diagnosed: {err}", file=sys.stderr)
            continue
        results.append({"step": record["step"], "kind": record.get("kind"), **diagnosis.to_dict()})
        if not args.json:
            print(diagnosis.line(record["step"]))
            for fact in diagnosis.evidence:
                print(f"    - {fact}")
    return results, failed
