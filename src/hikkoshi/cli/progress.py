"""Progress of a long job on the command line (migrations, storage moves, relocations).

On a terminal, a live bar of two lines: the phase, the bar, bytes done of the total, the rate and the
time left on the first, laid out for the terminal's width so that no figure is cut (80 columns are
enough); the time elapsed and the job's own details on the second. Otherwise (a pipe, a log file),
plain lines: one when the phase changes, one every few seconds meanwhile, and the last state at the
end.

The command feeds :meth:`ProgressReport.update` with what it knows; the rate is measured from the
byte counts unless the job reports its own.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from hikkoshi.cli import figures

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult

PHASE_WIDTH = 18
"""The longest phase name shown whole (``resume-destination``)."""
BAR_MIN = 10
LINE_INTERVAL = 5.0
"""Seconds between plain lines within one phase."""


@dataclass
class _State:
    """What the job last said, and the figures derived from it."""

    clock: Callable[[], float]
    phase: str = ""
    done: int | None = None
    total: int | None = None
    reported_rate: float | None = None
    detail: str = ""
    started: float = 0.0
    meter: figures.Meter = field(default_factory=figures.Meter)

    def set(self, phase: str, done: int | None, total: int | None, rate: float | None, detail: str) -> bool:
        """Take an update; whether the phase changed. Without ``done`` the phase's last figures stay."""
        changed = phase != self.phase
        if changed:
            self.meter.reset()
            self.done = self.total = self.reported_rate = None
        self.phase, self.detail = phase, detail
        if done is not None:
            self.done, self.total, self.reported_rate = done, total, rate
            self.meter.add(self.clock(), done)
        return changed

    def rate(self) -> float | None:
        return self.reported_rate if self.reported_rate is not None else self.meter.rate()

    def figures(self) -> tuple[str, str, str]:
        """Bytes, rate and time left, as text."""
        if self.done is None:
            return "", "", ""
        rate = self.rate()
        left = figures.duration(figures.eta(self.done, self.total, rate))
        return figures.size_pair(self.done, self.total), figures.rate(rate), f"ETA {left}"

    def elapsed(self) -> str:
        return figures.duration(self.clock() - self.started)


class ProgressReport:
    """Where a command reports its job's progress; see :func:`progress`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.state = _State(clock, started=clock())

    def update(
        self,
        phase: str,
        done: int | None = None,
        total: int | None = None,
        *,
        rate: float | None = None,
        detail: str = "",
    ) -> None:
        """The job is in ``phase``, with ``done`` of ``total`` bytes (``total`` ``None``: not known;
        ``done`` ``None``: no news, the phase's last figures stay); ``rate`` in bytes per second if
        the job measures it itself; ``detail`` in its words."""
        self.updated(self.state.set(phase, done, total, rate, detail))

    def updated(self, new_phase: bool) -> None:
        """Show the state after an update (a bar redraws itself)."""

    def close(self) -> None:
        """The job ended: leave its last state on the screen."""


class LineProgress(ProgressReport):
    """Plain lines for a pipe or a log: on each new phase, every ``interval`` seconds, at the end."""

    def __init__(
        self,
        title: str,
        out: TextIO,
        interval: float = LINE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self.title, self.out, self.interval = title, out, interval
        self._printed_at: float | None = None
        self._pending = False

    def updated(self, new_phase: bool) -> None:
        now = self.state.clock()
        if new_phase or self._printed_at is None or now - self._printed_at >= self.interval:
            self._print(now)
        else:
            self._pending = True

    def close(self) -> None:
        if self._pending:
            self._print(self.state.clock())

    def line(self) -> str:
        """The current state as one line."""
        words = [f"{self.title}: {self.state.phase}", *filter(None, self.state.figures())]
        words.append(f"elapsed {self.state.elapsed()}")
        if self.state.detail:
            words.append(self.state.detail)
        return "  ".join(words)

    def _print(self, now: float) -> None:
        print(self.line(), file=self.out, flush=True)
        self._printed_at, self._pending = now, False


class BarProgress(ProgressReport):
    """A live bar on a terminal (rich), redrawn a few times a second."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        from rich.live import Live

        super().__init__(clock)
        self._live = Live(console=console, refresh_per_second=4, get_renderable=lambda: _Bar(self.state))
        self._live.start()

    def close(self) -> None:
        self._live.stop()  # draws the last state once more and leaves it


class _Bar:
    """The two lines of :class:`BarProgress`, laid out for the console's width."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        s = self.state
        sizes, rate, left = s.figures()
        numbers = f"{sizes:>17} {rate:>12} {left:>11}" if sizes else ""
        # The figures keep their width; the bar takes what is left, and goes before the phase name
        # is cut when the terminal is narrow.
        width = options.max_width
        phase = min(PHASE_WIDTH, max(width - len(numbers) - 1, 1))
        bar = width - phase - len(numbers) - 2
        grid = Table.grid(padding=(0, 1, 0, 0))
        grid.add_column(width=phase, no_wrap=True, overflow="ellipsis")
        cells: list[RenderableType] = [Text(s.phase, style="bold")]
        if bar >= BAR_MIN:
            grid.add_column(width=bar, no_wrap=True)
            total = s.total if s.done is not None and s.total else None
            cells.append(ProgressBar(total=total, completed=s.done or 0, width=bar))
        grid.add_column(no_wrap=True)
        cells.append(Text(numbers))
        grid.add_row(*cells)
        yield grid
        second = Text(f"  elapsed {s.elapsed()}" + (f" · {s.detail}" if s.detail else ""), style="dim")
        second.truncate(options.max_width, overflow="ellipsis")
        yield second


@contextlib.contextmanager
def progress(
    title: str, out: TextIO | None = None, interval: float = LINE_INTERVAL
) -> Iterator[ProgressReport]:
    """A live bar if ``out`` (default stdout) is a terminal, else plain lines; closed at the end."""
    stream = sys.stdout if out is None else out
    report: ProgressReport
    if stream.isatty():
        from rich.console import Console

        report = BarProgress(Console(file=stream))
    else:
        report = LineProgress(title, stream, interval)
    try:
        yield report
    finally:
        report.close()
