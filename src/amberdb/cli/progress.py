"""A progress display for long commands (pack, verify, backup, restore).

Written here rather than taken from a package: AmberDB's core has no runtime dependencies,
and the command line must work wherever the library does; all it needs is one line.

On a terminal it redraws one line on stderr (percentage, rate, time left) at most ten times a
second; elsewhere (a log, a pipe) it prints a plain line every few seconds or every 10%, so a
log stays short; quiet, it shows nothing.  A task that ends within its first second shows
nothing either.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_bytes", "format_duration"]

_REDRAW = 0.1  # seconds between redraws on a terminal
_PLAIN_EVERY = 5.0  # seconds between plain lines when nothing else prompts one
# Nothing shows before these many seconds: a task that ends sooner needs no progress.
_TTY_DELAY = 0.3
_PLAIN_DELAY = 1.0


def format_bytes(n: float) -> str:
    """``1.5 MiB``: a size (or a rate's bytes) in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``1:02:03`` or ``02:03``."""
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Shows how far a task is: call ``update(done, total)`` as it goes, ``close()`` at the end.

    ``unit`` is ``"bytes"`` (rates in KiB/s, MiB/s...) or a word for the items counted.
    """

    def __init__(
        self,
        label: str,
        *,
        quiet: bool = False,
        unit: str = "bytes",
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.quiet = quiet
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self._now = time.monotonic
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._start = self._now()
        self._last_draw = float("-inf")
        self._last_tenth = -1
        self._drawn = False  # a terminal line is showing and needs its newline
        self.done = 0
        self.total = 0

    def _amount(self, n: float) -> str:
        return format_bytes(n) if self.unit == "bytes" else f"{n:,.0f} {self.unit}"

    def text(self) -> str:
        """The line as it would show now."""
        elapsed = max(self._now() - self._start, 1e-9)
        rate = self.done / elapsed
        parts = [self.label]
        if self.total > 0:
            parts.append(f"{min(100.0, 100.0 * self.done / self.total):5.1f}%")
            if self.unit == "bytes":
                parts.append(f"{self._amount(self.done)} of {self._amount(self.total)}")
            else:
                parts.append(f"{self.done:,}/{self._amount(self.total)}")
        else:
            parts.append(self._amount(self.done))
        parts.append(f"{self._amount(rate)}/s")
        if self.total > 0 and rate > 0 and self.done < self.total:
            parts.append(f"{format_duration((self.total - self.done) / rate)} left")
        return "  ".join(parts)

    def update(self, done: int, total: int = 0) -> None:
        """Record that ``done`` of ``total`` (0: unknown) units are done; redraw if it is time."""
        self.done, self.total = done, total
        if self.quiet:
            return
        now = self._now()
        if now - self._start < (_TTY_DELAY if self.tty else _PLAIN_DELAY):
            return
        if self.tty:
            if now - self._last_draw >= _REDRAW or (total and done >= total):
                self._last_draw = now
                self.stream.write("\r\x1b[K" + self.text())
                self.stream.flush()
                self._drawn = True
            return
        tenth = 10 * done // total if total > 0 else -1
        if tenth > self._last_tenth or now - self._last_draw >= _PLAIN_EVERY:
            self._last_tenth = max(tenth, self._last_tenth)
            self._last_draw = now
            self.stream.write(self.text() + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the display (a terminal line gets its newline)."""
        if self._drawn and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
