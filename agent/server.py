"""The gRPC face of the agent: kybernate.agent.v1.Agent on a root-only unix socket.

Handlers translate between protobuf and the agent's modules; a KybernateError
leaves as its own status code, anything else as Internal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import kybernate
from kybernate.agent import commit
from kybernate.agent.checkpoint import CheckpointPipeline, PipelineDeps, plan_checkpoint
from kybernate.agent.registry import CheckpointRow, CheckpointState
from kybernate.agent.remote import RemoteTier
from kybernate.agent.restore import RestorePreparer, complete_restore, metadata_json
from kybernate.errors import InvalidArgument, KybernateError
from kybernate.protos import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

_GRPC_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def grpc_code(code: int) -> grpc.StatusCode:
    return _GRPC_CODES.get(int(code), grpc.StatusCode.UNKNOWN)


def status_from_errors(handler: Callable[[Any, Req], Awaitable[Resp]]) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Map errors of a unary handler to gRPC statuses."""

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await handler(self, request)
        except KybernateError as exc:
            await context.abort(grpc_code(exc.code), str(exc))
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{handler.__name__}: {type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: abort raises")

    return wrapped


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, deps: PipelineDeps, remote: RemoteTier | None) -> None:
        self._deps = deps
        self._remote = remote
        self._preparer = RestorePreparer(deps.registry, deps.local, remote, deps.gpu, deps.versions.criu)
        # Pipelines outlive a broken stream: they finish (or fail and clean up) regardless.
        self._pipelines: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._pipelines):
            task.cancel()
        await asyncio.gather(*self._pipelines, return_exceptions=True)

    async def Checkpoint(self, request: agent_pb2.CheckpointRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[agent_pb2.CheckpointProgress]:
        try:
            plan = await asyncio.to_thread(plan_checkpoint, request, self._deps.config, self._deps.local)
        except KybernateError as exc:
            await context.abort(grpc_code(exc.code), str(exc))
        except Exception as exc:
            log.exception("checkpoint request validation failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"checkpoint: {type(exc).__name__}: {exc}")
        progress: asyncio.Queue[agent_pb2.CheckpointProgress] = asyncio.Queue()
        task = asyncio.create_task(CheckpointPipeline(self._deps, plan, progress.put).run(),
                                   name=f"checkpoint-{plan.checkpoint_id}")
        self._pipelines.add(task)
        task.add_done_callback(self._pipelines.discard)
        while True:
            message = await progress.get()
            yield message
            if message.phase == agent_pb2.FAILED:
                await context.abort(grpc_code(message.error_code), message.error_message)
            if message.phase == agent_pb2.COMMITTED:
                return

    @status_from_errors
    async def PrepareRestore(self, request: agent_pb2.PrepareRestoreRequest) -> agent_pb2.PrepareRestoreResponse:
        source = request.WhichOneof("source")
        try:
            if source == "directory":
                prepared = await self._preparer.from_directory(Path(request.directory))
            elif source == "checkpoint":
                prepared = await self._preparer.from_registry(request.checkpoint)
            else:
                raise InvalidArgument("restore: name a checkpoint directory or a registry checkpoint")
        except KybernateError:
            self._deps.metrics.restore_step("prepare", "failed")
            raise
        self._deps.metrics.restore_step("prepare", "ok")
        return agent_pb2.PrepareRestoreResponse(
            image_dir=str(prepared.image_dir), metadata_json=metadata_json(prepared.metadata),
            gpu_map=prepared.gpu_map, checkpoint_id=prepared.checkpoint_id)

    @status_from_errors
    async def CompleteRestore(self, request: agent_pb2.CompleteRestoreRequest) -> agent_pb2.CompleteRestoreResponse:
        try:
            pids = await complete_restore(self._deps.gpu, int(request.init_pid), dict(request.gpu_map))
        except KybernateError:
            self._deps.metrics.restore_step("complete", "failed")
            raise
        self._deps.metrics.restore_step("complete", "ok")
        return agent_pb2.CompleteRestoreResponse(cuda_pids=pids)

    @status_from_errors
    async def LockGpu(self, request: agent_pb2.GpuLockRequest) -> agent_pb2.GpuLockResponse:
        pids = await self._container_cuda_pids(request)
        await self._deps.gpu.lock(pids, request.timeout_ms or self._deps.config.gpu_lock_timeout_ms)
        return agent_pb2.GpuLockResponse(cuda_pids=pids)

    @status_from_errors
    async def UnlockGpu(self, request: agent_pb2.GpuLockRequest) -> agent_pb2.GpuLockResponse:
        pids = await self._container_cuda_pids(request)
        await self._deps.gpu.unlock(pids)
        return agent_pb2.GpuLockResponse(cuda_pids=pids)

    async def _container_cuda_pids(self, request: agent_pb2.GpuLockRequest) -> list[int]:
        if request.init_pid <= 0:
            raise InvalidArgument(f"container {request.container_id}: init_pid is required")
        return await self._deps.gpu.container_cuda_pids(int(request.init_pid))

    @status_from_errors
    async def ListCheckpoints(self, request: agent_pb2.ListCheckpointsRequest) -> agent_pb2.ListCheckpointsResponse:
        try:
            state = CheckpointState(request.state) if request.state else None
        except ValueError:
            raise InvalidArgument(f"unknown checkpoint state {request.state!r}") from None
        rows = await self._deps.registry.all(state)
        return agent_pb2.ListCheckpointsResponse(checkpoints=[self._record(row) for row in rows])

    @status_from_errors
    async def InspectCheckpoint(self, request: agent_pb2.InspectCheckpointRequest) -> agent_pb2.InspectCheckpointResponse:
        row = await self._deps.registry.get(request.checkpoint)
        document = ""
        if self._deps.local.has(row.id):
            metadata = await asyncio.to_thread(commit.read_metadata, self._deps.local.committed(row.id))
            document = metadata_json(metadata)
        return agent_pb2.InspectCheckpointResponse(record=self._record(row), metadata_json=document)

    @status_from_errors
    async def Status(self, request: agent_pb2.StatusRequest) -> agent_pb2.StatusResponse:
        return agent_pb2.StatusResponse(
            version=kybernate.__version__, cuda_backend=self._deps.gpu.backend_name,
            local_tier=str(self._deps.local.root), remote_tier=self._remote.url if self._remote else "",
            dirty_count=await self._deps.registry.dirty_count(),
            checkpoints_in_flight=self._deps.limits.in_flight, criu_version=self._deps.versions.criu)

    def _record(self, row: CheckpointRow) -> agent_pb2.CheckpointRecord:
        return agent_pb2.CheckpointRecord(
            id=row.id, name=row.name, state=row.state.value, tier=row.tier.value, dirty=row.dirty,
            size_bytes=row.size_bytes, file_count=row.file_count, container_id=row.container_id,
            namespace=row.namespace, image=row.image, created_at=row.created_at.isoformat(),
            error=row.error,
            local_path=str(self._deps.local.committed(row.id)) if self._deps.local.has(row.id) else "")

