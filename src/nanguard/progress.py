"""The training progress bar (rich): step, loss, img/s, ETA, and incidents as they happen.
`enabled=False` (--quiet) makes every method a no-op."""

from __future__ import annotations

import math
from typing import Any


class TrainProgress:
    def __init__(self, total: int, *, start: int = 0, enabled: bool = True) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self._progress = None
        self._task = None
        self._incidents = 0

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                TextColumn("incidents {task.fields[incidents]}"), TimeRemainingColumn(),
                console=Console(stderr=True))
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start,
                                                 loss="-", rate="-", incidents=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def metrics(self, loss: float, rate: float) -> None:
        if self._progress is not None:
            text = f"{loss:.3f}" if math.isfinite(loss) else str(loss)
            self._progress.update(self._task, loss=text, rate=f"{rate:.1f}")

    def incident(self, step: int, decision: Any, diagnosis: Any = None) -> None:
        self._incidents += 1
        if self._progress is not None:
            self._progress.update(self._task, incidents=self._incidents)
            kinds = ",".join(decision.kinds)
            self._progress.console.print(f"[yellow]step {step}: {kinds} -> {decision.action}[/]: {decision.reason}")
            if diagnosis is not None:
                self._progress.console.print(f"[cyan]{diagnosis.line(step)}[/]", highlight=False)
