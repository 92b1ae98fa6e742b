"""Which process of a distributed run this is (framework-neutral: torchrun's and msrun's environment).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts; a plain `nanguard train` has
none of them and is rank 0 of 1. Rank 0 is the run folder's one writer: the lock, config.yaml, metrics,
incidents, checkpoints, final.json and the report. Every rank trains, takes the same decisions in the
same step (the backend agrees on them), and reads the same checkpoint to resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nanguard.errors import UserError


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
        """This process's place, from torchrun's (or msrun's) environment. A value set by hand that cannot
        be one (not a number, RANK outside 0..WORLD_SIZE-1, RANK without WORLD_SIZE) is refused in one
        line: a process that believed it had peers would wait for them forever."""
        def number(name: str, default: int) -> int:
            value = os.environ.get(name)
            if value is None:
                return default
            try:
                return int(value.strip())
            except ValueError:
                raise UserError(f"{name}={value[:40]!r} in the environment is not a number; torchrun sets it "
                                "(start several processes with `nanguard train --nproc N`), or unset it") from None

        world = number("WORLD_SIZE", 1)
        rank = number("RANK", 0)
        if world < 1:
            raise UserError(f"WORLD_SIZE={world} in the environment: it must be >= 1, or unset")
        if "RANK" in os.environ and "WORLD_SIZE" not in os.environ and rank != 0:
            raise UserError(f"RANK={rank} in the environment without WORLD_SIZE: set both (torchrun does: "
                            "`nanguard train --nproc N`), or unset RANK")
        if not 0 <= rank < world:
            raise UserError(f"RANK={rank} in the environment is outside 0..{world - 1} (WORLD_SIZE={world}); "
                            "start the processes with `nanguard train --nproc N`")
        local_rank = number("LOCAL_RANK", 0)
        if local_rank < 0:
            raise UserError(f"LOCAL_RANK={local_rank} in the environment: it must be >= 0, or unset")
        return cls(rank=rank, world=world, local_rank=local_rank,
                   restarts=max(0, number("TORCHELASTIC_RESTART_COUNT", 0)))
