"""`nanguard train`: the config, the run folder and its lock, the backend, then `nanguard.run.trainer`."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from nanguard.config import Config, apply_override, config_from_dict, dump_yaml, load_config, validate
from nanguard.errors import UserError
from nanguard.fileio import dumps
from nanguard.run.ranks import Ranks

# Keys that a resumed run cannot change: they define the model, the data or the state's layout.
RESUME_FIXED = frozenset({"backend", "seed", "data.root", "data.cache", "data.audit", "data.hflip", "train.batch_size",
                          "train.optimizer", "train.fused", "train.amp"})
RESUME_FIXED_PREFIXES = ("model.", "data.train_", "data.val_", "data.synth_")


def run(args) -> int:
    from nanguard.run.backend import Collective, create_backend
    from nanguard.run.folder import RunFolder
    from nanguard.run.tensorboard import require_tensorboard
    from nanguard.run.trainer import train

    if getattr(args, "nproc", None) is not None:  # --nproc 0 too: refused below, not a plain run
        return _launch(args)
    ranks = Ranks.from_env()
    if ranks.restarts and args.out is not None and args.resume is None and _restarted_here(args):
        # torchrun --max-restarts started the job again: go on from the run's last checkpoint
        args.resume, args.out, args.config, args.inject = args.out, None, None, []
    _check_arguments(args)

    if args.resume is not None:
        folder = (RunFolder.open(args.resume, wait=60.0 if ranks.restarts else 0.0) if ranks.writer
                  else RunFolder.follower(Path(args.resume)))
        try:
            saved = config_from_dict(folder.read_config(), str(folder.path / "config.yaml"))
            cfg = _with_injections(_resume_overrides(saved, args.overrides), args.inject)
            _check_reachable(cfg, args.steps, ranks.world, args.inject)
            require_tensorboard(cfg.train.tensorboard)
            if cfg != saved and folder.writer:  # validated above: the overrides become part of the record
                folder.write_config(dump_yaml(cfg))
        except BaseException:
            folder.close()
            raise
    else:
        cfg = _with_injections(load_config(args.config, args.overrides), args.inject)
        _check_reachable(cfg, args.steps, ranks.world, cfg.inject)
        require_tensorboard(cfg.train.tensorboard)
    backend = create_backend(cfg.backend, args.device)  # a bad --device or weights file: refused before
    backend.check_config(cfg)  # anything is written
    if args.resume is None:
        if args.out is None and ranks.distributed:
            raise UserError("a distributed run needs --out RUN_DIR (every rank must name the same folder)")
        out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        folder = RunFolder.create(out, dump_yaml(cfg)) if ranks.writer else RunFolder.follower(out)
    with folder:
        try:
            final = train(cfg, folder, backend, resuming=args.resume is not None, quiet=args.quiet, stop_at=args.steps)
        except Exception as exc:
            said = backend.peer_lost(exc) if ranks.distributed and isinstance(backend, Collective) else None
            if said is None:
                raise
            print(f"nanguard train: rank {ranks.rank}: a peer process is gone (its collective: \"{said}\"); the "
                  "run folder keeps the checkpoints written so far: resume it with --resume", file=sys.stderr)
            return 1
    if not folder.writer:
        return 0 if final["status"] == "completed" else 1
    if args.json:
        print(dumps(final, indent=2))
    elif not args.quiet:
        summary = {k: final.get(k) for k in ("status", "steps", "mAP", "mAP50", "images_per_second",
                                             "incidents", "skipped_steps", "rollbacks")}
        print(f"{folder.path}: " + json.dumps(summary), file=sys.stderr)
    if final["status"] != "completed":
        print(f"nanguard train: stopped: {final.get('verdict') or final.get('stop_reason')}", file=sys.stderr)
        return 1
    return 0


def _restarted_here(args) -> bool:
    """A restarted job (TORCHELASTIC_RESTART_COUNT > 0) continues --out only if that folder's config is
    the one this very command writes: a stray variable in the environment never turns a refused
    `--out` onto another run into a resume of it."""
    path = Path(args.out) / "config.yaml"
    if not path.is_file():
        return False
    try:
        saved = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return saved == dump_yaml(_with_injections(load_config(args.config, args.overrides), args.inject))


def _launch(args) -> int:
    """`--nproc N`: the same command on N processes through torch.distributed's own launcher (torchrun),
    which sets RANK / WORLD_SIZE for each; this process waits for them and returns their exit code."""
    import os

    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be >= 1")
    cores = os.cpu_count() or 1
    if args.nproc > 2 * cores:  # each rank is a whole training process: far more would only thrash
        raise UserError(f"--nproc {args.nproc}: more than twice this machine's {cores} CPU cores; use one process "
                        "per GPU, or at most one per core on a CPU")
    if args.resume is None and args.out is None:
        raise UserError("--nproc needs --out RUN_DIR (every rank must name the same folder)")
    _check_before_launch(args)
    argv, rest = [], list(args.argv)
    while rest:  # every --nproc (given twice, the last counts, as argparse reads it): none for the ranks
        arg = rest.pop(0)
        if arg == "--nproc":
            rest = rest[1:]
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    return _torchrun(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "nanguard", *argv])


def _torchrun(launcher_args: list[str]) -> int:
    """torch.distributed's own launcher (torchrun) in this process: `nanguard.backends.torch.launch`."""
    from nanguard.run.backend import launcher

    return launcher("torch").launch(launcher_args)


def _check_arguments(args) -> None:
    """What the command line alone decides: refused before anything is read or written."""
    from nanguard.guard import parse_fault

    for spec in args.inject:
        parse_fault(spec)
    if args.steps is not None and args.steps < 0:
        raise UserError(f"--steps {args.steps}: must be >= 0 (the step to stop after)")
    if args.resume is not None and args.config is not None:
        raise UserError("--resume takes the config saved in the run folder; drop --config")
    if args.resume is not None and args.out is not None:
        raise UserError("--resume RUN continues RUN in place; drop --out")


def _check_before_launch(args) -> None:
    """`--nproc N`: everything a rank would refuse before it starts, refused here, in one line, before
    torchrun starts any rank: the arguments, the config and its overrides, the run folder, the
    backend's `check_config` as a rank of N sees it, and a resumed checkpoint of another --nproc."""
    import os

    from nanguard.run.backend import create_backend
    from nanguard.run.checkpoints import Checkpoints, check_world
    from nanguard.run.folder import RunFolder
    from nanguard.run.tensorboard import require_tensorboard

    _check_arguments(args)
    if args.resume is not None:
        with RunFolder.open(args.resume) as folder:  # a run, and no other process writing it
            saved = config_from_dict(folder.read_config(), str(folder.path / "config.yaml"))
        cfg = _with_injections(_resume_overrides(saved, args.overrides), args.inject)
    else:
        cfg = _with_injections(load_config(args.config, args.overrides), args.inject)
        RunFolder.check_new(Path(args.out))
    _check_reachable(cfg, args.steps, args.nproc, args.inject if args.resume is not None else cfg.inject)
    require_tensorboard(cfg.train.tensorboard)
    # what rank 0 will see (torchrun's address: any, nothing connects here)
    world = {"WORLD_SIZE": str(args.nproc), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29500"}
    before = {name: os.environ.get(name) for name in world}
    try:
        os.environ.update(world)  # what rank 0 will see
        backend = create_backend(cfg.backend, args.device)
        backend.check_config(cfg)
        if args.resume is not None:  # the checkpoint the ranks would resume from, read (never renamed) here
            state = Checkpoints(Path(args.resume), backend, keep=1, writer=False).load_newest()
            if state is not None:
                check_world(state["run"], args.nproc)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_reachable(cfg: Config, stop_at: int | None, world: int, injections: list[str]) -> None:
    """What the command asks for that the run would never reach, refused before anything is written:
    `--steps` past train.steps (the run ends at train.steps), and a fault injected at a step the run
    never takes or on a rank it does not have (it would never fire, and the run would look clean).
    `injections`: the new ones (a resumed run's own were checked when it started, on its ranks; a resume
    on another number of processes is refused by its checkpoint's record, with that reason)."""
    from nanguard.guard import parse_fault

    if stop_at is not None and stop_at > cfg.train.steps:
        raise UserError(f"--steps {stop_at} is past train.steps={cfg.train.steps}, where the run ends; raise "
                        f"train.steps (the LR schedule spans it), or drop --steps")
    for text in injections:
        spec = parse_fault(text)
        if spec.step >= cfg.train.steps:
            raise UserError(f"fault spec '{spec.text or text}': step {spec.step} is never taken (the run's steps are "
                            f"0..{cfg.train.steps - 1}); inject at a step below train.steps={cfg.train.steps}")
        if spec.rank >= world:
            raise UserError(f"fault spec '{spec.text or text}': rank {spec.rank} does not exist on "
                            f"{world} process{'es' if world > 1 else ''}; use a rank below {world}")


def _with_injections(cfg: Config, inject: list[str]) -> Config:
    if inject:
        cfg = replace(cfg, inject=list(cfg.inject) + [s for s in inject if s not in cfg.inject])
    validate(cfg)
    return cfg


def _resume_overrides(saved: Config, overrides: list[str]) -> Config:
    """The saved config with the overrides of a --resume; refuses keys that would not fit the checkpoint."""
    cfg = saved
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        cfg = apply_override(cfg, override)
        fixed = key in RESUME_FIXED or key.startswith(RESUME_FIXED_PREFIXES)
        if fixed and _get(cfg, key) != _get(saved, key):
            raise UserError(f"--resume: {key} cannot change in a resumed run (the checkpoint was built with "
                            f"{_get(saved, key)!r}); start a new run with --out, or drop {key}=")
    return cfg


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
