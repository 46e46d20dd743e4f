"""Progress display of a benchmark run, on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30
# Without a terminal, a bar is printed as a plain line at most this often.
PLAIN_INTERVAL_S = 10.0


class Progress:
    """Step lines with the time since the start, and a bar for long waits.

    On a terminal the bar is redrawn in place. Otherwise it is printed as a
    line every PLAIN_INTERVAL_S seconds, so logs of long runs stay short.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.started = time.monotonic()
        self._bar_shown = False
        self._last_plain = float("-inf")

    def step(self, text: str) -> None:
        """Print one line, such as the start of a scenario or a result."""
        self._end_bar()
        elapsed = time.monotonic() - self.started
        self.stream.write(f"[{elapsed:7.1f} s] {text}\n")
        self.stream.flush()

    def bar(self, label: str, done: float, total: float, detail: str = "") -> None:
        """Show how far a wait of ``total`` seconds has come."""
        fraction = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        filled = round(fraction * BAR_WIDTH)
        text = (
            f"    {label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{done:6.1f}/{total:.0f} s {detail}"
        ).rstrip()
        if self.interactive:
            self.stream.write("\r" + text.ljust(100))
            self.stream.flush()
            self._bar_shown = True
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_INTERVAL_S:
            self._last_plain = now
            self.stream.write(text + "\n")
            self.stream.flush()

    def _end_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        self._last_plain = float("-inf")
