"""Property tests for kybernate.shim.ttrpc: framing round-trips, and a live server that
keeps serving whatever bytes and frames are thrown at it."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import NamedTuple

import pytest
from google.protobuf import wrappers_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kybernate.errors import NotFound, StatusCode
from kybernate.protos import ttrpc_pb2
from kybernate.shim.ttrpc import CallContext, TtrpcServer, bind_unix_socket
from kybernate.shim.ttrpc.framing import (
    HEADER,
    HEADER_SIZE,
    Frame,
    FrameTooLarge,
    FrameType,
    TruncatedFrame,
    encode_frame,
    read_frame,
)

SERVICE = "kybernate.test.v1.Fuzz"
# A small limit, so that oversized frames cost little to send.
FUZZ_MAX_MESSAGE = 1024
FUZZ_SETTINGS = settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Framing is pure computation; fewer cases cover it.
FRAMING_SETTINGS = settings(FUZZ_SETTINGS, max_examples=500)

u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
u8 = st.integers(min_value=0, max_value=255)


# --- framing -----------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    try:
        yield event_loop
    finally:
        event_loop.close()


def _reader_fed(
    loop: asyncio.AbstractEventLoop, data: bytes, cuts: list[int]
) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(loop=loop)
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        reader.feed_data(data[start:cut])
        start = cut
    reader.feed_data(data[start:])
    reader.feed_eof()
    return reader


frames = st.builds(
    Frame, stream_id=u32, type=u8, flags=u8, data=st.binary(max_size=FUZZ_MAX_MESSAGE + 64)
)


@FRAMING_SETTINGS
@given(sent=st.lists(frames, max_size=5), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_frames_round_trip_whatever_the_chunking(
    loop: asyncio.AbstractEventLoop, sent: list[Frame], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(*frame) for frame in sent)
    reader = _reader_fed(loop, wire, cuts)
    received = []
    outcomes: list[object] = []
    while True:
        try:
            frame = loop.run_until_complete(read_frame(reader, FUZZ_MAX_MESSAGE))
        except FrameTooLarge as exc:
            outcomes.append(("too large", exc.stream_id, exc.frame_type, exc.length))
            continue
        if frame is None:
            break
        received.append(frame)
        outcomes.append(frame)
    expected = [
        frame
        if len(frame.data) <= FUZZ_MAX_MESSAGE
        else ("too large", frame.stream_id, frame.type, len(frame.data))
        for frame in sent
    ]
    assert outcomes == expected
    for frame in received:
        assert HEADER.unpack(encode_frame(*frame)[:HEADER_SIZE]) == (
            len(frame.data),
            frame.stream_id,
            frame.type,
            frame.flags,
        )


@FRAMING_SETTINGS
@given(frame=frames, keep=st.integers(min_value=1))
def test_a_frame_cut_short_is_reported_truncated(
    loop: asyncio.AbstractEventLoop, frame: Frame, keep: int
) -> None:
    wire = encode_frame(*frame)
    cut = keep % len(wire)  # 0 <= cut < len(wire)
    reader = _reader_fed(loop, wire[:cut], [])
    if cut == 0:
        assert loop.run_until_complete(read_frame(reader, 1 << 20)) is None
    else:
        with pytest.raises(TruncatedFrame):
            loop.run_until_complete(read_frame(reader, 1 << 20))


# --- a live server -------------------------------------------------------------------


async def _echo(request: wrappers_pb2.StringValue, ctx: CallContext) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=request.value)


async def _fail(request: wrappers_pb2.StringValue, ctx: CallContext) -> wrappers_pb2.StringValue:
    raise NotFound(f"no {request.value!r} here")


@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    """A server on its own event loop in a thread, so the tests can use plain sockets."""
    sock_dir = tempfile.mkdtemp(prefix=f"kyb-ttrpc-fuzz-{os.getpid()}-")
    path = os.path.join(sock_dir, "fuzz.sock")
    ttrpc_logger = logging.getLogger("kybernate.ttrpc")
    saved_level = ttrpc_logger.level
    ttrpc_logger.setLevel(logging.CRITICAL)  # thousands of expected protocol warnings
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ttrpc-fuzz-server", daemon=True)
    thread.start()
    server = TtrpcServer(max_message=FUZZ_MAX_MESSAGE)
    server.register(SERVICE, "Echo", wrappers_pb2.StringValue, _echo)
    server.register(SERVICE, "Fail", wrappers_pb2.StringValue, _fail)
    try:
        asyncio.run_coroutine_threadsafe(server.start(bind_unix_socket(path)), loop).result(10)
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(server.close(grace=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        ttrpc_logger.setLevel(saved_level)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _exchange(path: str, data: bytes) -> bytes:
    """Send `data`, half-close, and return all the server wrote until it closed.

    A server that hangs instead of answering or closing fails on the socket timeout.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close a connection it gave up on before reading it all
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


def _parse_responses(wire: bytes) -> list[tuple[int, ttrpc_pb2.Response]]:
    """Split what the server sent into responses, asserting every frame is well formed."""
    responses = []
    offset = 0
    while offset < len(wire):
        assert len(wire) - offset >= HEADER_SIZE, "the server sent a partial header"
        length, stream_id, frame_type, flags = HEADER.unpack_from(wire, offset)
        offset += HEADER_SIZE
        assert (frame_type, flags) == (FrameType.RESPONSE, 0)
        assert length <= FUZZ_MAX_MESSAGE
        assert len(wire) - offset >= length, "the server sent a partial frame"
        responses.append((stream_id, ttrpc_pb2.Response.FromString(wire[offset : offset + length])))
        offset += length
    return responses


def _assert_still_serving(path: str) -> None:
    value = "still serving"
    request = ttrpc_pb2.Request(
        service=SERVICE,
        method="Echo",
        payload=wrappers_pb2.StringValue(value=value).SerializeToString(),
    )
    [(stream_id, response)] = _parse_responses(
        _exchange(path, encode_frame(1, FrameType.REQUEST, 0, request.SerializeToString()))
    )
    assert (stream_id, response.status.code) == (1, StatusCode.OK)
    assert wrappers_pb2.StringValue.FromString(response.payload).value == value


@FUZZ_SETTINGS
@given(
    data=st.one_of(
        st.binary(max_size=64),
        st.binary(min_size=HEADER_SIZE, max_size=FUZZ_MAX_MESSAGE + 64),
        # A plausible header (small length, request type) followed by noise.
        st.builds(
            lambda length, stream_id, noise: (
                HEADER.pack(length, stream_id, FrameType.REQUEST, 0) + noise
            ),
            st.integers(min_value=0, max_value=2 * FUZZ_MAX_MESSAGE),
            u32,
            st.binary(max_size=FUZZ_MAX_MESSAGE + 64),
        ),
    )
)
def test_random_bytes_never_stop_the_server(live_server: str, data: bytes) -> None:
    _parse_responses(_exchange(live_server, data))
    _assert_still_serving(live_server)


class SentFrame(NamedTuple):
    stream_id: int
    type: int
    flags: int
    data: bytes


def _valid_string_value(value: str) -> bytes:
    return wrappers_pb2.StringValue(value=value).SerializeToString()


envelopes = st.builds(
    lambda service, method, payload, timeout_nano, metadata: ttrpc_pb2.Request(
        service=service,
        method=method,
        payload=payload,
        timeout_nano=timeout_nano,
        metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in metadata],
    ).SerializeToString(),
    service=st.sampled_from([SERVICE, "containerd.task.v2.Task", ""]) | st.text(max_size=8),
    method=st.sampled_from(["Echo", "Fail", ""]) | st.text(max_size=8),
    payload=st.text(max_size=20).map(_valid_string_value) | st.binary(max_size=24),
    timeout_nano=st.sampled_from([0, 1, 10**9])
    | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    metadata=st.lists(st.tuples(st.text(max_size=6), st.text(max_size=6)), max_size=2),
)

# Frames near the size limit: their content matters little, so it is cheap noise.
near_limit_data = st.builds(
    lambda size, seed: random.Random(seed).randbytes(size),
    st.integers(min_value=FUZZ_MAX_MESSAGE - 8, max_value=FUZZ_MAX_MESSAGE + 8),
    st.integers(min_value=0, max_value=1 << 32),
)

garbage_frames = st.builds(
    SentFrame,
    stream_id=st.integers(min_value=0, max_value=12) | u32,
    type=st.sampled_from([FrameType.REQUEST, FrameType.REQUEST, FrameType.DATA]) | u8,
    flags=st.sampled_from([0, 1, 2]) | u8,
    data=envelopes | st.binary(max_size=64) | near_limit_data,
)


def _expected_answers(sent: list[SentFrame]) -> list[tuple[int, int]]:
    """The (stream id, status code) the protocol requires for each frame, in order."""
    answers = []
    last_stream_id = 0
    for frame in sent:
        if frame.type not in (FrameType.REQUEST, FrameType.DATA):
            continue  # unknown types are ignored, responses from a client too
        if len(frame.data) > FUZZ_MAX_MESSAGE:
            if (
                frame.type == FrameType.REQUEST
                and frame.stream_id % 2
                and frame.stream_id > last_stream_id
            ):
                last_stream_id = frame.stream_id
            answers.append((frame.stream_id, StatusCode.RESOURCE_EXHAUSTED))
        elif frame.type == FrameType.DATA:
            answers.append((frame.stream_id, StatusCode.UNIMPLEMENTED))
        elif frame.stream_id % 2 == 0 or frame.stream_id <= last_stream_id:
            answers.append((frame.stream_id, StatusCode.INVALID_ARGUMENT))
        else:
            last_stream_id = frame.stream_id
            answers.append((frame.stream_id, _expected_call_status(frame)))
    return answers


def _expected_call_status(frame: SentFrame) -> int:
    if frame.flags & 2:
        return StatusCode.UNIMPLEMENTED
    try:
        request = ttrpc_pb2.Request.FromString(frame.data)
    except DecodeError:
        return StatusCode.INVALID_ARGUMENT
    if request.service != SERVICE or request.method not in ("Echo", "Fail"):
        return StatusCode.UNIMPLEMENTED
    try:
        wrappers_pb2.StringValue.FromString(request.payload)
    except DecodeError:
        return StatusCode.INVALID_ARGUMENT
    return StatusCode.OK if request.method == "Echo" else StatusCode.NOT_FOUND


@FUZZ_SETTINGS
@given(sent=st.lists(garbage_frames, min_size=1, max_size=6))
def test_garbage_frames_get_the_answers_the_protocol_requires(
    live_server: str, sent: list[SentFrame]
) -> None:
    wire = b"".join(encode_frame(*frame) for frame in sent)
    responses = _parse_responses(_exchange(live_server, wire))
    got = sorted((stream_id, response.status.code) for stream_id, response in responses)
    assert got == sorted(_expected_answers(sent))
    _assert_still_serving(live_server)
