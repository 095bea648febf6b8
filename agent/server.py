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
from kybernate.agent import commit, naming
from kybernate.agent.access import Party, Share, configured_shares
from kybernate.agent.pipeline import CheckpointPipeline, PipelineDeps
from kybernate.agent.plan import plan_checkpoint
from kybernate.agent.progress import ProgressChannel
from kybernate.agent.registry import CheckpointRow, CheckpointState
from kybernate.agent.remote import RemoteTier
from kybernate.agent.restore import RestorePreparer, complete_restore, metadata_json
from kybernate.errors import FailedPrecondition, InvalidArgument, KybernateError
from kybernate.protos import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

_GRPC_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def grpc_code(code: int) -> grpc.StatusCode:
    return _GRPC_CODES.get(int(code), grpc.StatusCode.UNKNOWN)


def status_from_errors(handler: Callable[[Any, Req], Awaitable[Resp]]) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Map errors of a unary handler to gRPC statuses."""

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
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
        config = deps.config
        self._preparer = RestorePreparer(
            deps.registry, deps.local, remote, deps.gpu, deps.versions.criu,
            allowed_roots=config.restore_allowed_roots, forbidden_roots=(config.local_tier, config.state_dir),
            shares=config.restore_shares)
        self._pipelines: set[asyncio.Task[None]] = set()

    async def close(self, grace_s: float = 0.0) -> None:
        """Give the pipelines in flight `grace_s` to finish, then cancel them: each one
        brings its container back (or says it must be killed) and commits complete
        data, on its still-open stream."""
        if self._pipelines and grace_s > 0:
            await asyncio.wait(list(self._pipelines), timeout=grace_s)
        for task in list(self._pipelines):
            task.cancel()
        await asyncio.gather(*self._pipelines, return_exceptions=True)

    async def Checkpoint(self, request: agent_pb2.CheckpointRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[agent_pb2.CheckpointProgress]:
        try:
            plan = await asyncio.to_thread(plan_checkpoint, request, self._deps.config, self._deps.local)
        except KybernateError as exc:
            await context.abort(grpc_code(exc.code), str(exc))
        except Exception as exc:
            log.exception("checkpoint request validation failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"checkpoint: {type(exc).__name__}: {exc}")
        progress = ProgressChannel()
        task = asyncio.create_task(CheckpointPipeline(self._deps, plan, progress.send).run(),
                                   name=f"checkpoint-{plan.checkpoint_id}")
        self._pipelines.add(task)
        task.add_done_callback(self._pipelines.discard)
        finished = False
        try:
            while not finished:
                message, delivered = await progress.next()
                yield message
                delivered.set_result(None)
                finished = message.phase in (agent_pb2.FAILED, agent_pb2.COMMITTED)
            if message.phase == agent_pb2.FAILED:
                await context.abort(grpc_code(message.error_code), message.error_message)
        finally:
            progress.close()
            if not finished and not task.done():
                # The shim went away (it is killing the container, or it died): stop,
                # with the same recovery as a failure.
                log.warning("checkpoint %s: the shim left the stream; cancelling it", plan.checkpoint_id)
                task.cancel()

    @status_from_errors
    async def PrepareRestore(self, request: agent_pb2.PrepareRestoreRequest) -> agent_pb2.PrepareRestoreResponse:
        source = request.WhichOneof("source")
        try:
            if source == "directory":
                prepared = await self._preparer.from_containerd(Path(request.directory))
            elif source == "host_directory":
                prepared = await self._preparer.from_host_directory(Path(request.host_directory))
            elif source == "checkpoint":
                prepared = await self._preparer.from_registry(request.checkpoint, _requester(request))
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
        return agent_pb2.ListCheckpointsResponse(checkpoints=[await self._record(row) for row in rows])

    @status_from_errors
    async def InspectCheckpoint(self, request: agent_pb2.InspectCheckpointRequest) -> agent_pb2.InspectCheckpointResponse:
        row = await self._deps.registry.lookup(request.checkpoint)
        document = ""
        if self._deps.local.has(row.id):
            metadata = await asyncio.to_thread(commit.read_metadata, self._deps.local.committed(row.id))
            document = metadata_json(metadata)
        return agent_pb2.InspectCheckpointResponse(record=await self._record(row), metadata_json=document)

    @status_from_errors
    async def ShareCheckpoint(self, request: agent_pb2.ShareCheckpointRequest) -> agent_pb2.ShareCheckpointResponse:
        row = await self._deps.registry.lookup(request.checkpoint)
        share = Share(request.namespace, request.pod_namespace)
        if request.revoke:
            await self._deps.registry.revoke(row.id, share)
            log.info("checkpoint %s (%s) no longer shared with %s", row.id, row.qualified_name, share)
        else:
            if row.state is CheckpointState.FAILED:
                raise FailedPrecondition(f"checkpoint {row.qualified_name} ({row.id}) failed; nothing to share")
            await self._deps.registry.share(row.id, share)
            log.info("checkpoint %s (%s) shared with %s", row.id, row.qualified_name, share)
        return agent_pb2.ShareCheckpointResponse(record=await self._record(row))

    @status_from_errors
    async def Status(self, request: agent_pb2.StatusRequest) -> agent_pb2.StatusResponse:
        return agent_pb2.StatusResponse(
            version=kybernate.__version__, cuda_backend=self._deps.gpu.backend_name,
            local_tier=str(self._deps.local.root), remote_tier=self._remote.url if self._remote else "",
            dirty_count=await self._deps.registry.dirty_count(),
            checkpoints_in_flight=self._deps.limits.in_flight, criu_version=self._deps.versions.criu)

    async def _record(self, row: CheckpointRow) -> agent_pb2.CheckpointRecord:
        shares = [*await self._deps.registry.shares(row.id),
                  *configured_shares(self._deps.config.restore_shares, row.id, row.qualified_name)]
        return agent_pb2.CheckpointRecord(
            id=row.id, name=row.name, state=row.state.value, tier=row.tier.value, dirty=row.dirty,
            size_bytes=row.size_bytes, file_count=row.file_count, container_id=row.container_id,
            namespace=row.namespace, pod_namespace=row.pod_namespace, image=row.image,
            created_at=row.created_at.isoformat(), error=row.error,
            local_path=str(self._deps.local.committed(row.id)) if self._deps.local.has(row.id) else "",
            shared_with=sorted({str(share) for share in shares}))


def _requester(request: agent_pb2.PrepareRestoreRequest) -> Party:
    if not request.namespace:
        raise InvalidArgument("restore of a registry checkpoint: the restoring container's namespace is required")
    naming.containerd_namespace(request.namespace)
    if request.pod_namespace:
        naming.kubernetes_namespace(request.pod_namespace)
    return Party(request.namespace, request.pod_namespace)

