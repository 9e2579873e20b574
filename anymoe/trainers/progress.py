"""A one-line progress display: step, loss, tokens/s and ETA.

On a terminal the line is redrawn in place; in a log file (CI, nohup) one plain line is
printed per update, so logs stay readable. The ETA is the mean step time since the display
started (after the first, compile-and-warm-up step) times the steps left.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """``update(step, **fields)`` after each logged step; ``close()`` at the end."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 24,
                 enabled: bool = True) -> None:
        self.total = total
        self.start_step = start
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0: float | None = None
        self._step0 = start
        self._dirty = False

    def eta(self, step: int, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        if self._t0 is None or step <= self._step0:
            return float("nan")
        per_step = (now - self._t0) / (step - self._step0)
        return per_step * max(0, self.total - step)

    def line(self, step: int, **fields: float) -> str:
        frac = min(1.0, step / max(1, self.total))
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"step {step}/{self.total} [{bar}]"]
        if "loss" in fields:
            parts.append(f"loss {fields['loss']:.4f}")
        if "lr" in fields:
            parts.append(f"lr {fields['lr']:.2e}")
        if "tokens_per_s" in fields:
            parts.append(f"{format_rate(fields['tokens_per_s'])} tok/s")
        parts.append(f"ETA {format_seconds(self.eta(step))}")
        return "  ".join(parts)

    def update(self, step: int, **fields: float) -> None:
        if self._t0 is None:
            # Time from the first finished step on: step one pays for warm-up.
            self._t0, self._step0 = time.perf_counter(), step
        if not self.enabled:
            return
        text = self.line(step, **fields)
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self._dirty = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line without breaking the in-place bar."""
        if not self.enabled:
            return
        if self._dirty:
            self.stream.write("\n")
            self._dirty = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False


__all__ = ["Progress", "format_rate", "format_seconds"]
