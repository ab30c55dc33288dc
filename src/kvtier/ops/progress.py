"""Progress bars on standard error, for long runs at a terminal (never with --json)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Advance = Callable[[int], None]


def _noop(_n: int) -> None:
    return None


class Progress:
    """Makes progress bars when enabled and standard error is a terminal; otherwise nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    @contextmanager
    def task(self, description: str, total: int | None, *, unit: str = "bytes") -> Iterator[Advance]:
        """A bar for ``total`` units (None: unknown); yields ``advance(n)``."""
        if not self.enabled:
            yield _noop
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        cols: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if unit == "bytes":
            cols += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        else:
            cols += [MofNCompleteColumn(), TextColumn(unit)]
        cols += [TimeElapsedColumn(), TimeRemainingColumn()]
        with RichProgress(*cols, console=Console(stderr=True), transient=True) as bar:
            tid = bar.add_task(description, total=total)

            def advance(n: int) -> None:
                bar.advance(tid, n)

            yield advance
