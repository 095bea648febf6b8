"""Task events, forwarded to containerd over its ttrpc events service.

containerd needs a task's events in order (create, start, exit, delete), and a shim
must never stall a task operation because containerd is restarting. So `publish`
only enqueues; one drain task sends the queue in order, reconnecting with backoff
while containerd is away, and gives an event up (with an error logged) after a
bounded number of attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from google.protobuf.message import Message
from kybernate.errors import DeadlineExceeded, KybernateError, Unavailable
from kybernate.protos import events_ttrpc_pb2, typeurl
from kybernate.shim.ttrpc import NAMESPACE_METADATA_KEY, TtrpcClient

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_METHOD = "Forward"


class EventsClient(Protocol):
    async def call(self, service: str, method: str, request: Message, response_type: type[Message],
                   timeout: float | None = None,
                   metadata: dict[str, list[str]] | None = None) -> Message: ...

    async def close(self) -> None: ...


Connector = Callable[[str], Awaitable[EventsClient]]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard one event is pushed before it is dropped (about 20 s by default,
    long enough to ride out a containerd restart)."""

    max_attempts: int = 12
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    call_timeout_s: float = 5.0

    def backoff(self, attempt: int) -> float:
        return min(self.initial_backoff_s * 2.0 ** (attempt - 1), self.max_backoff_s)


class PublisherState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (Unavailable, DeadlineExceeded)):
        return True
    if isinstance(err, KybernateError):
        return False
    return isinstance(err, (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError))


class EventPublisher:
    """Ordered, non-blocking event forwarding to containerd's TTRPC_ADDRESS."""

    def __init__(self, ttrpc_address: str, namespace: str, *,
                 retry: RetryPolicy = RetryPolicy(), max_queued: int = 4096,
                 connect: Connector | None = None) -> None:
        self._path = ttrpc_address.removeprefix("unix://")
        self._namespace = namespace
        self._retry = retry
        self._connect: Connector = connect or TtrpcClient.connect
        self._queue: asyncio.Queue[tuple[str, events_ttrpc_pb2.ForwardRequest]] = (
            asyncio.Queue(maxsize=max_queued))
        self._client: EventsClient | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._state = PublisherState.OPEN

    @property
    def state(self) -> PublisherState:
        return self._state

    @property
    def pending(self) -> int:
        """Events accepted but not yet delivered or dropped."""
        return self._queue.qsize()

    def publish(self, topic: str, message: Message) -> None:
        """Queue `message` under `topic`, stamped now; never blocks, never raises."""
        if self._state is not PublisherState.OPEN:
            log.error("event %s published after the publisher closed: dropped", topic)
            return
        request = events_ttrpc_pb2.ForwardRequest()
        envelope = request.envelope
        envelope.timestamp.FromNanoseconds(time.time_ns())
        envelope.namespace = self._namespace
        envelope.topic = topic
        envelope.event.CopyFrom(typeurl.pack(message))
        try:
            self._queue.put_nowait((topic, request))
        except asyncio.QueueFull:
            log.error("event queue full (%d): dropped %s", self._queue.maxsize, topic)
            return
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain(),
                                                                   name="event-publisher")

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting events, deliver what is queued within `timeout`, drop the rest."""
        if self._state is PublisherState.CLOSED:
            return
        self._state = PublisherState.CLOSING
        if self._drainer is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._queue.join()
            except TimeoutError:
                log.error("%d event(s) not delivered to containerd within %.1fs: dropped",
                          self._queue.qsize(), timeout)
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        await self._disconnect()
        self._state = PublisherState.CLOSED

    async def _drain(self) -> None:
        while True:
            topic, request = await self._queue.get()
            try:
                await self._deliver(topic, request)
            finally:
                self._queue.task_done()

    async def _deliver(self, topic: str, request: events_ttrpc_pb2.ForwardRequest) -> None:
        from google.protobuf import empty_pb2

        metadata = {NAMESPACE_METADATA_KEY: [self._namespace]}
        for attempt in range(1, self._retry.max_attempts + 1):
            try:
                if self._client is None:
                    async with asyncio.timeout(self._retry.call_timeout_s):
                        self._client = await self._connect(self._path)
                await self._client.call(EVENTS_SERVICE, FORWARD_METHOD, request, empty_pb2.Empty,
                                        timeout=self._retry.call_timeout_s, metadata=metadata)
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - classified just below
                await self._disconnect()
                if not _is_transient(err):
                    log.error("containerd refused event %s: %s: dropped", topic, err)
                    return
                if attempt == self._retry.max_attempts:
                    log.error("event %s not delivered after %d attempts (%s): dropped",
                              topic, attempt, err)
                    return
                log.debug("event %s: attempt %d failed (%s); retrying", topic, attempt, err)
                await asyncio.sleep(self._retry.backoff(attempt))

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
