"""A ttrpc client on asyncio: one connection, many concurrent unary calls.

Each call takes the next odd stream id and waits on a future; one reader task hands
every response frame to the future of its stream. When the connection ends, every
call still waiting fails with Unavailable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Self, TypeVar

from google.protobuf.message import DecodeError, Message
from kybernate.errors import (
    DataLoss,
    DeadlineExceeded,
    KybernateError,
    ResourceExhausted,
    Unavailable,
    error_from_status,
)
from kybernate.protos import ttrpc_pb2
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

ResponseT = TypeVar("ResponseT", bound=Message)

Metadata = Mapping[str, str | Sequence[str]]

_STREAM_BUFFER_LIMIT = 1 << 20
_LAST_STREAM_ID = (1 << 32) - 1
_UNIX_SCHEME = "unix://"


class TtrpcClient:
    """A connection to one ttrpc server. Create it with `await TtrpcClient.connect(path)`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        address: str,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._address = address
        self._max_message = max_message
        self._next_stream_id = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._write_lock = asyncio.Lock()
        # None while the connection is usable; afterwards, why it is not.
        self._closed_reason: str | None = None
        self._reader_task = asyncio.create_task(
            self._read_responses(), name=f"ttrpc-client-reader {address}"
        )

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        check_peer_uid: bool = True,
    ) -> TtrpcClient:
        """Connect to the unix socket `path` (a plain path or a unix:// address)."""
        path = path.removeprefix(_UNIX_SCHEME)
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=_STREAM_BUFFER_LIMIT)
        except OSError as exc:
            raise Unavailable(
                f"cannot connect to ttrpc socket {path}: {exc.strerror or exc}"
            ) from exc
        if check_peer_uid:
            uid = peer_credentials(writer.get_extra_info("socket")).uid
            if not peer_allowed(uid):
                writer.close()
                raise Unavailable(
                    f"ttrpc socket {path} is served by uid {uid}, neither root nor ours"
                )
        return cls(reader, writer, address=path, max_message=max_message)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ResponseT:
        """Call `service`/`method`; the decoded response, or the server's error raised.

        `timeout` (seconds) travels as the call's deadline and bounds the local wait.
        """
        name = f"{service}/{method}"
        if self._closed_reason is not None:
            raise Unavailable(
                f"{name}: ttrpc connection to {self._address} is closed: {self._closed_reason}"
            )
        envelope = ttrpc_pb2.Request(
            service=service, method=method, payload=request.SerializeToString()
        )
        if timeout is not None:
            envelope.timeout_nano = max(1, int(timeout * 1e9))
        if metadata:
            for key, values in metadata.items():
                for value in (values,) if isinstance(values, str) else values:
                    envelope.metadata.add(key=key, value=value)
        data = envelope.SerializeToString()
        if len(data) > self._max_message:
            raise ResourceExhausted(
                f"{name}: request of {len(data)} bytes exceeds the maximum of {self._max_message}"
            )
        stream_id = self._take_stream_id(name)
        answer: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = answer
        try:
            async with asyncio.timeout(timeout) as scope:
                await self._send(stream_id, data, name)
                response = await answer
        except TimeoutError:
            if scope.expired():
                raise DeadlineExceeded(f"{name}: no answer within {timeout}s") from None
            raise
        finally:
            del self._pending[stream_id]
        status = response.status
        if status.code != 0:
            raise error_from_status(status.code, status.message)
        try:
            return response_type.FromString(response.payload)
        except DecodeError as exc:
            raise DataLoss(
                f"{name}: cannot decode the answer as {response_type.DESCRIPTOR.full_name}: {exc}"
            ) from exc

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with Unavailable."""
        if self._closed_reason is None:
            self._closed_reason = "closed by the client"
        self._reader_task.cancel()
        # wait() rather than await: the reader's cancellation must not read as ours.
        await asyncio.wait([self._reader_task])
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _take_stream_id(self, name: str) -> int:
        stream_id = self._next_stream_id
        if stream_id > _LAST_STREAM_ID:
            raise Unavailable(f"{name}: stream ids of this connection are used up; reconnect")
        self._next_stream_id += 2
        return stream_id

    async def _send(self, stream_id: int, data: bytes, name: str) -> None:
        async with self._write_lock:
            if self._closed_reason is not None or self._writer.is_closing():
                raise Unavailable(f"{name}: ttrpc connection to {self._address} is closed")
            self._writer.write(encode_frame(stream_id, FrameType.REQUEST, 0, data))
            try:
                await self._writer.drain()
            except ConnectionError as exc:
                raise Unavailable(
                    f"{name}: ttrpc connection to {self._address} lost: {exc}"
                ) from exc

    async def _read_responses(self) -> None:
        reason = "connection closed by the server"
        try:
            while True:
                try:
                    frame = await read_frame(self._reader, self._max_message)
                except FrameTooLarge as exc:
                    self._fail_stream(exc.stream_id, ResourceExhausted(f"answer discarded: {exc}"))
                    continue
                if frame is None:
                    break
                if frame.type != FrameType.RESPONSE:
                    continue
                answer = self._pending.get(frame.stream_id)
                if answer is None or answer.done():
                    continue  # its caller gave up (timeout or cancellation)
                try:
                    answer.set_result(ttrpc_pb2.Response.FromString(frame.data))
                except DecodeError as exc:
                    answer.set_exception(DataLoss(f"undecodable response envelope: {exc}"))
        except (TruncatedFrame, ConnectionError, OSError) as exc:
            reason = str(exc)
        finally:
            self._fail_pending(reason)

    def _fail_stream(self, stream_id: int, error: KybernateError) -> None:
        answer = self._pending.get(stream_id)
        if answer is not None and not answer.done():
            answer.set_exception(error)

    def _fail_pending(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            logger.debug("ttrpc connection to %s ended: %s", self._address, reason)
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(
                    Unavailable(
                        f"ttrpc connection to {self._address} is closed: {self._closed_reason}"
                    )
                )
