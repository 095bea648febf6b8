"""kybernate.shim.ttrpc against real unix sockets: the client, and raw frames at the server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from google.protobuf import empty_pb2, wrappers_pb2
from kybernate import errors
from kybernate.errors import StatusCode
from kybernate.protos import events_pb2, events_ttrpc_pb2, ttrpc_pb2
from kybernate.shim.ttrpc import (
    NAMESPACE_METADATA_KEY,
    CallContext,
    TtrpcClient,
    TtrpcServer,
    bind_unix_socket,
)
from kybernate.shim.ttrpc.framing import HEADER, FrameType, encode_frame, read_frame

from tests.support.containerd import Containerd

SERVICE = "kybernate.test.v1.Probe"
NOBODY = 65534
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop with an overall time limit."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout=60))

    return run


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short and private: unix socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix=f"kyb-ttrpc-{os.getpid()}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Probe:
    """The test service; records what its handlers saw."""

    def __init__(self) -> None:
        self.contexts: list[CallContext] = []
        self.cancelled = asyncio.Event()

    def register(self, server: TtrpcServer) -> None:
        server.register(SERVICE, "Echo", wrappers_pb2.StringValue, self.echo)
        server.register(SERVICE, "Sleep", wrappers_pb2.DoubleValue, self.sleep)
        server.register(SERVICE, "Raise", wrappers_pb2.StringValue, self.raise_named)
        server.register(SERVICE, "Crash", empty_pb2.Empty, self.crash)
        server.register(SERVICE, "Huge", wrappers_pb2.Int64Value, self.huge)
        server.register(SERVICE, "NotAMessage", empty_pb2.Empty, self.not_a_message)

    async def echo(
        self, request: wrappers_pb2.StringValue, ctx: CallContext
    ) -> wrappers_pb2.StringValue:
        self.contexts.append(ctx)
        return wrappers_pb2.StringValue(value=request.value)

    async def sleep(self, request: wrappers_pb2.DoubleValue, ctx: CallContext) -> empty_pb2.Empty:
        try:
            await asyncio.sleep(request.value)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return empty_pb2.Empty()

    async def raise_named(
        self, request: wrappers_pb2.StringValue, ctx: CallContext
    ) -> empty_pb2.Empty:
        error_type = getattr(errors, request.value)
        raise error_type(f"{request.value} raised on purpose")

    async def crash(self, request: empty_pb2.Empty, ctx: CallContext) -> empty_pb2.Empty:
        raise RuntimeError("handler bug")

    async def huge(
        self, request: wrappers_pb2.Int64Value, ctx: CallContext
    ) -> wrappers_pb2.BytesValue:
        return wrappers_pb2.BytesValue(value=b"x" * request.value)

    async def not_a_message(self, request: empty_pb2.Empty, ctx: CallContext) -> Any:
        return "not a message"


@contextlib.asynccontextmanager
async def serving(
    sock_dir: str, **server_args: Any
) -> AsyncIterator[tuple[TtrpcServer, Probe, str]]:
    path = os.path.join(sock_dir, "ttrpc.sock")
    server = TtrpcServer(**server_args)
    probe = Probe()
    probe.register(server)
    await server.start(bind_unix_socket(path))
    try:
        yield server, probe, path
    finally:
        await server.close(grace=1)
        os.unlink(path)


def envelope(
    method: str, payload: bytes = b"", *, timeout_nano: int = 0, service: str = SERVICE
) -> bytes:
    return ttrpc_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=timeout_nano
    ).SerializeToString()


def echo_envelope(value: str) -> bytes:
    return envelope("Echo", wrappers_pb2.StringValue(value=value).SerializeToString())


class RawPeer:
    """A client speaking frames by hand, to send what TtrpcClient never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> RawPeer:
        return cls(*await asyncio.open_unix_connection(path))

    def send(self, stream_id: int, frame_type: int, data: bytes, flags: int = 0) -> None:
        self.writer.write(encode_frame(stream_id, frame_type, flags, data))

    async def response(self) -> tuple[int, ttrpc_pb2.Response]:
        frame = await asyncio.wait_for(read_frame(self.reader, 1 << 30), timeout=5)
        assert frame is not None, "server closed the connection instead of answering"
        assert frame.type == FrameType.RESPONSE
        return frame.stream_id, ttrpc_pb2.Response.FromString(frame.data)

    async def expect_answer(self, stream_id: int, code: int) -> ttrpc_pb2.Response:
        got_stream, response = await self.response()
        assert (got_stream, response.status.code) == (stream_id, code), response.status.message
        return response

    async def expect_closed(self) -> None:
        assert await asyncio.wait_for(self.reader.read(), timeout=5) == b""

    def close(self) -> None:
        self.writer.close()


# --- calls through TtrpcClient -------------------------------------------------------


@async_test
async def test_round_trip_carries_payload_metadata_and_deadline(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, probe, path), await TtrpcClient.connect(path) as client:
        answer = await client.call(
            SERVICE,
            "Echo",
            wrappers_pb2.StringValue(value="héllo"),
            wrappers_pb2.StringValue,
            timeout=30,
            metadata={NAMESPACE_METADATA_KEY: "k8s.io", "multi": ["a", "b"]},
        )
        plain = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue
        )

    assert answer.value == "héllo"
    assert plain.value == ""
    with_deadline, without = probe.contexts
    assert (with_deadline.service, with_deadline.method) == (SERVICE, "Echo")
    assert with_deadline.namespace == "k8s.io"
    assert with_deadline.metadata["multi"] == ["a", "b"]
    assert with_deadline.deadline is not None
    assert 25 < with_deadline.deadline - time.monotonic() <= 30  # asyncio's clock is monotonic
    assert without.deadline is None and without.namespace is None and without.metadata == {}


@async_test
async def test_one_connection_carries_100_concurrent_calls(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path), await TtrpcClient.connect(path) as client:
        delays = [random.uniform(0, 0.3) for _ in range(100)]

        async def one(index: int) -> str:
            await client.call(
                SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=delays[index]), empty_pb2.Empty
            )
            answer = await client.call(
                SERVICE,
                "Echo",
                wrappers_pb2.StringValue(value=f"call-{index}"),
                wrappers_pb2.StringValue,
            )
            return answer.value

        started = time.monotonic()
        answers = await asyncio.gather(*(one(i) for i in range(100)))
        elapsed = time.monotonic() - started

    assert answers == [f"call-{i}" for i in range(100)]
    # Run one after another, the sleeps alone would take about 15 s.
    assert elapsed < 3, f"calls did not overlap: {elapsed:.1f}s"


@async_test
async def test_client_timeout_cancels_the_handler_and_raises_deadline_exceeded(
    sock_dir: str,
) -> None:
    async with serving(sock_dir) as (_, probe, path), await TtrpcClient.connect(path) as client:
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            await client.call(
                SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=10), empty_pb2.Empty, timeout=0.2
            )
        assert time.monotonic() - started < 2
        await asyncio.wait_for(probe.cancelled.wait(), timeout=2)
        # The connection survives the call that gave up.
        answer = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="after"), wrappers_pb2.StringValue
        )
        assert answer.value == "after"


@async_test
async def test_server_enforces_timeout_nano_with_deadline_exceeded(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, probe, path):
        peer = await RawPeer.open(path)
        sleep = wrappers_pb2.DoubleValue(value=10).SerializeToString()
        started = time.monotonic()
        peer.send(1, FrameType.REQUEST, envelope("Sleep", sleep, timeout_nano=200_000_000))
        response = await peer.expect_answer(1, StatusCode.DEADLINE_EXCEEDED)
        assert 0.15 < time.monotonic() - started < 2
        assert "deadline" in response.status.message
        assert probe.cancelled.is_set()
        peer.close()


@async_test
async def test_unknown_service_and_method_answer_unimplemented(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path), await TtrpcClient.connect(path) as client:
        with pytest.raises(errors.Unimplemented, match="unknown service 'no.such.Service'"):
            await client.call("no.such.Service", "Echo", empty_pb2.Empty(), empty_pb2.Empty)
        with pytest.raises(errors.Unimplemented, match="no method 'Frobnicate'"):
            await client.call(SERVICE, "Frobnicate", empty_pb2.Empty(), empty_pb2.Empty)


ERROR_TYPES = [
    errors.Cancelled,
    errors.InvalidArgument,
    errors.DeadlineExceeded,
    errors.NotFound,
    errors.AlreadyExists,
    errors.PermissionDenied,
    errors.ResourceExhausted,
    errors.FailedPrecondition,
    errors.Aborted,
    errors.Unimplemented,
    errors.Internal,
    errors.Unavailable,
    errors.DataLoss,
]


@pytest.mark.parametrize("error_type", ERROR_TYPES, ids=lambda t: t.__name__)
@async_test
async def test_handler_error_travels_as_its_code_and_message(
    sock_dir: str, error_type: type[errors.KybernateError]
) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        peer.send(
            1,
            FrameType.REQUEST,
            envelope(
                "Raise", wrappers_pb2.StringValue(value=error_type.__name__).SerializeToString()
            ),
        )
        response = await peer.expect_answer(1, error_type.code)
        assert response.status.message == f"{error_type.__name__} raised on purpose"
        peer.close()
        async with await TtrpcClient.connect(path) as client:
            with pytest.raises(error_type) as raised:
                await client.call(
                    SERVICE,
                    "Raise",
                    wrappers_pb2.StringValue(value=error_type.__name__),
                    empty_pb2.Empty,
                )
    assert type(raised.value) is error_type
    assert raised.value.message == f"{error_type.__name__} raised on purpose"


@async_test
async def test_unexpected_exception_answers_internal_and_is_logged(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="kybernate.ttrpc")
    async with serving(sock_dir) as (_, _probe, path), await TtrpcClient.connect(path) as client:
        with pytest.raises(errors.Internal, match="handler bug"):
            await client.call(SERVICE, "Crash", empty_pb2.Empty(), empty_pb2.Empty)
        with pytest.raises(errors.Internal, match="not a message"):
            await client.call(SERVICE, "NotAMessage", empty_pb2.Empty(), empty_pb2.Empty)
    crash_logs = [r for r in caplog.records if r.name == "kybernate.ttrpc" and r.exc_info]
    assert crash_logs, "the crash was not logged with its traceback"
    exc_info = crash_logs[0].exc_info
    assert exc_info is not None and isinstance(exc_info[1], RuntimeError)
    assert f"{SERVICE}/Crash" in crash_logs[0].getMessage()


@async_test
async def test_oversized_messages_answer_resource_exhausted(sock_dir: str) -> None:
    async with serving(sock_dir, max_message=64 << 10) as (_, _probe, path):
        async with await TtrpcClient.connect(path) as client:
            with pytest.raises(errors.ResourceExhausted, match="response of"):
                await client.call(
                    SERVICE,
                    "Huge",
                    wrappers_pb2.Int64Value(value=100 << 10),
                    wrappers_pb2.BytesValue,
                )
            small = await client.call(
                SERVICE, "Huge", wrappers_pb2.Int64Value(value=1 << 10), wrappers_pb2.BytesValue
            )
            assert len(small.value) == 1 << 10
        async with await TtrpcClient.connect(path, max_message=64 << 10) as client:
            with pytest.raises(errors.ResourceExhausted, match="request of"):
                await client.call(
                    SERVICE,
                    "Echo",
                    wrappers_pb2.StringValue(value="x" * (65 << 10)),
                    wrappers_pb2.StringValue,
                )
            assert not client.closed


@async_test
async def test_oversized_frame_is_discarded_and_the_connection_stays_usable(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):  # the real 4 MiB limit
        peer = await RawPeer.open(path)
        huge = echo_envelope("y" * (4 << 20))
        assert len(huge) > 4 << 20
        peer.send(1, FrameType.REQUEST, huge)
        response = await peer.expect_answer(1, StatusCode.RESOURCE_EXHAUSTED)
        assert "exceeds the maximum of 4194304" in response.status.message
        peer.send(3, FrameType.REQUEST, echo_envelope("next"))
        response = await peer.expect_answer(3, StatusCode.OK)
        assert wrappers_pb2.StringValue.FromString(response.payload).value == "next"
        peer.close()


@async_test
async def test_ok_answer_carries_an_explicit_status_like_go_ttrpc(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        peer.send(1, FrameType.REQUEST, echo_envelope("a"))
        frame = await asyncio.wait_for(read_frame(peer.reader, 1 << 20), 5)
        assert frame is not None and frame.flags == 0
        assert frame.data.startswith(b"\x0a\x00")  # field 1 (status), empty
        peer.close()


@async_test
async def test_even_stream_ids_answer_invalid_argument(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        for stream_id in (0, 2, 4):
            peer.send(stream_id, FrameType.REQUEST, echo_envelope("even"))
            response = await peer.expect_answer(stream_id, StatusCode.INVALID_ARGUMENT)
            assert "odd" in response.status.message
        peer.send(1, FrameType.REQUEST, echo_envelope("odd"))
        await peer.expect_answer(1, StatusCode.OK)
        peer.close()


@async_test
async def test_non_increasing_stream_ids_answer_invalid_argument(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        peer.send(5, FrameType.REQUEST, echo_envelope("five"))
        await peer.expect_answer(5, StatusCode.OK)
        for stale in (3, 5):
            peer.send(stale, FrameType.REQUEST, echo_envelope("stale"))
            response = await peer.expect_answer(stale, StatusCode.INVALID_ARGUMENT)
            assert "last one used (5)" in response.status.message
        peer.send(7, FrameType.REQUEST, echo_envelope("seven"))
        await peer.expect_answer(7, StatusCode.OK)
        peer.close()


@async_test
async def test_streaming_is_answered_unimplemented(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        peer.send(1, FrameType.DATA, b"some stream data", flags=1)
        await peer.expect_answer(1, StatusCode.UNIMPLEMENTED)
        peer.send(3, FrameType.REQUEST, echo_envelope("open"), flags=2)  # remote open: a stream
        await peer.expect_answer(3, StatusCode.UNIMPLEMENTED)
        peer.send(5, FrameType.REQUEST, echo_envelope("unary"))
        await peer.expect_answer(5, StatusCode.OK)
        peer.close()


@async_test
async def test_unknown_frame_types_are_ignored(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        peer.send(1, 0x7F, b"from the future")
        peer.send(1, FrameType.RESPONSE, b"a response sent to a server")
        peer.send(1, FrameType.REQUEST, echo_envelope("only"))
        await peer.expect_answer(1, StatusCode.OK)
        peer.writer.write_eof()
        await peer.expect_closed()  # nothing else was answered
        peer.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff",  # a truncated varint tag
        b"\x0a\x05ab",  # a string field claiming more bytes than there are
        b"\x0a\x02\xff\xfe",  # service (field 1) that is not UTF-8
    ],
    ids=["bad-tag", "short-string", "bad-utf8"],
)
@async_test
async def test_garbage_request_envelope_answers_invalid_argument(
    sock_dir: str, payload: bytes
) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        peer.send(1, FrameType.REQUEST, payload)
        response = await peer.expect_answer(1, StatusCode.INVALID_ARGUMENT)
        assert "cannot decode the request" in response.status.message
        peer.send(3, FrameType.REQUEST, echo_envelope("still here"))
        await peer.expect_answer(3, StatusCode.OK)
        peer.close()


@async_test
async def test_garbage_call_payload_answers_invalid_argument(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        peer.send(1, FrameType.REQUEST, envelope("Echo", b"\x0a\x09short"))
        response = await peer.expect_answer(1, StatusCode.INVALID_ARGUMENT)
        assert "google.protobuf.StringValue" in response.status.message
        peer.close()


@async_test
async def test_truncated_frame_closes_only_that_connection(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        bystander = await TtrpcClient.connect(path)
        for cut in (4, 10, 30):  # inside the header, after it, inside the data
            peer = await RawPeer.open(path)
            frame = encode_frame(1, FrameType.REQUEST, 0, echo_envelope("x" * 100))
            peer.writer.write(frame[:cut])
            peer.writer.write_eof()
            await peer.expect_closed()
            peer.close()
        answer = await bystander.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="b"), wrappers_pb2.StringValue
        )
        assert answer.value == "b"
        await bystander.close()
        async with await TtrpcClient.connect(path) as fresh:
            answer = await fresh.call(
                SERVICE, "Echo", wrappers_pb2.StringValue(value="f"), wrappers_pb2.StringValue
            )
            assert answer.value == "f"


@async_test
async def test_answers_in_flight_are_sent_after_the_peer_half_closes(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        peer = await RawPeer.open(path)
        peer.send(
            1,
            FrameType.REQUEST,
            envelope("Sleep", wrappers_pb2.DoubleValue(value=0.2).SerializeToString()),
        )
        peer.writer.write_eof()
        await peer.expect_answer(1, StatusCode.OK)
        await peer.expect_closed()
        peer.close()


def _fork_as(uid: int, child: Callable[[], int]) -> int:
    """Fork a child that switches to `uid` and runs `child`; its pid.

    The child never returns into the test runner: it leaves with os._exit.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        os.setgid(uid)
        os.setuid(uid)
        code = child()
    finally:
        os._exit(code)


async def _wait_child(pid: int) -> int:
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("uid, answered", [(NOBODY, False), (0, True)])
@async_test
async def test_peers_of_another_uid_are_refused(sock_dir: str, uid: int, answered: bool) -> None:
    os.chmod(sock_dir, 0o755)
    path = os.path.join(sock_dir, "open.sock")
    server = TtrpcServer()
    Probe().register(server)
    await server.start(bind_unix_socket(path, mode=0o666))
    frame = encode_frame(1, FrameType.REQUEST, 0, echo_envelope("who"))

    def call_once() -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(frame)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
        return 0 if data else 1

    try:
        exit_code = await _wait_child(_fork_as(uid, call_once))
    finally:
        await server.close(grace=1)
    assert exit_code == (0 if answered else 1)


@async_test
async def test_client_refuses_a_server_of_another_uid(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o1777)
    path = os.path.join(sock_dir, "foreign.sock")
    ready_read, ready_write = os.pipe()

    def listen_and_hold() -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
            sock.listen()
            os.write(ready_write, b"!")
            sock.accept()
            time.sleep(30)
        return 0

    pid = _fork_as(NOBODY, listen_and_hold)
    try:
        os.close(ready_write)
        assert await asyncio.to_thread(os.read, ready_read, 1) == b"!"
        with pytest.raises(errors.Unavailable, match=f"uid {NOBODY}"):
            await TtrpcClient.connect(path)
    finally:
        os.close(ready_read)
        os.kill(pid, signal.SIGKILL)
        await _wait_child(pid)


# --- client behaviour ------------------------------------------------------------------


@async_test
async def test_connection_loss_fails_pending_calls_with_unavailable(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "vanishing.sock")
    received = asyncio.Event()

    async def read_one_request_and_hang_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_frame(reader, 1 << 20)
        received.set()
        writer.close()

    listener = await asyncio.start_unix_server(read_one_request_and_hang_up, path)
    try:
        client = await TtrpcClient.connect(path)
        pending = asyncio.create_task(
            client.call(SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue)
        )
        with pytest.raises(errors.Unavailable, match="closed"):
            await asyncio.wait_for(pending, 5)
        assert received.is_set() and client.closed
        with pytest.raises(errors.Unavailable):
            await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue)
        await client.close()
    finally:
        listener.close()
        await listener.wait_closed()


@async_test
async def test_client_sends_timeout_nano_and_gives_up_locally(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "silent.sock")
    seen: list[ttrpc_pb2.Request] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frame = await read_frame(reader, 1 << 20)
        assert frame is not None
        seen.append(ttrpc_pb2.Request.FromString(frame.data))
        await reader.read()
        writer.close()

    listener = await asyncio.start_unix_server(never_answer, path)
    try:
        async with await TtrpcClient.connect(path) as client:
            with pytest.raises(errors.DeadlineExceeded, match="within 0.3s"):
                await client.call(
                    SERVICE,
                    "Echo",
                    wrappers_pb2.StringValue(),
                    wrappers_pb2.StringValue,
                    timeout=0.3,
                )
    finally:
        listener.close()
        await listener.wait_closed()
    assert seen[0].timeout_nano == 300_000_000


@async_test
async def test_connect_to_a_missing_socket_is_unavailable_naming_it(sock_dir: str) -> None:
    missing = os.path.join(sock_dir, "nobody-listens.sock")
    with pytest.raises(errors.Unavailable, match=missing):
        await TtrpcClient.connect(f"unix://{missing}")


@async_test
async def test_client_close_fails_waiting_calls(sock_dir: str) -> None:
    async with serving(sock_dir) as (_, _probe, path):
        client = await TtrpcClient.connect(path)
        waiting = asyncio.create_task(
            client.call(SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=10), empty_pb2.Empty)
        )
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(errors.Unavailable, match="closed by the client"):
            await waiting


# --- server lifecycle ------------------------------------------------------------------


@async_test
async def test_close_lets_calls_in_flight_finish_and_refuses_new_ones(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "graceful.sock")
    server = TtrpcServer()
    Probe().register(server)
    await server.start(bind_unix_socket(path))
    client = await TtrpcClient.connect(path)
    in_flight = asyncio.create_task(
        client.call(SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=0.5), empty_pb2.Empty)
    )
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(server.close(grace=5))
    await asyncio.sleep(0.1)
    with pytest.raises(errors.Unavailable, match="shutting down"):
        await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue)
    with pytest.raises(errors.Unavailable):
        await TtrpcClient.connect(path)
    assert isinstance(await in_flight, empty_pb2.Empty)
    await asyncio.wait_for(closing, 5)
    with pytest.raises(errors.Unavailable):
        await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue)
    await client.close()
    os.unlink(path)


@async_test
async def test_close_cancels_calls_that_outlive_the_grace_period(sock_dir: str) -> None:
    async with serving(sock_dir) as (server, probe, path):
        client = await TtrpcClient.connect(path)
        stuck = asyncio.create_task(
            client.call(SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=60), empty_pb2.Empty)
        )
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await server.close(grace=0.3)
        assert time.monotonic() - started < 2
        assert probe.cancelled.is_set()
        with pytest.raises(errors.Unavailable):
            await stuck
        await client.close()


@async_test
async def test_serve_path_owns_its_socket_file(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "owned.sock")
    server = TtrpcServer()
    Probe().register(server)
    serving_task = asyncio.create_task(server.serve_path(path))
    for _ in range(100):
        if os.path.exists(path):
            break
        await asyncio.sleep(0.01)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with await TtrpcClient.connect(path) as client:
        answer = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="p"), wrappers_pb2.StringValue
        )
        assert answer.value == "p"
    await server.close()
    await asyncio.wait_for(serving_task, 5)
    assert not os.path.exists(path)


def test_register_refuses_a_duplicate_method() -> None:
    server = TtrpcServer()
    Probe().register(server)
    with pytest.raises(ValueError, match="already registered"):
        server.register(SERVICE, "Echo", empty_pb2.Empty, Probe().echo)  # type: ignore[arg-type]


def test_header_layout_matches_the_protocol() -> None:
    assert HEADER.size == 10
    assert encode_frame(0x01020304, 2, 1, b"ab") == bytes.fromhex("00000002010203040201") + b"ab"


# --- against containerd's own (Go) ttrpc server -------------------------------------------


@pytest.fixture
def private_containerd() -> Iterator[Containerd]:
    containerd = Containerd()
    try:
        containerd.start()
        yield containerd
    finally:
        containerd.stop()


def _oom_envelope(namespace: str, container_id: str) -> events_ttrpc_pb2.ForwardRequest:
    forward = events_ttrpc_pb2.ForwardRequest()
    envelope = forward.envelope
    envelope.timestamp.GetCurrentTime()
    envelope.namespace = namespace
    envelope.topic = "/tasks/oom"
    envelope.event.Pack(events_pb2.TaskOOM(container_id=container_id), type_url_prefix="")
    return forward


@async_test
async def test_client_forwards_events_to_containerd(private_containerd: Containerd) -> None:
    containerd = private_containerd
    container_id = f"ttrpc-interop-{os.getpid()}-{random.getrandbits(32):08x}"
    watcher = await asyncio.create_subprocess_exec(
        *containerd.ctr_argv("events"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with await TtrpcClient.connect(containerd.address + ".ttrpc") as client:
            with pytest.raises(errors.InvalidArgument, match="invalid namespace"):
                await client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    _oom_envelope("Not a namespace!", container_id),
                    empty_pb2.Empty,
                    timeout=10,
                )
            with pytest.raises(errors.Unimplemented):
                await client.call(
                    EVENTS_SERVICE, "NoSuchMethod", empty_pb2.Empty(), empty_pb2.Empty, timeout=10
                )

            async def seen() -> bytes:
                assert watcher.stdout is not None
                while True:
                    line = await watcher.stdout.readline()
                    assert line, "ctr events ended"
                    if container_id.encode() in line:
                        return line

            watching = asyncio.create_task(seen())
            # ctr subscribes in its own time: forward until it reports the event.
            for _ in range(50):
                answer = await client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    _oom_envelope(containerd.namespace, container_id),
                    empty_pb2.Empty,
                    timeout=10,
                )
                assert isinstance(answer, empty_pb2.Empty)
                done, _ = await asyncio.wait({watching}, timeout=0.2)
                if done:
                    break
            line = await asyncio.wait_for(watching, 1)
    finally:
        watcher.kill()
        await watcher.wait()
    assert b"/tasks/oom" in line and containerd.namespace.encode() in line


@async_test
async def test_a_connection_at_its_call_limit_waits_before_reading_more(sock_dir: str) -> None:
    async with (
        serving(sock_dir, max_calls_per_connection=2) as (_, _probe, path),
        await TtrpcClient.connect(path) as client,
    ):

        async def sleep_and_time() -> float:
            sleep = wrappers_pb2.DoubleValue(value=0.4)
            await client.call(SERVICE, "Sleep", sleep, empty_pb2.Empty)
            return time.monotonic() - started

        started = time.monotonic()
        finished = sorted(await asyncio.gather(*(sleep_and_time() for _ in range(3))))
    # Two run at once; the third is read only when one of them is done.
    assert finished[1] < 0.75, finished
    assert finished[2] >= 0.8, finished


@async_test
async def test_a_close_that_is_given_up_on_still_closes_everything(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "impatient.sock")
    server = TtrpcServer()
    probe = Probe()
    probe.register(server)
    serving_task = asyncio.create_task(server.serve(bind_unix_socket(path)))
    await asyncio.sleep(0)
    client = await TtrpcClient.connect(path)
    stuck = asyncio.create_task(
        client.call(SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=60), empty_pb2.Empty)
    )
    await asyncio.sleep(0.1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(server.close(grace=30), timeout=0.2)
    serving_task.cancel()
    await asyncio.wait([serving_task], timeout=2)
    assert serving_task.done()
    await asyncio.wait_for(probe.cancelled.wait(), timeout=2)
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(stuck, 2)
    await server.close()  # closing again is harmless
    await client.close()
    os.unlink(path)
