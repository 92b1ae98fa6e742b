"""Which process of a distributed run this is (framework-neutral: torchrun's and msrun's environment).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts; a plain `nanguard train` has
none of them and is rank 0 of 1. Rank 0 is the run folder's one writer: the lock, config.yaml, metrics,
incidents, checkpoints, final.json and the report. Every rank trains, takes the same decisions in the
same step (the backend agrees on them), and reads the same checkpoint to resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    restarts: int = 0  # torchrun --max-restarts: how many times the job was started again

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> Ranks:
        def number(name: str, default: int) -> int:
            try:
                return int(os.environ.get(name, default))
            except ValueError:
                return default

        world = max(1, number("WORLD_SIZE", 1))
        return cls(rank=number("RANK", 0), world=world, local_rank=number("LOCAL_RANK", 0),
                   restarts=number("TORCHELASTIC_RESTART_COUNT", 0))
