"""Progress of a long operation (upload, download, push, pull, verification): bytes
done of a total, written by worker threads, read by the gRPC stream that reports it."""

from __future__ import annotations

import dataclasses
import threading
import time


@dataclasses.dataclass(frozen=True)
class Snapshot:
    step: str
    done_bytes: int
    total_bytes: int


class TransferMeter:
    def __init__(self, step: str = "", total_bytes: int = 0) -> None:
        self._lock = threading.Lock()
        self._step = step
        self._done = 0
        self._total = total_bytes
        self._started = time.monotonic()
        self._moved = 0  # every byte of every step: the operation's throughput

    def begin(self, step: str, total_bytes: int) -> None:
        """A new step: counting starts again from 0 of `total_bytes`."""
        with self._lock:
            self._step, self._done, self._total = step, 0, total_bytes

    def set_total(self, total_bytes: int) -> None:
        with self._lock:
            self._total = total_bytes

    def add(self, count: int) -> None:
        """`count` more bytes done (negative: a retry gives some back). Thread-safe."""
        with self._lock:
            self._done = max(0, self._done + count)
            self._moved += count

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(self._step, self._done, self._total)

    @property
    def moved_bytes(self) -> int:
        with self._lock:
            return max(0, self._moved)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started
