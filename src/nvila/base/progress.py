"""The one progress display of long-running commands (evaluation, pruning, training, benchmarks).

    with ProgressBar("eval", total=n, unit="items") as bar:
        bar.advance(16)                            # counts and shows this run's rate (items/s)
    with ProgressBar("train", total=steps, done=resumed) as bar:
        bar.update(step, info="loss 0.41")         # absolute position plus a free-form field
    with ProgressBar("benchmarking") as bar:       # no total: a spinner whose text changes
        bar.describe("benchmarking: fp32 run 2")

A disabled bar does nothing; ``stderr`` keeps it off stdout when a command prints its result there.
"""

from __future__ import annotations

import time
from typing import Any


class ProgressBar:
    """A rich progress display; ``done`` items count as completed from the start (a resumed run) but not
    in the rate, which covers only this run's work."""

    def __init__(self, label: str, total: int | None = None, unit: str | None = None, done: int = 0,
                 enabled: bool = True, stderr: bool = False) -> None:
        self.label, self.total, self.unit, self.done = label, total, unit, done
        self.enabled, self.stderr = enabled, stderr
        self._counted = 0
        self._start = time.perf_counter()

    def __enter__(self) -> "ProgressBar":
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        if self.total is None:
            columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
        else:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        self._progress = Progress(*columns, console=Console(stderr=True) if self.stderr else None)
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=self.total, completed=self.done, info="")
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._progress.stop()

    def advance(self, n: int = 1) -> None:
        """``n`` more items done; the info field shows this run's rate when the bar has a unit."""
        self._counted += n
        if self.enabled:
            info = ""
            if self.unit:
                info = f"{self._counted / max(1e-9, time.perf_counter() - self._start):.1f} {self.unit}/s"
            self._progress.update(self._task, advance=n, info=info)

    def update(self, completed: int, info: str = "") -> None:
        """Set the position (e.g. the optimizer step) and the free-form info field."""
        if self.enabled:
            self._progress.update(self._task, completed=completed, info=info)

    def describe(self, text: str) -> None:
        """Replace the label (what is running now)."""
        if self.enabled:
            self._progress.update(self._task, description=text)
