"""Typed, validated configuration: presets, a YAML file, and dotted KEY=VALUE overrides.

    cfg = load_config("demo", ["train.lr=0.01", "model.name=resnet50_fpn"])

An unknown key or a bad value raises `UserError` naming the key and the closest valid one. The resolved
config is saved in the run folder (`config.yaml`) and inside every checkpoint, so any number in a report
can be reproduced from the run folder alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from nanguard.errors import UserError
from nanguard.fileio import read_regular


@dataclass(frozen=True)
class LossProfile:
    """What the guard knows of a model's loss components: their names in report order, and which of
    them regress boxes (non-finite there points at the annotations). Nothing else assumes a detector."""

    name: str
    components: tuple[str, ...]
    box_components: tuple[str, ...] = ()


# The detection profile: the loss components of a two-stage detector (torchvision's and detectron2's
# names). Other loops report whatever components they have and take the "generic" profile.
FASTER_RCNN = LossProfile("faster_rcnn", ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"),
                          box_components=("loss_rpn_box_reg", "loss_box_reg"))
PROFILES: dict[str, LossProfile] = {p.name: p for p in (FASTER_RCNN, LossProfile("generic", ()))}


@dataclass
class GuardConfig:
    enabled: bool = True  # false: a plain step (backward, clip, step), as torchvision's reference runs
    clip_norm: float = 10.0  # 0 disables clipping; the check always runs before the clip
    param_check_every: int = 10
    param_abs_max: float = 1.0e4  # a finite weight above this is silent corruption (a flipped exponent bit)
    spike_window: int = 50
    spike_min_history: int = 20
    spike_threshold: float = 10.0  # in robust standard deviations (1.4826 * MAD)
    spike_min_ratio: float = 3.0  # and at least 3x the median: late in a cosine schedule grad norms sit
    # so still that 2x their median (harmless: clipping bounds the update) was flagged in clean runs
    spike_early_history: int = 3  # from this many healthy steps until spike_min_history: ...
    spike_early_ratio: float = 10.0  # ... a value above this many times the largest so far is a spike
    # (an LR blow-up in the first steps is caught at once; 0 early_history turns the rule off)

    def spike_settings(self) -> dict[str, float | int]:
        """The keyword arguments of `SpikeDetector` (and of a backend's device mirror of it)."""
        return {"window": self.spike_window, "min_history": self.spike_min_history,
                "threshold": self.spike_threshold, "min_ratio": self.spike_min_ratio,
                "early_history": self.spike_early_history, "early_ratio": self.spike_early_ratio}


@dataclass(frozen=True)
class PolicyConfig:
    backoff_after: int = 3  # bad steps in a row -> LR backoff
    backoff_factor: float = 0.5
    min_lr_factor: float = 1.0 / 64
    recover_steps: int = 100  # good steps to bring the LR factor back to 1.0
    rollback_after: int = 3  # further bad steps in a row after the backoff -> rollback
    snapshot_every: int = 50  # host snapshots at steps that are multiples of this
    snapshot_healthy: int = 10  # a snapshot only after this many healthy steps in a row
    snapshot_confirm: int = 5  # ... and this many healthy steps run with it, after it
    keep_snapshots: int = 2  # confirmed snapshots kept (plus the state the run started from)
    skip_window: int = 200
    max_skip_fraction: float = 0.25
    max_rollbacks: int = 3
    quarantine_after: int = 2  # bad steps implicating an image -> quarantine it
    min_loss_scale: float = 1.0  # fp16 loss scale below it -> incident loss_scale_floor
    loss_profile: str = "faster_rcnn"  # what the verdicts know of the loss components (observation.PROFILES)

    def __post_init__(self) -> None:
        positive_ints = ("backoff_after", "recover_steps", "rollback_after", "snapshot_every",
                         "snapshot_confirm", "keep_snapshots", "skip_window", "quarantine_after")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"policy.{name} must be an integer >= 1, got {_short(value)}")
        for name in ("snapshot_healthy", "max_rollbacks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"policy.{name} must be an integer >= 0, got {_short(value)}")
        if self.loss_profile not in PROFILES:
            raise UserError(f"policy.loss_profile={self.loss_profile!r} is unknown; choose one of "
                            f"{', '.join(PROFILES)}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise UserError(f"policy.backoff_factor must be in (0, 1), got {self.backoff_factor!r}")
        if not 0.0 < self.min_lr_factor <= 1.0:
            raise UserError(f"policy.min_lr_factor must be in (0, 1], got {self.min_lr_factor!r}")
        if not 0.0 < self.max_skip_fraction <= 1.0:
            raise UserError(
                f"policy.max_skip_fraction must be in (0, 1], got {self.max_skip_fraction!r}")
        if not (math.isfinite(self.min_loss_scale) and self.min_loss_scale >= 0.0):
            raise UserError(f"policy.min_loss_scale must be >= 0, got {self.min_loss_scale!r}")

    @property
    def max_skipped(self) -> int:
        """Bad steps allowed among the last `skip_window` steps; one more stops the run."""
        return int(self.max_skip_fraction * self.skip_window)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown policy setting(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        return cls(**data)



@dataclass
class ModelConfig:
    name: Literal["tiny", "mobilenet_v3_fpn", "resnet50_fpn"] = "tiny"
    weights: str | None = None  # a local state_dict (torchvision's names); nothing is downloaded
    min_size: int = 128  # GeneralizedRCNNTransform resize: shorter side
    max_size: int = 128  # longer side cap
    fpn_channels: int = 64  # tiny only; torchvision's models use 256
    representation_size: int = 256  # box head MLP width (tiny only; torchvision's use 1024)
    trainable_bn: bool = True  # random init + frozen BN = no normalisation at all
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 100  # the demo has 1-6 objects an image; the RoI head costs in proportion
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 100
    box_batch_size_per_image: int = 128
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.01


@dataclass
class DataConfig:
    root: str | None = None  # a synth-layout folder (annotations/instances_{train,val}.json, train/, val/)
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    cache: str = ".cache/nanguard"  # where the default synthetic dataset is generated once
    synth_images: int = 2000
    synth_val_images: int = 200
    synth_size: int = 128
    synth_classes: int = 3
    synth_seed: int = 0
    audit: Literal["drop", "strict", "off"] = "drop"
    hflip: bool = True
    prefetch: int = 2  # batches decoded ahead in a thread
    cache_mb: int = 1024  # decoded images kept in memory (the demo's 2,000 take ~100 MB); 0 = decode every time


@dataclass
class TrainConfig:
    steps: int = 2200  # the demo's length: within a plain loop's 2,523 steps of time (README, demo_quality)
    batch_size: int = 8
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    fused: bool = True  # fused optimizers take the guard's found_inf: a masked update for free
    lr: float = 0.04  # the demo, 800-step proxies of the stride-4 tiny: mAP50 0.80 at 0.04, 0.73 at 0.02
    momentum: float = 0.9
    weight_decay: float = 4e-5
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    min_lr_ratio: float = 0.02  # cosine ends at lr * min_lr_ratio
    amp: Literal["off", "bf16", "fp16"] = "off"
    log_every: int = 20
    tensorboard: bool = False  # also log metrics and incidents to RUN_DIR/tensorboard (needs tensorboard)
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    eval_at_end: bool = True
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default


@dataclass
class ExplainConfig:
    """`explain.*`: when incidents are diagnosed, and what is kept for a replay. Defined here, not in
    `nanguard.explain.config` (which re-exports it): the config imports no feature package."""

    # first: the first incident of each kind is diagnosed at once, then training goes on; all: every
    # one; off: none during training (`nanguard diagnose RUN` still can, from what was kept)
    auto: Literal["first", "all", "off"] = "first"
    ring: int = 4  # host batches kept, as the model received them (the loader's arrays: no device copy)
    keep: int = 20  # incidents whose replay data goes to RUN_DIR/incidents/<step>/ (0: none)
    replays: int = 2  # runs of the step before it is called transient


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_images: int = 0  # 0 = the whole validation split


@dataclass
class Config:
    backend: Literal["torch", "mindspore"] = "torch"
    seed: int = 0
    inject: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # The CPU default: the tiny model on the generated shapes (its time on a 2-core CPU: README).
    "demo": {},
    # torchvision's ResNet-50-FPN recipe scaled for one GPU: 800 px, bf16. Point data.* at COCO 2017.
    "coco_r50": {
        "model": {
            "name": "resnet50_fpn", "min_size": 800, "max_size": 1333,
            "rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000,
            "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000,
            "box_batch_size_per_image": 512, "box_score_thresh": 0.05,
        },
        "train": {"steps": 90000, "batch_size": 8, "lr": 0.02, "weight_decay": 1e-4, "warmup_steps": 1000,
                  "schedule": "step", "amp": "bf16", "log_every": 20, "checkpoint_every": 2000},
        "data": {"prefetch": 4},
        "eval": {"batch_size": 8},
    },
}


# ---------------------------------------------------------------------------------------------------
def _short(value: Any, limit: int = 80) -> str:
    """repr(value) for an error message, cut to `limit` characters: a message is one line, whatever
    the value (a list of a million items)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _StrictLoader(yaml.SafeLoader):
    """YAML as a config needs it. A key given twice is refused (YAML keeps the last, silently), and so
    are aliases (`*name`): a few lines of them expand into billions of nodes (an alias bomb)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}); write the value out",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {_short(key, 40)} given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """`text` parsed as a config's YAML (`_StrictLoader`); yaml.YAMLError when it is not one."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, in a few words: "at line 3: the key 'steps' given twice; keep one"."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    problem = getattr(exc, "problem", None)
    return f"{where}: {problem}" if problem else where


MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; a file far larger is not one


# Building a Config from plain data, with errors that name the key.


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(choices)}"


def _convert(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Check and convert one leaf value against its field type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, value, inner[0], source)
    if origin is Literal:
        if isinstance(value, bool) and ("off" if not value else "on") in args:
            value = "off" if not value else "on"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in args:
            raise UserError(f"{source}: {key}={_short(value)} is not valid; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list):
            raise UserError(f"{source}: {key} must be a list, got {_short(value)}")
        return [_convert(key, v, args[0], source) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UserError(f"{source}: {key}={_short(value)} is not a boolean; use true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"{source}: {key}={_short(value)} is not an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        except (TypeError, ValueError):
            raise UserError(f"{source}: {key}={_short(value)} is not an integer") from None
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"{source}: {key}={_short(value)} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{source}: {key}={_short(value)} is not a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise UserError(f"{source}: {key}={_short(value)} must be a finite number")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{source}: {key}={_short(value)} must be a string")
        return str(value)
    return value


def _merge_into(obj: Any, data: dict[str, Any], prefix: str, source: str) -> Any:
    """A copy of the dataclass `obj` with `data` merged in (frozen dataclasses included: `replace`
    re-runs their own validation)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys to values")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    updates = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"{source}: unknown config key '{full}'{_closest(str(key), names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _merge_into(current, value, f"{full}.", source)
        else:
            updates[key] = _convert(full, value, hints[key], source)
    return dataclasses.replace(obj, **updates)


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def config_keys() -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of the demo preset's config, in the tree's order."""
    cfg = load_config("demo")
    return [(key, _lookup(cfg, key)) for key in _all_keys(cfg)]


def apply_override(cfg: Config, override: str) -> Config:
    """Apply one `dotted.key=value` (the value is parsed as YAML: numbers, true/false, null, lists)."""
    if "=" not in override:
        raise UserError(f"override '{override}' is not KEY=VALUE; e.g. train.lr=0.01")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if raw.strip().lower() in ("on", "off", "yes", "no", "y", "n", "nan", ".nan", "inf", ".inf"):
        value = raw.strip()  # YAML 1.1 would turn these into booleans or floats
    parts = key.split(".")
    node: dict[str, Any] = {}
    cursor = node
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    all_keys = _all_keys(cfg)
    if key not in all_keys and not any(k.startswith(key + ".") for k in all_keys):
        raise UserError(f"unknown config key '{key}'{_closest(key, all_keys)}")
    return _merge_into(cfg, node, "", f"override {key}")


def load_config(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a config: preset (default `demo`) or YAML file, then the overrides in order."""
    cfg = Config()
    name = config or "demo"
    if name in PRESETS:
        cfg = _merge_into(cfg, PRESETS[name], "", f"preset {name}")
    else:
        path = Path(name)
        if not path.exists():
            raise UserError(f"--config {name}: no such file or preset; presets: {', '.join(PRESETS)}")
        try:
            data = load_yaml(read_regular(path, "a config", MAX_CONFIG_BYTES).decode("utf-8")) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read the config ({exc.__class__.__name__}); check the file") from None
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not a valid config{yaml_problem(exc)}") from None
        cfg = _merge_into(cfg, data, "", str(path))
    for override in overrides:
        cfg = apply_override(cfg, override)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """Rebuild a Config saved in a run folder or a checkpoint."""
    cfg = _merge_into(Config(), data, "", source)
    validate(cfg)
    return cfg


# The range of every numeric key: (low, high, low inclusive, high inclusive); None = unbounded.
# A value outside crashes deep inside torch (threads=-1, fpn_channels=0, eval.batch_size=0) or trains
# wrongly without a word (weight_decay=-1 grows the weights, box_batch_size_per_image=0 samples no ROI).
# The upper bounds are far beyond any real use; they stop a typo (an extra zero or six) from asking for
# more memory than a machine has, before anything is allocated.
MAX_IMAGE_SIDE = 4096  # px: an image resized beyond it (or generated beyond it) is a typo
_AT_LEAST_0 = (0, None, True, False)
_POSITIVE = (0, None, False, False)
_SIDE = (32, MAX_IMAGE_SIDE, True, True)  # below the backbone's stride-32 level there is no feature map
_COUNT = (0, 100_000, False, True)  # boxes, proposals, RoIs, detections: an image's worth, with room
_BATCH = (0, 4096, False, True)
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "seed": (0, 2**63 - 1, True, True),  # numpy's generators refuse negative seeds
    "model.min_size": _SIDE,
    "model.max_size": _SIDE,
    "model.fpn_channels": (0, 4096, False, True),
    "model.representation_size": (0, 16384, False, True),
    "model.rpn_pre_nms_top_n_train": _COUNT,
    "model.rpn_post_nms_top_n_train": _COUNT,
    "model.rpn_pre_nms_top_n_test": _COUNT,
    "model.rpn_post_nms_top_n_test": _COUNT,
    "model.box_batch_size_per_image": _COUNT,
    "model.box_detections_per_img": _COUNT,
    "model.box_score_thresh": (0, 1, True, False),
    "data.synth_images": (0, 1_000_000, False, True),
    "data.synth_val_images": (0, 1_000_000, True, True),
    "data.synth_size": _SIDE,  # nanguard synth's own range
    "data.synth_classes": (1, 8, True, True),  # the eight shapes nanguard synth draws
    "data.synth_seed": _AT_LEAST_0,
    "data.prefetch": (0, 64, True, True),  # batches held in memory ahead of the step
    "train.steps": (0, 10**12, True, True),
    "train.batch_size": _BATCH,
    "train.lr": _POSITIVE,
    "train.momentum": (0, 1, True, False),
    "train.weight_decay": _AT_LEAST_0,
    "train.warmup_steps": (0, 10**12, True, True),
    "train.min_lr_ratio": (0, 1, True, True),
    "train.log_every": _POSITIVE,
    "train.checkpoint_every": _POSITIVE,
    "train.keep_checkpoints": _POSITIVE,
    "train.threads": (0, 1024, True, True),  # 0 = torch's default
    "guard.clip_norm": _AT_LEAST_0,  # 0 = no clipping
    "guard.param_check_every": _POSITIVE,
    "guard.param_abs_max": _POSITIVE,
    "guard.spike_window": (0, 100_000, False, True),  # a window of losses kept on the device
    "guard.spike_min_history": _POSITIVE,
    "guard.spike_threshold": _POSITIVE,
    "guard.spike_min_ratio": (1, None, True, False),  # a spike is above the median, never below it
    "eval.batch_size": _BATCH,
    "eval.max_images": _AT_LEAST_0,  # 0 = the whole split
    "explain.ring": (2, 64, True, True),  # the bad step and the one after it, at least; batches in memory
    "explain.keep": (0, 100_000, True, True),
    "explain.replays": (1, 100, True, True),  # runs of one step: more tell nothing new
}


def _range_text(low, high, low_inclusive: bool, high_inclusive: bool) -> str:
    if high is None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    return f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"


def _lookup(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    """Range checks of every numeric key (`RANGES`) and cross-field checks that the types alone cannot
    express. Runs before anything is written, so a refused run leaves no config.yaml behind."""
    for key, (low, high, low_inclusive, high_inclusive) in RANGES.items():
        value = _lookup(cfg, key)
        below = value < low or (value == low and not low_inclusive)
        above = high is not None and (value > high or (value == high and not high_inclusive))
        if below or above:
            raise UserError(f"{key}={value} must be {_range_text(low, high, low_inclusive, high_inclusive)}")
    if cfg.model.max_size < cfg.model.min_size:
        raise UserError(f"model.max_size={cfg.model.max_size} is below model.min_size={cfg.model.min_size}")
    if cfg.guard.spike_min_history > cfg.guard.spike_window:
        raise UserError(f"guard.spike_min_history={cfg.guard.spike_min_history} must not exceed "
                        f"guard.spike_window={cfg.guard.spike_window}")
    if cfg.data.synth_val_images == 0 and cfg.train.eval_at_end and cfg.data.root is None \
            and cfg.data.train_ann is None:
        raise UserError("data.synth_val_images=0 leaves nothing for the final evaluation; set it >= 1 or "
                        "train.eval_at_end=false")
    explicit = [cfg.data.train_ann, cfg.data.train_images, cfg.data.val_ann, cfg.data.val_images]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise UserError("set all four of data.train_ann, data.train_images, data.val_ann, data.val_images "
                        "(or data.root for a synth-layout folder)")
    if cfg.data.root is not None and any(v is not None for v in explicit):
        raise UserError("data.root and data.train_ann/... both set; use one or the other")
    if cfg.data.root is not None or cfg.data.train_ann is not None:
        # the generated dataset's keys mean nothing when the data is named: refused, not ignored
        defaults = DataConfig()
        for name in ("cache", "synth_images", "synth_val_images", "synth_size", "synth_classes", "synth_seed"):
            if getattr(cfg.data, name) != getattr(defaults, name):
                named = "data.root" if cfg.data.root is not None else "data.train_ann/..."
                raise UserError(f"data.{name}={getattr(cfg.data, name)} has no effect with {named} (it shapes the "
                                f"generated dataset only); drop it")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
