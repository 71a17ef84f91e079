"""Following a job on stderr: one live line in a terminal, a few plain lines in a log.

In a terminal, rich redraws a single line in place, cropped to the terminal's width: a line wider
than the terminal would wrap, and every redraw would then leave the wrapped part behind (the
issue saw 142 lines for one job). Redirected to a file or a pipe there is nobody to redraw for:
a plain line when the status changes (queued, running, done), else at most one every
`LOG_INTERVAL_S` seconds with the latest stage (a search changes its stage with every candidate,
several times a second), and not one control sequence.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from optiforge_client.models import Job
from optiforge_client.terminal import is_terminal, plain, terminal_console

#: A log gets a progress line at most this often while nothing else changes (seconds).
LOG_INTERVAL_S = 5.0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _best(best: dict[str, Any] | None) -> str | None:
    """A search's current best: `best 3.09× −1.20 pt (int8 … · pruned 30 %)`."""
    if not best:
        return None
    parts = ["best"]
    if best.get("speedup") is not None:
        parts.append(f"{best['speedup']:.2f}×")
    if best.get("drop") is not None:
        parts.append(f"{-best['drop'] * 100:+.2f} pt".replace("-", "−"))
    label = best.get("label") or (best.get("lineage") or {}).get("label")
    if label:
        parts.append(f"({label})")
    return " ".join(parts) if len(parts) > 1 else None


def status_text(job: Job) -> str:
    """`42.0% running · 3 min 40 s left · best 3.09× −1.20 pt (…) · stage`: the most telling
    first, since a narrow terminal cuts the end."""
    times = []
    if job.remaining_s is not None and not job.finished:
        times.append(f"{_duration(job.remaining_s)} left")
    elif job.elapsed_s is not None:
        times.append(f"{_duration(job.elapsed_s)} elapsed")
    extras = [*times, _best(job.best), job.stage if job.stage != job.status else None]
    return f"{job.progress * 100:5.1f}% {job.status}" + "".join(f" · {extra}" for extra in extras if extra)


def bar_width(columns: int) -> int:
    """Cells of the bar on a terminal this wide: none on a narrow one, where the words matter more."""
    return 20 if columns >= 100 else 10 if columns >= 60 else 0


class TerminalProgress:
    """One line redrawn in place by rich (cropped with … to the width); the job's messages are
    printed above it as they come, once each."""

    def __init__(self, console: Console):
        self.console, self.seen_messages = console, 0
        self.live = Live(
            console=console, auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False
        )
        self.started = False

    def line(self, job: Job) -> Text:
        width = bar_width(self.console.width)
        filled = round(job.progress * width)
        text = Text(no_wrap=True, overflow="ellipsis", end="")
        if width:
            text.append("━" * filled, style="green")
            text.append("━" * (width - filled) + " ", style="grey37")
        text.append(plain(status_text(job)))
        return text

    def __call__(self, job: Job) -> None:
        if not self.started:
            self.live.start()
            self.started = True
        for message in job.messages[self.seen_messages :]:
            self.live.console.print(Text(f"  · {plain(message)}"))
        self.seen_messages = len(job.messages)
        self.live.update(self.line(job), refresh=True)
        if job.finished:
            self.close()

    def close(self) -> None:
        if self.started:
            self.live.stop()
            self.started = False


class LogProgress:
    """Plain lines for a file or a pipe: the job's messages as they come, and a status line when
    the status changes or the job ends, else at most one per `interval` seconds, showing the stage
    the job is in then."""

    def __init__(
        self, stream: IO[str], interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ):
        self.stream, self.interval, self.clock = stream, interval, clock
        self.seen_messages, self.last_state, self.last_time = 0, None, -float("inf")

    def __call__(self, job: Job) -> None:
        for message in job.messages[self.seen_messages :]:
            self.stream.write(f"  · {plain(message)}\n")
        self.seen_messages = len(job.messages)
        now = self.clock()
        if job.status != self.last_state or now - self.last_time >= self.interval or job.finished:
            self.stream.write(f"{job.id} {plain(status_text(job))}\n")
            self.last_state, self.last_time = job.status, now
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


@contextmanager
def following(stream: IO[str] | None = None, quiet: bool = False) -> Iterator[Callable[[Job], None] | None]:
    """The progress callback for `wait_for_job` on `stream` (stderr): a live line in a terminal,
    plain lines elsewhere, none when `quiet`. The live line is closed however the wait ends."""
    if quiet:
        yield None
        return
    stream = stream or sys.stderr
    progress: TerminalProgress | LogProgress = (
        TerminalProgress(terminal_console(stream)) if is_terminal(stream) else LogProgress(stream)
    )
    try:
        yield progress
    finally:
        progress.close()
