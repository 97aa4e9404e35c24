"""A rich progress bar for the long loops (likelihood batches, sampling sweeps), on stderr so that
stdout stays the report. `enabled=False` (tests, logs) turns it into a plain loop."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


class ProgressBar:
    def __init__(self, enabled: bool = True):
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                                  disable=not enabled)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def track(self, iterable, total: int | None = None, description: str = ""):
        return self._progress.track(iterable, total=total, description=description)
