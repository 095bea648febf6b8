"""The client of the node agent (kybernate.agent.v1.Agent over a unix socket): the
shim's, and the `kybernate checkpoint` commands'.

grpc is imported on first use only: a shim that never checkpoints, pauses a GPU
container or restores never pays its import time and memory.

Errors come back as kybernate.errors types rebuilt from the gRPC status; a socket
that cannot be reached is Unavailable, naming the socket.

Checkpoint streams one `CheckpointProgress` per phase. When the pipeline fails the
last message has phase FAILED and `container_state` (UNTOUCHED, RESTORED, EXITED
or MUST_KILL: the shim must SIGKILL the container), and then the iterator raises
the error.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from google.protobuf.message import Message
from kybernate.errors import (
    DeadlineExceeded,
    Internal,
    KybernateError,
    StatusCode,
    Unavailable,
    error_from_status,
)

if TYPE_CHECKING:
    from kybernate.protos import agent_pb2

DEFAULT_SOCKET = "/run/kybernate/agent.sock"

R = TypeVar("R", bound=Message)


class AgentClient:
    """One channel to the agent; use as `async with AgentClient(path) as client:`."""

    def __init__(self, socket_path: str | os.PathLike[str] = DEFAULT_SOCKET, *,
                 connect_timeout: float = 3.0) -> None:
        self.socket_path = Path(socket_path)
        self._connect_timeout = connect_timeout
        self._channel: Any = None
        self._stub: Any = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def connect(self) -> None:
        """Reach the agent now (Unavailable, naming the socket, when it cannot be)."""
        await self._connected()

    async def _connected(self) -> Any:
        if self._stub is not None:
            return self._stub
        import asyncio

        if not self.socket_path.exists():
            raise Unavailable(f"kybernate agent socket {self.socket_path} does not exist (is the agent running?)")
        # A plain connect first: a socket file left by a dead agent is refused at once,
        # where gRPC would retry until the connect timeout.
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, writer = await asyncio.open_unix_connection(str(self.socket_path))
            writer.close()
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "connect timed out"
            raise Unavailable(f"kybernate agent at {self.socket_path} is unreachable: {reason}") from None

        import grpc  # only now: the shim pays for grpc only when an agent is there
        from kybernate.protos import agent_pb2_grpc

        channel = grpc.aio.insecure_channel(f"unix:{self.socket_path}")
        try:
            async with asyncio.timeout(self._connect_timeout):
                await channel.channel_ready()
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            await channel.close()
            reason = str(exc) or f"no answer within {self._connect_timeout:g} s"
            raise Unavailable(f"kybernate agent at {self.socket_path} is unreachable: {reason}") from None
        self._channel = channel
        self._stub = agent_pb2_grpc.AgentStub(channel)
        return self._stub

    def _error(self, exc: Any) -> KybernateError:
        code = exc.code()
        number = code.value[0] if code is not None else StatusCode.UNKNOWN
        details = exc.details() or ""
        if number == StatusCode.UNAVAILABLE:
            return Unavailable(f"kybernate agent at {self.socket_path}: {details or 'unavailable'}")
        if number == StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"kybernate agent at {self.socket_path}: {details or 'deadline exceeded'}")
        return error_from_status(number, details)

    async def _unary(self, method: str, request: Message, timeout: float | None, response: type[R]) -> R:
        import grpc

        stub = await self._connected()
        try:
            answer = await getattr(stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        if not isinstance(answer, response):  # the generated stub is untyped: say what came
            raise Internal(f"kybernate agent at {self.socket_path}: {method} answered {type(answer).__name__}")
        return answer

    async def checkpoint(self, request: agent_pb2.CheckpointRequest, *,
                         timeout: float | None = None) -> AsyncIterator[agent_pb2.CheckpointProgress]:
        import grpc

        stub = await self._connected()
        call = stub.Checkpoint(request, timeout=timeout)
        try:
            async for progress in call:
                yield progress
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()  # a caller that stops iterating early must not leave the stream open

    async def prepare_restore(self, request: agent_pb2.PrepareRestoreRequest, *,
                              timeout: float | None = None) -> agent_pb2.PrepareRestoreResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("PrepareRestore", request, timeout, agent_pb2.PrepareRestoreResponse)

    async def await_verification(self, request: agent_pb2.AwaitVerificationRequest, *,
                                 timeout: float | None = None) -> agent_pb2.AwaitVerificationResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("AwaitVerification", request, timeout, agent_pb2.AwaitVerificationResponse)

    async def complete_restore(self, request: agent_pb2.CompleteRestoreRequest, *,
                               timeout: float | None = None) -> agent_pb2.CompleteRestoreResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("CompleteRestore", request, timeout, agent_pb2.CompleteRestoreResponse)

    async def lock_gpu(self, request: agent_pb2.GpuLockRequest, *,
                       timeout: float | None = None) -> agent_pb2.GpuLockResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("LockGpu", request, timeout, agent_pb2.GpuLockResponse)

    async def unlock_gpu(self, request: agent_pb2.GpuLockRequest, *,
                         timeout: float | None = None) -> agent_pb2.GpuLockResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("UnlockGpu", request, timeout, agent_pb2.GpuLockResponse)

    async def list_checkpoints(self, request: agent_pb2.ListCheckpointsRequest, *,
                               timeout: float | None = None) -> agent_pb2.ListCheckpointsResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("ListCheckpoints", request, timeout, agent_pb2.ListCheckpointsResponse)

    async def inspect_checkpoint(self, request: agent_pb2.InspectCheckpointRequest, *,
                                 timeout: float | None = None) -> agent_pb2.InspectCheckpointResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("InspectCheckpoint", request, timeout, agent_pb2.InspectCheckpointResponse)

    async def share_checkpoint(self, request: agent_pb2.ShareCheckpointRequest, *,
                               timeout: float | None = None) -> agent_pb2.ShareCheckpointResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("ShareCheckpoint", request, timeout, agent_pb2.ShareCheckpointResponse)

    async def reserve_checkpoint(self, request: agent_pb2.ReserveCheckpointRequest, *,
                                 timeout: float | None = 30.0) -> agent_pb2.ReserveCheckpointResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("ReserveCheckpoint", request, timeout, agent_pb2.ReserveCheckpointResponse)

    async def status(self, *, timeout: float | None = None, probe_tiers: bool = False) -> agent_pb2.StatusResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("Status", agent_pb2.StatusRequest(probe_tiers=probe_tiers), timeout,
                                 agent_pb2.StatusResponse)

    async def delete_checkpoint(self, request: agent_pb2.DeleteCheckpointRequest, *,
                                timeout: float | None = None) -> agent_pb2.DeleteCheckpointResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("DeleteCheckpoint", request, timeout, agent_pb2.DeleteCheckpointResponse)

    async def collect_garbage(self, request: agent_pb2.CollectGarbageRequest, *,
                              timeout: float | None = None) -> agent_pb2.CollectGarbageResponse:
        from kybernate.protos import agent_pb2

        return await self._unary("CollectGarbage", request, timeout, agent_pb2.CollectGarbageResponse)

    async def transfer(self, method: str, request: Message, *,
                       timeout: float | None = None) -> AsyncIterator[agent_pb2.TransferProgress]:
        """A long operation (PromoteCheckpoint, FetchCheckpoint, ExportCheckpoint,
        ImportCheckpoint, VerifyCheckpoint): its progress, the record last."""
        import grpc

        stub = await self._connected()
        call = getattr(stub, method)(request, timeout=timeout)
        try:
            async for progress in call:
                yield progress
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()
