"""A unary ttrpc server on asyncio, as containerd expects from a shim.

One task reads each connection's frames in order; every request runs in a task of its
own, so calls on one connection proceed concurrently and answer in any order. Protocol
violations are answered on their stream where one is known, or end that connection;
they never reach the other connections.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from google.protobuf.message import DecodeError, Message
from kybernate.errors import KybernateError, StatusCode
from kybernate.protos import ttrpc_pb2
from kybernate.shim.ttrpc.context import CallContext
from kybernate.shim.ttrpc.framing import (
    DEFAULT_MAX_MESSAGE,
    FrameTooLarge,
    FrameType,
    TruncatedFrame,
    encode_frame,
    read_frame,
)
from kybernate.shim.ttrpc.peercred import peer_allowed, peer_credentials

logger = logging.getLogger("kybernate.ttrpc")

Handler = Callable[[Message, CallContext], Awaitable[Message]]

# StreamReader pauses the socket above twice this much buffered data; frames of up to
# 4 MiB arrive faster with fewer pause/resume round trips.
_STREAM_BUFFER_LIMIT = 1 << 20
# Request flag: the client keeps its side open to send data frames (a streaming call).
_FLAG_REMOTE_OPEN = 0x2
# A connection with this many calls running stops reading until one finishes, so a
# peer that floods requests (or never reads answers) cannot grow the shim without bound.
DEFAULT_MAX_CALLS_PER_CONNECTION = 1024
# How long handlers get to react to cancellation when the grace period of close() ran out.
_CANCEL_GRACE = 1.0


class _Method(NamedTuple):
    request_type: type[Message]
    handler: Handler


class _State(enum.Enum):
    NEW = "new"
    SERVING = "serving"
    CLOSING = "closing"
    CLOSED = "closed"


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """A listening unix stream socket at `path` with the given file mode."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def encode_error_response(code: int, message: str, limit: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """A Response carrying an error status, its message cut to keep within `limit` bytes."""
    response = ttrpc_pb2.Response()
    response.status.code = code
    response.status.message = message
    encoded = response.SerializeToString()
    if len(encoded) <= limit:
        return encoded
    # Room for the tag, length and code fields, and the marker that says text was cut.
    room = max(0, limit - 32)
    response.status.message = message.encode()[:room].decode(errors="ignore") + "..."
    return response.SerializeToString()


class TtrpcServer:
    """Serves registered unary methods over ttrpc.

    Lifecycle: NEW --start()/serve()--> SERVING --close()--> CLOSING --> CLOSED.
    """

    def __init__(
        self,
        max_message: int = DEFAULT_MAX_MESSAGE,
        check_peer_uid: bool = True,
        max_calls_per_connection: int = DEFAULT_MAX_CALLS_PER_CONNECTION,
    ) -> None:
        if max_message <= 0:
            raise ValueError(f"max_message must be positive, not {max_message}")
        if max_calls_per_connection <= 0:
            raise ValueError(
                f"max_calls_per_connection must be positive, not {max_calls_per_connection}"
            )
        self._max_message = max_message
        self._check_peer_uid = check_peer_uid
        self._max_calls_per_connection = max_calls_per_connection
        self._methods: dict[tuple[str, str], _Method] = {}
        self._services: set[str] = set()
        self._state = _State.NEW
        self._listener: asyncio.AbstractServer | None = None
        self._owned_path: str | None = None
        self._connections: set[_ServerConnection] = set()
        self._calls: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    @property
    def max_message(self) -> int:
        return self._max_message

    @property
    def max_calls_per_connection(self) -> int:
        return self._max_calls_per_connection

    @property
    def accepting_calls(self) -> bool:
        return self._state is _State.SERVING

    def register(
        self, service: str, method: str, request_type: type[Message], handler: Handler
    ) -> None:
        """Route `service`/`method` to `handler`; requests decode as `request_type`."""
        key = (service, method)
        if key in self._methods:
            raise ValueError(f"{service}/{method} is already registered")
        self._methods[key] = _Method(request_type, handler)
        self._services.add(service)

    async def start(self, sock: socket.socket) -> None:
        """Begin accepting on an already-bound unix socket; returns once accepting.

        The server owns `sock` from now on and closes it in close().
        """
        if self._state is not _State.NEW:
            raise RuntimeError(f"cannot start a server that is {self._state.value}")
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("ttrpc serves on a unix stream socket")
        sock.setblocking(False)
        self._listener = await asyncio.start_unix_server(
            self._accept, sock=sock, limit=_STREAM_BUFFER_LIMIT
        )
        self._state = _State.SERVING

    async def serve(self, sock: socket.socket) -> None:
        """Serve on `sock` until close(); cancelling this closes the server at once."""
        await self.start(sock)
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            await self.close(grace=0)
            raise

    async def serve_path(self, path: str, mode: int = 0o600) -> None:
        """Bind a unix socket at `path` and serve on it until close(), which removes it."""
        if self._state is not _State.NEW:
            raise RuntimeError(f"cannot start a server that is {self._state.value}")
        sock = bind_unix_socket(path, mode)
        self._owned_path = path
        await self.serve(sock)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, give in-flight calls `grace` seconds, then close connections.

        Requests that arrive meanwhile are answered Unavailable. A handler must not
        await close() itself (its own answer could not be sent); it schedules it in a
        task of its own after answering.
        """
        if self._state is _State.CLOSED:
            return
        if self._state is _State.CLOSING:
            await self._closed.wait()
            return
        if self._state is _State.NEW:
            self._finish_close()
            return
        self._state = _State.CLOSING
        assert self._listener is not None
        self._listener.close()
        try:
            await self._settle_calls(grace)
            readers = [conn.abort() for conn in list(self._connections)]
            if readers:
                await asyncio.wait(readers)
            await self._listener.wait_closed()
        except asyncio.CancelledError:
            # Whoever closes gave up waiting (a timeout around close()): finish at once
            # rather than leave the server half closed, with serve() waiting forever.
            current = asyncio.current_task()
            for call in self._calls:
                if call is not current:
                    call.cancel()
            for conn in list(self._connections):
                conn.abort()
            raise
        finally:
            self._finish_close()

    async def _settle_calls(self, grace: float) -> None:
        current = asyncio.current_task()
        calls = {call for call in self._calls if call is not current}
        if not calls:
            return
        _, late = await asyncio.wait(calls, timeout=grace)
        if not late:
            return
        logger.warning(
            "cancelling %d call(s) still running after %.1fs of shutdown", len(late), grace
        )
        for call in late:
            call.cancel()
        _, stuck = await asyncio.wait(late, timeout=_CANCEL_GRACE)
        if stuck:
            logger.error("%d call(s) ignored cancellation; closing without them", len(stuck))

    def _finish_close(self) -> None:
        if self._owned_path is not None:
            try:
                os.unlink(self._owned_path)
            except FileNotFoundError:
                pass
            self._owned_path = None
        self._state = _State.CLOSED
        self._closed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._state is not _State.SERVING:
            writer.close()
            return
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
        except OSError as exc:
            logger.warning("closing a connection whose peer credentials are unreadable: %s", exc)
            writer.close()
            return
        if self._check_peer_uid and not peer_allowed(peer.uid):
            logger.warning(
                "refusing a connection from pid %d uid %d (only root and uid %d may call)",
                peer.pid,
                peer.uid,
                os.geteuid(),
            )
            writer.close()
            return
        connection = _ServerConnection(self, reader, writer, peer.pid)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)

    def _track_call(self, call: asyncio.Task[None]) -> None:
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    async def invoke(self, request: ttrpc_pb2.Request) -> bytes:
        """Run the handler for one decoded request; the encoded Response, never raising."""
        method = self._methods.get((request.service, request.method))
        if method is None:
            if request.service not in self._services:
                return self._error(StatusCode.UNIMPLEMENTED, f"unknown service {request.service!r}")
            return self._error(
                StatusCode.UNIMPLEMENTED,
                f"service {request.service!r} has no method {request.method!r}",
            )
        try:
            message = method.request_type.FromString(request.payload)
        except DecodeError as exc:
            return self._error(
                StatusCode.INVALID_ARGUMENT,
                f"cannot decode {method.request_type.DESCRIPTOR.full_name}: {exc}",
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        metadata: dict[str, list[str]] = {}
        for pair in request.metadata:
            metadata.setdefault(pair.key, []).append(pair.value)
        ctx = CallContext(request.service, request.method, metadata, deadline)
        name = f"{request.service}/{request.method}"
        try:
            async with asyncio.timeout_at(deadline) as scope:
                result = await method.handler(message, ctx)
        except TimeoutError as exc:
            if scope.expired():
                return self._error(StatusCode.DEADLINE_EXCEEDED, f"{name}: deadline exceeded")
            return self._internal_error(name, exc)
        except KybernateError as exc:
            return self._error(int(exc.code), exc.message)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or current.cancelling():
                raise  # the server itself cancels this call (shutdown)
            # Something the handler awaited was cancelled, not the call: still answer.
            return self._error(StatusCode.CANCELLED, f"{name}: cancelled")
        except Exception as exc:  # noqa: BLE001 - a handler's bug must not end the server
            return self._internal_error(name, exc)
        if not isinstance(result, Message):
            return self._error(
                StatusCode.INTERNAL,
                f"{name}: handler returned {type(result).__name__}, not a message",
            )
        response = ttrpc_pb2.Response(payload=result.SerializeToString())
        response.status.SetInParent()  # ttrpc sends an explicit OK status
        encoded = response.SerializeToString()
        if len(encoded) > self._max_message:
            return self._error(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{name}: response of {len(encoded)} bytes exceeds the maximum of "
                f"{self._max_message}",
            )
        return encoded

    def _internal_error(self, name: str, exc: BaseException) -> bytes:
        logger.error("%s failed", name, exc_info=exc)
        return self._error(StatusCode.INTERNAL, str(exc) or type(exc).__name__)

    def _error(self, code: int, message: str) -> bytes:
        return encode_error_response(code, message, self._max_message)


class _ServerConnection:
    """One client connection: reads frames in order and answers each request."""

    def __init__(
        self,
        server: TtrpcServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_pid: int,
    ) -> None:
        self._server = server
        self._peer_pid = peer_pid
        self._reader = reader
        self._writer = writer
        self._last_stream_id = 0
        self._calls: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._aborted = False

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            await self._read_frames()
            # The peer sent all it will; it may still read the answers to what it asked.
            if self._calls:
                await asyncio.wait(set(self._calls))
        except asyncio.CancelledError:
            if not self._aborted:
                raise
            # The server's close() ended this connection: finish normally, for asyncio's
            # stream machinery treats a cancelled connection task as an error.
            assert self._task is not None
            self._task.uncancel()
        except TruncatedFrame as exc:
            logger.warning("closing the connection from pid %d: %s", self._peer_pid, exc)
        except (ConnectionError, OSError) as exc:
            logger.debug("lost the connection from pid %d: %s", self._peer_pid, exc)
        except Exception:
            logger.exception(
                "closing the connection from pid %d after an unexpected failure", self._peer_pid
            )
        finally:
            self._writer.close()

    def abort(self) -> asyncio.Task[None]:
        """Stop reading and close; returns the reader task to await."""
        assert self._task is not None
        self._aborted = True
        self._task.cancel()
        return self._task

    async def _read_frames(self) -> None:
        max_message = self._server.max_message
        while True:
            try:
                frame = await read_frame(self._reader, max_message)
            except FrameTooLarge as exc:
                await self._on_oversized(exc)
                continue
            if frame is None:
                return
            if frame.type == FrameType.REQUEST:
                await self._on_request(frame.stream_id, frame.flags, frame.data)
            elif frame.type == FrameType.DATA:
                await self._send_error(
                    frame.stream_id, StatusCode.UNIMPLEMENTED, "streaming calls are not supported"
                )
            else:
                logger.debug(
                    "ignoring a frame of type %d on stream %d", frame.type, frame.stream_id
                )

    async def _on_oversized(self, exc: FrameTooLarge) -> None:
        if exc.frame_type == FrameType.REQUEST:
            if exc.stream_id % 2 == 1 and exc.stream_id > self._last_stream_id:
                self._last_stream_id = exc.stream_id
        elif exc.frame_type != FrameType.DATA:
            return
        logger.warning(
            "discarded a frame from pid %d on stream %d: %s", self._peer_pid, exc.stream_id, exc
        )
        await self._send_error(exc.stream_id, StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def _on_request(self, stream_id: int, flags: int, data: bytes) -> None:
        if stream_id % 2 == 0:
            await self._send_error(
                stream_id,
                StatusCode.INVALID_ARGUMENT,
                f"stream id {stream_id} is even; client streams use odd ids",
            )
            return
        if stream_id <= self._last_stream_id:
            await self._send_error(
                stream_id,
                StatusCode.INVALID_ARGUMENT,
                f"stream id {stream_id} does not exceed the last one used ({self._last_stream_id})",
            )
            return
        self._last_stream_id = stream_id
        if flags & _FLAG_REMOTE_OPEN:
            await self._send_error(
                stream_id, StatusCode.UNIMPLEMENTED, "streaming calls are not supported"
            )
            return
        try:
            request = ttrpc_pb2.Request.FromString(data)
        except DecodeError as exc:
            await self._send_error(
                stream_id, StatusCode.INVALID_ARGUMENT, f"cannot decode the request: {exc}"
            )
            return
        if not self._server.accepting_calls:
            await self._send_error(stream_id, StatusCode.UNAVAILABLE, "the server is shutting down")
            return
        call = asyncio.create_task(self._answer(stream_id, request))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        self._server._track_call(call)
        if len(self._calls) >= self._server.max_calls_per_connection:
            await asyncio.wait(set(self._calls), return_when=asyncio.FIRST_COMPLETED)

    async def _answer(self, stream_id: int, request: ttrpc_pb2.Request) -> None:
        await self._send(stream_id, await self._server.invoke(request))

    async def _send_error(self, stream_id: int, code: int, message: str) -> None:
        await self._send(stream_id, encode_error_response(code, message, self._server.max_message))

    async def _send(self, stream_id: int, response: bytes) -> None:
        # write() queues a whole frame at once, so frames never interleave; the lock
        # keeps the waits for a full socket buffer in order too.
        async with self._write_lock:
            if self._writer.is_closing():
                logger.debug("dropping the answer on stream %d: connection closed", stream_id)
                return
            self._writer.write(encode_frame(stream_id, FrameType.RESPONSE, 0, response))
            try:
                await self._writer.drain()
            except ConnectionError as exc:
                logger.debug("dropping the answer on stream %d: %s", stream_id, exc)
