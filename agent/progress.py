"""A checkpoint's progress, from its pipeline to its gRPC stream.

`send` returns only once the stream has written the message (the handler resolves it
after its `yield`, which returns when gRPC asks for the next one), so the shim knows of a phase before the agent acts on
the container: if the agent dies right after ADMITTED, the shim has ADMITTED in hand
and kills, instead of believing the container untouched.
"""

from __future__ import annotations

import asyncio

from kybernate.errors import Unavailable
from kybernate.protos import agent_pb2

#: How long a message may take to reach the stream (a shim that stopped reading).
SEND_TIMEOUT_S = 30.0


class ProgressChannel:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[agent_pb2.CheckpointProgress, asyncio.Future[None]]] = asyncio.Queue()
        self._closed = False
        self._in_flight: asyncio.Future[None] | None = None

    async def send(self, message: agent_pb2.CheckpointProgress) -> None:
        """Hand `message` to the stream and wait until it is written."""
        if self._closed:
            raise Unavailable("the shim is no longer listening to this checkpoint")
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((message, delivered))
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives as the message is delivered, and the pipeline would not stop.
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await asyncio.shield(delivered)
        except TimeoutError:
            raise Unavailable(f"the shim did not take the checkpoint's progress within {SEND_TIMEOUT_S:.0f}s") from None

    async def next(self) -> tuple[agent_pb2.CheckpointProgress, asyncio.Future[None]]:
        """The next message for the stream, and the future to resolve once it is written."""
        message, delivered = await self._queue.get()
        self._in_flight = delivered
        return message, delivered

    def close(self) -> None:
        """No more messages go out: waiting and later senders get Unavailable."""
        self._closed = True
        if self._in_flight is not None and not self._in_flight.done():
            self._in_flight.set_exception(Unavailable("the checkpoint's stream closed before the message went out"))
        while not self._queue.empty():
            _, delivered = self._queue.get_nowait()
            if not delivered.done():
                delivered.set_exception(Unavailable("the shim is no longer listening to this checkpoint"))
