"""Progress of a long operation on the terminal: one line, redrawn in place, on
stderr when it is a terminal; nothing at all otherwise (logs and pipes stay clean)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class ProgressLine:
    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self._what = what
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()
        self._width = 0
        self._step = ""
        self._step_started = time.monotonic()

    def update(self, step: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if step != self._step:
            self._step, self._step_started = step, time.monotonic()
        elapsed = max(time.monotonic() - self._step_started, 1e-6)
        rate = f"{human_bytes(done / elapsed)}/s"
        amount = f"{human_bytes(done)} of {human_bytes(total)} ({100 * done / total:3.0f}%)" if total else \
            human_bytes(done)
        line = f"{self._what}: {step} {amount} {rate}"
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def finish(self) -> None:
        if self.enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0
