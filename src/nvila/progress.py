"""A rich progress bar that shows the rate of this run (items/s), shared by long-running commands."""

from __future__ import annotations

import time
from typing import Any, Callable


class RateBar:
    """``with RateBar("eval", "items", total) as advance: advance(n)``; a no-op when disabled.

    ``done`` items count as completed from the start (a resumed run) but not in the rate, which covers
    only this run's work. ``stderr`` keeps the bar off stdout when a command prints its result there.
    """

    def __init__(self, label: str, unit: str, total: int, done: int = 0, enabled: bool = True,
                 stderr: bool = False) -> None:
        self.label, self.unit, self.total, self.done = label, unit, total, done
        self.enabled, self.stderr = enabled, stderr

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 console=Console(stderr=True) if self.stderr else None)
        self.progress.start()
        task = self.progress.add_task(self.label, total=self.total, completed=self.done, rate="")
        start, counted = time.perf_counter(), [0]

        def advance(n: int) -> None:
            counted[0] += n
            rate = counted[0] / max(1e-9, time.perf_counter() - start)
            self.progress.update(task, advance=n, rate=f"{rate:.1f} {self.unit}/s")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.stop()
