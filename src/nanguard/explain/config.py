"""`explain.*` in the config: when incidents are diagnosed, and what is kept for a replay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ExplainConfig:
    # first: the first incident of each kind is diagnosed at once, then training goes on; all: every
    # one; off: none during training (`nanguard diagnose RUN` still can, from what was kept)
    auto: Literal["first", "all", "off"] = "first"
    ring: int = 4  # host batches kept, as the model received them (the loader's arrays: no device copy)
    keep: int = 20  # incidents whose replay data goes to RUN_DIR/incidents/<step>/ (0: none)
    replays: int = 2  # runs of the step before it is called transient
