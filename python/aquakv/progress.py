"""One progress helper for every long loop: a tqdm bar on a terminal, plain periodic lines in a redirected log.

    from aquakv.progress import progress
    for layer in progress(layers, desc="calibrating", unit="layer"):
        ...
    with progress(total=n, desc="windows", unit="window") as bar:
        bar.update(1); bar.set_postfix_str("ppl 12.3")

When stderr is not a terminal (a log file, a pipe, CI), a tqdm bar would write hundreds of carriage-return frames
into the log, and no bar at all leaves the reader guessing whether a half-hour run is alive. There the helper writes
one line at most every `interval` seconds and one at the end:

    calibrating: 3/24 layer, 12 s elapsed, ~84 s left

It imports nothing else of aquakv, so every package may use it.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Optional, TextIO

__all__ = ["progress", "LineProgress", "INTERVAL_S"]

INTERVAL_S = 10.0  # one line per ~10 s: often enough to show life, rare enough to keep a log readable


def progress(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[int] = None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    stream: Optional[TextIO] = None,
    clock: Callable[[], float] = time.monotonic,
    interval: float = INTERVAL_S,
):
    """A tqdm-like progress object over `iterable` (or a manual one of `total` steps, driven by `.update(n)`).

    enabled=False draws nothing (the object still counts). `stream` defaults to sys.stderr at call time; on a
    terminal the result is a tqdm bar (`leave=False` erases it when done), elsewhere a LineProgress. `clock` and
    `interval` exist for tests."""
    stream = sys.stderr if stream is None else stream
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and _isatty(stream):
        from tqdm import tqdm

        # disable=False explicitly: cli.common.bars_off may have made disabled the default for third-party bars.
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave, disable=False)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, enabled=enabled, stream=stream, clock=clock,
                        interval=interval)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 100 else f"{s / 60:.1f} min"


class LineProgress:
    """The non-terminal face of `progress`: counts like tqdm, prints a plain line at most every `interval` s and
    once at close (unless nothing is drawn: enabled=False)."""

    def __init__(self, iterable=None, *, total=None, desc: str, unit: str = "it", enabled: bool = True,
                 stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic,
                 interval: float = INTERVAL_S):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.enabled, self.stream, self.clock, self.interval = enabled, stream, clock, interval
        self.n = 0
        self.postfix = ""
        self.start = self._last = clock()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        finished = self.total is not None and self.n >= self.total  # close() writes that line
        if now - self._last >= self.interval and not finished:
            self._last = now
            self._write(self.line(now))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def write(self, s: str) -> None:
        """A message between progress lines (tqdm.write's counterpart)."""
        if self.enabled:
            self._write(s)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._write(self.line(self.clock(), done=True))

    def line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}", f"{_seconds(elapsed)} elapsed"]
        if done:
            parts.append("done" if self.total is None or self.n >= self.total else "stopped")
        elif self.total is not None and self.n > 0:
            parts.append(f"~{_seconds(elapsed / self.n * max(self.total - self.n, 0))} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        print(text, file=self.stream, flush=True)
