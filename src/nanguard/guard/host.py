"""The guard's host half, written once for every backend and for the own-loop APIs (`Guard`,
`GuardedTrainStep` + `StepReader`): the step's numbers read one step late, turned into an `Observation`.

    mailbox = Mailbox(rank)
    ... step s is queued on the device; its numbers are a small device vector ...
    previous = mailbox.post(s, names, read_values, context)   # step s-1's, to be read now
    observation = mailbox.read(previous)                       # waits only for step s-1

`read_values()` is the backend's one framework call: it waits for that step's vector (by then long
done: the next step is already queued) and returns it as Python floats — the loss components in `names`
order, then `STEP_FIELDS`, then one flag per rank in a distributed run (`Observation.from_vector`).
A batch that could not be read or that the model refused is posted with `post_error`: its observation
is a `model_error`, with the same context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from nanguard.guard.observation import Observation


@dataclass(frozen=True)
class StepContext:
    """What the host knows about a step's batch (for the observation and the incident line)."""

    image_ids: tuple = ()
    annotation_ids: tuple = ()
    batch: tuple[int, int] | None = None  # (epoch, position)
    invalid_targets: tuple = ()  # (image id, annotation id, why) of target boxes dropped
    rank_image_ids: tuple = ()  # distributed: every rank's share of the global batch, rank by rank
    rank_annotation_ids: tuple = ()


@dataclass
class Posted:
    """One step's numbers on their way to the host."""

    step: int
    names: tuple[str, ...]
    read_values: Callable[[], list[float]] | None  # None: a model error known on the host
    context: StepContext
    model_error: str | None = None


def error_message(error: BaseException) -> str:
    """The one line a `model_error` incident carries: "ValueError: first line of the message"."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}".strip()[:300]


class Mailbox:
    """Holds the last posted step until the next one is posted (or `take` is called)."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.pending: Posted | None = None

    def post(self, step: int, names: tuple[str, ...], read_values: Callable[[], list[float]],
             context: StepContext = StepContext()) -> Posted | None:
        """Keep step `step`'s numbers; returns the previous step's (to be read now)."""
        previous, self.pending = self.pending, Posted(step, tuple(names), read_values, context)
        return previous

    def post_error(self, step: int, error: BaseException | str, context: StepContext = StepContext()) -> Posted | None:
        message = error if isinstance(error, str) else error_message(error)
        previous, self.pending = self.pending, Posted(step, (), None, context, message)
        return previous

    def take(self) -> Posted | None:
        pending, self.pending = self.pending, None
        return pending

    def read(self, posted: Posted | None) -> Observation | None:
        """The observation of a posted step (waits for its device numbers)."""
        if posted is None:
            return None
        c = posted.context
        context = dict(image_ids=c.image_ids, annotation_ids=c.annotation_ids, rank=self.rank, batch=c.batch,
                       invalid_targets=c.invalid_targets)
        if posted.read_values is None:
            return Observation(step=posted.step, model_error=posted.model_error, applied=False, lr=math.nan,
                               total_loss=math.nan, grad_norm=math.nan, **context)
        obs = Observation.from_vector(posted.step, posted.names, posted.read_values(), **context)
        if len(c.rank_image_ids) > 1:
            # every rank names the same images: those of the ranks that went bad (all, for a spike of the
            # averaged loss), so that every rank's policy implicates the same ones
            chosen = obs.bad_ranks or range(len(c.rank_image_ids))
            obs = replace(obs, image_ids=tuple(i for r in chosen for i in c.rank_image_ids[r]),
                          annotation_ids=tuple(a for r in chosen for a in c.rank_annotation_ids[r]))
        return obs
