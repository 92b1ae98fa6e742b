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

from nanguard.guard.config import GuardConfig
from nanguard.guard.driver import PolicyDriver
from nanguard.guard.observation import Observation
from nanguard.guard.policy import Decision, Outcome


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


class GuardHost:
    """The whole host half of a guard: the `Mailbox`, the `PolicyDriver` carrying out the policy, and
    the hook that keeps a bad step's state for its replay. One per guarded loop: the run's
    (`nanguard.run.trainer`) and an own loop's (`nanguard.backends.torch.guard.Guard`). A step reads:

        host.read_previous()          # between the step's backward and its update: step s-1's numbers
        ... the update of step s (lr factor `host.lr_factor`, weights checked if `host.check_weights(s)`) ...
        outcomes = host.sent(s, names, read_values, context)   # stage a snapshot, post, decide on s-1

    A step whose batch never reached the update (unreadable, refused by the model) is `host.failed(s,
    error, context)` instead. `keep(obs)`, when set, is called for each bad observation as it is read,
    before the next update touches the state: the state that step ran with is still the live one
    (its own update was masked).
    """

    def __init__(self, driver: PolicyDriver, config: GuardConfig, *, rank: int = 0) -> None:
        self.driver, self.config = driver, config
        self.mailbox = Mailbox(rank)
        self.keep: Callable[[Observation], None] | None = None
        self._read: list[Observation] = []

    @property
    def lr_factor(self) -> float:
        return self.driver.lr_factor

    @property
    def stopped(self) -> bool:
        return self.driver.stopped

    def check_weights(self, step: int) -> bool:
        """Are the weights checked after step `step`'s update (the one weight-check rule)?"""
        return self.driver.weights_check_due(step, max(1, int(self.config.param_check_every)))

    def read_previous(self) -> None:
        """Read the pending step's numbers (once; later calls before the next post do nothing)."""
        obs = self.mailbox.read(self.mailbox.take())
        if obs is None:
            return
        if self.keep is not None and obs.bad(self.driver.config.min_loss_scale):
            self.keep(obs)
        self._read.append(obs)

    def sent(self, step: int, names: tuple[str, ...], read_values: Callable[[], list[float]],
             context: StepContext = StepContext()) -> list[Outcome]:
        """Step `step` was applied (or masked) on the device: its numbers are on their way."""
        self.read_previous()
        self.driver.stage(step)  # a host copy on the snapshot grid, kept once the steps run with it are healthy
        self.mailbox.post(step, names, read_values, context)
        return self._decide()

    def failed(self, step: int, error: BaseException | str, context: StepContext = StepContext()) -> list[Outcome]:
        """Step `step`'s batch could not be read or the model refused it: a `model_error` observation."""
        self.read_previous()
        self.mailbox.post_error(step, error, context)
        return self._decide()

    def flush(self) -> list[Outcome]:
        """The pending observation, now (before a checkpoint, at the end: waits for the device)."""
        self.read_previous()
        return self._decide()

    def _decide(self) -> list[Outcome]:
        read, self._read = self._read, []
        return [outcome for obs in read for outcome in self.driver.decide(obs)]


class PlainHost:
    """The host half of an unguarded step (guard.enabled=false): nothing is decided, and the numbers
    are read only every `every` steps (0: never) and at `flush`, as a plain loop's logging does (a
    wait for the device there, none on the other steps)."""

    def __init__(self, every: int, rank: int = 0) -> None:
        self.every = max(0, int(every))
        self.mailbox = Mailbox(rank)

    def sent(self, step: int, names: tuple[str, ...], read_values: Callable[[], list[float]],
             context: StepContext = StepContext()) -> list[Outcome]:
        self.mailbox.post(step, names, read_values, context)
        return self.flush() if self.every and step % self.every == 0 else []

    def flush(self) -> list[Outcome]:
        obs = self.mailbox.read(self.mailbox.take())
        return [] if obs is None else [Outcome(obs, Decision.unguarded(obs.step))]
