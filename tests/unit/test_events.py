"""EventPublisher against a fake containerd events receiver built on our ttrpc server.

The real containerd path is covered by the integration tests; here the receiver can
vanish, come back, refuse or hang on command.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf import empty_pb2
from kybernate.errors import InvalidArgument
from kybernate.protos import events_pb2, events_ttrpc_pb2
from kybernate.shim.events import (
    EVENTS_SERVICE,
    FORWARD_METHOD,
    EventPublisher,
    PublisherState,
    RetryPolicy,
)
from kybernate.shim.ttrpc import CallContext, TtrpcServer


def run_async(test):
    """Run an async test in a fresh event loop, bounded so a hang fails instead of stalling."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))
    return wrapper


FAST_RETRY = RetryPolicy(max_attempts=40, initial_backoff_s=0.02, max_backoff_s=0.1,
                         call_timeout_s=2.0)


class FakeContainerd:
    """Records Forward calls; `behaviour` may make a call fail or hang."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: list[tuple[events_ttrpc_pb2.Envelope, str | None]] = []
        self.refuse_topics: set[str] = set()
        self.hang = False
        self.arrived = asyncio.Event()
        self._server: TtrpcServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def forward(self, request: events_ttrpc_pb2.ForwardRequest,
                      ctx: CallContext) -> empty_pb2.Empty:
        if self.hang:
            await asyncio.sleep(3600)
        if request.envelope.topic in self.refuse_topics:
            raise InvalidArgument(f"refusing {request.envelope.topic}")
        self.received.append((request.envelope, ctx.namespace))
        self.arrived.set()
        return empty_pb2.Empty()

    async def start(self) -> None:
        server = TtrpcServer()
        server.register(EVENTS_SERVICE, FORWARD_METHOD, events_ttrpc_pb2.ForwardRequest,
                        self.forward)
        self._server = server
        self._task = asyncio.create_task(server.serve_path(self.path))
        for _ in range(200):
            if os.path.exists(self.path):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("fake containerd did not start")

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close(grace=0)
            assert self._task is not None
            await self._task
            self._server = None

    def topics(self) -> list[str]:
        return [envelope.topic for envelope, _ in self.received]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"only {self.topics()} arrived"
            await asyncio.sleep(0.01)


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    # Keep unix socket paths short (108 bytes), tmp_path can be long.
    path = f"/tmp/kyb-ev-{os.getpid()}-{uuid.uuid4().hex[:6]}.sock"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def exit_event(pid: int) -> events_pb2.TaskExit:
    event = events_pb2.TaskExit(container_id="c1", id="c1", pid=pid, exit_status=7)
    event.exited_at.GetCurrentTime()
    return event


@run_async
async def test_envelope_carries_everything_containerd_needs(socket_path: str) -> None:
    fake = FakeContainerd(socket_path)
    await fake.start()
    publisher = EventPublisher(socket_path, "ns-a", retry=FAST_RETRY)
    try:
        before = time.time_ns()
        publisher.publish("/tasks/exit", exit_event(42))
        await fake.wait_for(1)
    finally:
        await publisher.close(2.0)
        await fake.stop()
    envelope, namespace = fake.received[0]
    assert namespace == "ns-a"
    assert envelope.namespace == "ns-a" and envelope.topic == "/tasks/exit"
    assert envelope.timestamp.ToNanoseconds() >= before > 0
    assert envelope.event.type_url == "containerd.events.TaskExit"
    decoded = events_pb2.TaskExit.FromString(envelope.event.value)
    assert (decoded.pid, decoded.exit_status, decoded.container_id) == (42, 7, "c1")
    assert publisher.state is PublisherState.CLOSED


@run_async
async def test_order_is_kept_and_publish_never_blocks(socket_path: str) -> None:
    fake = FakeContainerd(socket_path)
    await fake.start()
    publisher = EventPublisher(f"unix://{socket_path}", "ns", retry=FAST_RETRY)
    topics = ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
              "/tasks/exit", "/tasks/delete"] * 20
    try:
        started = time.monotonic()
        for i, topic in enumerate(topics):
            publisher.publish(topic, events_pb2.TaskStart(container_id="c", pid=i))
        assert time.monotonic() - started < 0.5  # only queued, nothing awaited
        await fake.wait_for(len(topics))
    finally:
        await publisher.close(5.0)
        await fake.stop()
    assert fake.topics() == topics
    pids = [events_pb2.TaskStart.FromString(e.event.value).pid for e, _ in fake.received]
    assert pids == list(range(len(topics)))


@run_async
async def test_events_wait_out_a_containerd_restart(socket_path: str) -> None:
    fake = FakeContainerd(socket_path)
    await fake.start()
    publisher = EventPublisher(socket_path, "ns", retry=FAST_RETRY)
    try:
        publisher.publish("/tasks/start", events_pb2.TaskStart(container_id="c", pid=1))
        await fake.wait_for(1)
        await fake.stop()  # containerd goes away; the publisher's connection breaks
        publisher.publish("/tasks/exit", exit_event(1))
        publisher.publish("/tasks/delete", events_pb2.TaskDelete(container_id="c", pid=1))
        await asyncio.sleep(0.3)
        assert publisher.pending + len(fake.received) >= 1
        restarted = FakeContainerd(socket_path)
        await restarted.start()
        await restarted.wait_for(2)
        assert restarted.topics() == ["/tasks/exit", "/tasks/delete"]
    finally:
        await publisher.close(2.0)
        await restarted.stop()


@run_async
async def test_event_dropped_after_bounded_attempts(socket_path: str, caplog) -> None:
    publisher = EventPublisher(socket_path, "ns", retry=RetryPolicy(
        max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01, call_timeout_s=0.5))
    with caplog.at_level(logging.ERROR, logger="kybernate.shim.events"):
        publisher.publish("/tasks/exit", exit_event(9))
        started = time.monotonic()
        await publisher.close(5.0)
    assert time.monotonic() - started < 3.0
    assert any("not delivered after 3 attempts" in r.getMessage() for r in caplog.records)
    assert publisher.pending == 0


@run_async
async def test_refused_event_is_dropped_and_the_next_goes_through(socket_path: str,
                                                                  caplog) -> None:
    fake = FakeContainerd(socket_path)
    fake.refuse_topics.add("/tasks/oom")
    await fake.start()
    publisher = EventPublisher(socket_path, "ns", retry=FAST_RETRY)
    try:
        with caplog.at_level(logging.ERROR, logger="kybernate.shim.events"):
            publisher.publish("/tasks/oom", events_pb2.TaskOOM(container_id="c"))
            publisher.publish("/tasks/paused", events_pb2.TaskPaused(container_id="c"))
            await fake.wait_for(1)
    finally:
        await publisher.close(2.0)
        await fake.stop()
    assert fake.topics() == ["/tasks/paused"]
    assert any("refused event /tasks/oom" in r.getMessage() for r in caplog.records)


@run_async
async def test_close_is_bounded_when_containerd_hangs(socket_path: str, caplog) -> None:
    fake = FakeContainerd(socket_path)
    fake.hang = True
    await fake.start()
    publisher = EventPublisher(socket_path, "ns", retry=FAST_RETRY)
    try:
        publisher.publish("/tasks/exit", exit_event(3))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="kybernate.shim.events"):
            await publisher.close(0.5)
        assert time.monotonic() - started < 2.0
        assert any("not delivered to containerd within" in r.getMessage() for r in caplog.records)
        # Publishing after close is refused quietly, never raised at the caller.
        publisher.publish("/tasks/delete", events_pb2.TaskDelete(container_id="c"))
        assert publisher.pending == 0
    finally:
        await fake.stop()
