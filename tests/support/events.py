"""`ctr events` watched in the background, for tests that check what containerd published.

    with CtrEvents(ctd) as events:                 # subscribed once the constructor returns
        at, payload = events.wait_for(container_id, "/tasks/exit", since=started)
        line = events.wait_for_line(lambda line: "/tasks/delete" in line)

Every line is kept raw (`lines`) and, when it is an event, parsed into an `Event`
(`entries`): containerd's timestamp, topic and JSON payload.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

from tests.support.containerd import Containerd

SUBSCRIBE_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Event:
    """One published event: containerd's stamp (epoch seconds), topic, payload and raw line."""

    at: float
    topic: str
    payload: dict[str, Any]
    line: str


def parse_event_time(date: str, clock: str, offset: str) -> float:
    """Go's time.Time.String() ("2026-11-23 07:50:01.123456789 +0000") as epoch seconds."""
    whole, _, fraction = clock.partition(".")
    moment = datetime.strptime(f"{date} {whole} {offset}", "%Y-%m-%d %H:%M:%S %z")
    return moment.timestamp() + (int(fraction.ljust(9, "0")) / 1e9 if fraction else 0.0)


def parse_event_line(line: str) -> Event | None:
    """`<date> <clock> <offset> <zone> <namespace> <topic> <payload>`, or None for other lines."""
    parts = line.rstrip("\n").split(" ", 6)
    if len(parts) < 7 or not parts[5].startswith("/"):
        return None
    try:
        payload = json.loads(parts[6])
    except json.JSONDecodeError:
        payload = {"raw": parts[6]}
    return Event(parse_event_time(parts[0], parts[1], parts[2]), parts[5], payload, line)


class CtrEvents:
    """`ctr events` against one containerd, read by a thread until `close()`."""

    def __init__(self, ctd: Containerd) -> None:
        self._process = subprocess.Popen(ctd.ctr_argv("events"), stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                         env=ctd.environment(), text=True)
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._entries: list[Event] = []
        self._reader = threading.Thread(target=self._read, name="ctr-events", daemon=True)
        self._reader.start()
        try:
            self._wait_subscribed(ctd)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_subscribed(self, ctd: Containerd) -> None:
        """Touch the namespace until its update shows up: from then on nothing is missed."""
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        probe = 0
        while not any(e.topic == "/namespaces/update" for e in self.entries):
            assert time.monotonic() < deadline, "ctr events never showed a probe event"
            probe += 1
            ctd.ctr("namespaces", "label", ctd.namespace, f"kybernate-events-probe={probe}", check=True)
            time.sleep(0.1)

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            event = parse_event_line(line)
            with self._lock:
                self._lines.append(line)
                if event is not None:
                    self._entries.append(event)

    @property
    def lines(self) -> list[str]:
        """Every line read so far, raw (a copy)."""
        with self._lock:
            return list(self._lines)

    @property
    def entries(self) -> list[Event]:
        """Every event read so far, parsed (a copy)."""
        with self._lock:
            return list(self._entries)

    def of(self, container_id: str, topic: str, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        """The container's events on `topic` stamped at or after `since` (ids get reused)."""
        return [(e.at, e.payload) for e in self.entries
                if e.topic == topic and e.payload.get("container_id") == container_id and e.at >= since]

    def wait_for(self, container_id: str, topic: str, since: float = 0.0,
                 timeout: float = 20.0) -> tuple[float, dict[str, Any]]:
        """The first of `of(container_id, topic, since)`, waiting up to `timeout` for it."""
        deadline = time.monotonic() + timeout
        while not (found := self.of(container_id, topic, since)):
            assert time.monotonic() < deadline, (
                f"no {topic} event for {container_id} within {timeout}s; saw {self.lines[-20:]}")
            time.sleep(0.05)
        return found[0]

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> str:
        """The first raw line that `predicate` accepts, waiting up to `timeout` for it."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines
            for line in lines:
                if predicate(line):
                    return line
            assert time.monotonic() < deadline, f"no matching event within {timeout}s; saw {lines}"
            time.sleep(0.05)

    def topics_for(self, container_id: str) -> list[str]:
        """The /tasks/ topics of lines naming `container_id`, in the order they came."""
        return [word for line in self.lines if container_id in line
                for word in line.split() if word.startswith("/tasks/")]

    def close(self) -> None:
        """Stop `ctr events` and its reader; safe to call twice."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._reader.join(STOP_TIMEOUT_S)
