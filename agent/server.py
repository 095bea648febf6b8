"""The gRPC face of the agent: kybernate.agent.v1.Agent on a root-only unix socket.

Handlers translate between protobuf and the agent's modules; a KybernateError
leaves as its own status code, anything else as Internal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import kybernate
from kybernate.agent import commit, naming
from kybernate.agent.access import Party, Share, configured_shares
from kybernate.agent.inuse import InUse
from kybernate.agent.lifecycle import Lifecycle
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.oci_tier import OCI_SCHEME, OciTier
from kybernate.agent.pipeline import CheckpointPipeline, PipelineDeps
from kybernate.agent.plan import plan_checkpoint
from kybernate.agent.progress import ProgressChannel
from kybernate.agent.registry import CheckpointRow, CheckpointState
from kybernate.agent.remote import RemoteTier
from kybernate.agent.reservations import Reservations
from kybernate.agent.restore import RestorePreparer, complete_restore, metadata_json
from kybernate.agent.transfer import Snapshot, TransferMeter
from kybernate.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KybernateError,
    NotFound,
)
from kybernate.protos import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

#: How often a long operation's stream reports progress.
PROGRESS_INTERVAL_S = 0.25

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
    def __init__(self, deps: PipelineDeps, remote: RemoteTier | None, *, preparer: RestorePreparer,
                 lifecycle: Lifecycle, oci: OciTier, inuse: InUse) -> None:
        self._deps = deps
        self._remote = remote
        self._preparer = preparer
        self._lifecycle = lifecycle
        self._oci = oci
        self._inuse = inuse
        self._pipelines: set[asyncio.Task[None]] = set()
        self._reservations = Reservations()

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
        claimed = "" if request.name else self._reservations.take(request.namespace, request.container_id)
        if claimed:
            # A client claimed this checkpoint (kybernate checkpoint create): its name,
            # and the registry only; containerd's directory stays empty.
            log.info("checkpoint of %s/%s: claimed as %r", request.namespace, request.container_id, claimed)
            request.name = claimed
            request.destination = ""
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
                # Decided before the yield: a client that leaves once it has its last
                # message must not cancel a pipeline that goes on (the commit).
                finished = message.phase in (agent_pb2.FAILED, agent_pb2.COMMITTED) or (
                    message.phase == agent_pb2.EXPORTED and request.return_after_export)
                yield message
                delivered.set_result(None)
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
        user = _restore_user(request)
        holder = (self._inuse, user, self._deps.config.restore_hold_s)
        try:
            lazy = self._preparer.lazy(request.lazy_pages if request.HasField("lazy_pages") else None)
            # A lazy-pages daemon serves pages straight from the images: nothing deferred.
            defer = request.defer_pages and not lazy
            if source == "directory":
                prepared = await self._preparer.from_containerd(
                    Path(request.directory), _requester(request) if request.namespace else None,
                    defer_pages=defer, holder=holder)
            elif source == "host_directory":
                prepared = await self._preparer.from_host_directory(Path(request.host_directory),
                                                                    defer_pages=defer)
            elif source == "checkpoint" and request.checkpoint.startswith(OCI_SCHEME):
                requester = _requester(request)
                imported = await self._oci.import_image(request.checkpoint[len(OCI_SCHEME):], requester, "",
                                                        TransferMeter())
                self._inuse.hold(imported.row.id, user, self._deps.config.restore_hold_s)
                prepared = await self._preparer.from_registry(imported.row.id, requester, holder=holder,
                                                              defer_pages=defer)
            elif source == "checkpoint":
                prepared = await self._preparer.from_registry(request.checkpoint, _requester(request), holder=holder,
                                                              defer_pages=defer)
            else:
                raise InvalidArgument("restore: name a checkpoint directory or a registry checkpoint")
        except KybernateError:
            self._inuse.release(user)
            self._deps.metrics.restore_step("prepare", "failed")
            raise
        except BaseException:
            self._inuse.release(user)
            raise
        self._deps.metrics.restore_step("prepare", "ok")
        return agent_pb2.PrepareRestoreResponse(
            image_dir=str(prepared.image_dir), metadata_json=metadata_json(prepared.metadata),
            gpu_map=prepared.gpu_map, checkpoint_id=prepared.checkpoint_id,
            verification_id=prepared.verification_id, deferred_files=prepared.deferred_files,
            lazy_pages=lazy)

    @status_from_errors
    async def AwaitVerification(self, request: agent_pb2.AwaitVerificationRequest
                                ) -> agent_pb2.AwaitVerificationResponse:
        try:
            await self._preparer.verifications.wait(request.verification_id)
        except KybernateError:
            self._deps.metrics.restore_step("verify", "failed")
            raise
        self._deps.metrics.restore_step("verify", "ok")
        return agent_pb2.AwaitVerificationResponse()

    @status_from_errors
    async def CompleteRestore(self, request: agent_pb2.CompleteRestoreRequest) -> agent_pb2.CompleteRestoreResponse:
        try:
            pids = await complete_restore(self._deps.gpu, int(request.init_pid), dict(request.gpu_map))
        except KybernateError:
            self._inuse.release(_restore_user(request))
            self._deps.metrics.restore_step("complete", "failed")
            raise
        self._inuse.release(_restore_user(request))
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
    async def ReserveCheckpoint(self, request: agent_pb2.ReserveCheckpointRequest) -> agent_pb2.ReserveCheckpointResponse:
        if request.release:
            self._reservations.release(request.namespace, request.container_id, request.name)
            return agent_pb2.ReserveCheckpointResponse()
        # A live checkpoint of that name would make the claimed one fail after its dump.
        try:
            existing = await self._deps.registry.find(naming.containerd_namespace(request.namespace),
                                                      naming.checkpoint_name(request.name))
        except NotFound:
            existing = None
        if existing is not None and existing.state is not CheckpointState.FAILED:
            raise AlreadyExists(f"namespace {request.namespace!r} has a checkpoint named {request.name!r}"
                                f" already ({existing.id})")
        self._reservations.reserve(request.namespace, request.container_id, request.name,
                                   request.ttl_ms / 1000)
        return agent_pb2.ReserveCheckpointResponse()

    @status_from_errors
    async def Status(self, request: agent_pb2.StatusRequest) -> agent_pb2.StatusResponse:
        response = agent_pb2.StatusResponse(
            version=kybernate.__version__, cuda_backend=self._deps.gpu.backend_name,
            local_tier=str(self._deps.local.root), remote_tier=self._remote.url if self._remote else "",
            dirty_count=await self._deps.registry.dirty_count(),
            checkpoints_in_flight=self._deps.limits.in_flight, criu_version=self._deps.versions.criu,
            runc_version=self._deps.versions.runc)
        if request.probe_tiers:
            free, error = await asyncio.to_thread(probe_local_tier, self._deps.local)
            response.local_tier_free_bytes, response.local_tier_error = free, error
            if self._remote is not None:
                try:
                    await asyncio.to_thread(self._remote.check_reachable)
                except KybernateError as exc:
                    response.remote_tier_error = str(exc)
        return response

    # -- the lifecycle --------------------------------------------------------------

    @status_from_errors
    async def DeleteCheckpoint(self, request: agent_pb2.DeleteCheckpointRequest) -> agent_pb2.DeleteCheckpointResponse:
        removal = await self._lifecycle.remove(request.checkpoint, remote=request.remote)
        return agent_pb2.DeleteCheckpointResponse(
            record=self._plain_record(removal.row), removed_local=removal.removed_local,
            removed_remote=removal.removed_remote)

    @status_from_errors
    async def CollectGarbage(self, request: agent_pb2.CollectGarbageRequest) -> agent_pb2.CollectGarbageResponse:
        result = await self._lifecycle.collect(dry_run=request.dry_run)
        return agent_pb2.CollectGarbageResponse(
            collected=[agent_pb2.CollectedCheckpoint(record=self._plain_record(row), scope=decision.scope.value,
                                                     reason=decision.reason)
                       for row, decision in result.collected],
            freed_local_bytes=result.freed_local_bytes, freed_remote_bytes=result.freed_remote_bytes,
            kept=result.kept)

    async def PromoteCheckpoint(self, request: agent_pb2.PromoteCheckpointRequest,
                                context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[agent_pb2.TransferProgress]:
        meter = TransferMeter()
        async for message in self._transfer(context, meter, self._promoted(request.checkpoint, meter)):
            yield message

    async def _promoted(self, checkpoint: str, meter: TransferMeter) -> tuple[CheckpointRow, str]:
        return await self._lifecycle.promote(checkpoint, meter), ""

    async def FetchCheckpoint(self, request: agent_pb2.FetchCheckpointRequest,
                              context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[agent_pb2.TransferProgress]:
        meter = TransferMeter()

        async def fetched() -> tuple[CheckpointRow, str]:
            requester = _party(request.namespace, request.pod_namespace, "fetch")
            return await self._lifecycle.fetch(request.checkpoint, requester, meter), ""

        async for message in self._transfer(context, meter, fetched()):
            yield message

    async def ExportCheckpoint(self, request: agent_pb2.ExportCheckpointRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[agent_pb2.TransferProgress]:
        meter = TransferMeter()
        async for message in self._transfer(context, meter,
                                            self._oci.export(request.checkpoint, request.reference, meter)):
            yield message

    async def ImportCheckpoint(self, request: agent_pb2.ImportCheckpointRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[agent_pb2.TransferProgress]:
        meter = TransferMeter()

        async def imported() -> tuple[CheckpointRow, str]:
            owner = _party(request.namespace, request.pod_namespace, "import")
            result = await self._oci.import_image(request.reference, owner, request.name, meter)
            await self._lifecycle.refresh_occupancy()
            return result.row, result.digest

        async for message in self._transfer(context, meter, imported()):
            yield message

    async def VerifyCheckpoint(self, request: agent_pb2.VerifyCheckpointRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[agent_pb2.TransferProgress]:
        meter = TransferMeter()

        async def verified() -> tuple[CheckpointRow, str]:
            return await self._lifecycle.verify(request.checkpoint, meter), ""

        async for message in self._transfer(context, meter, verified()):
            yield message

    async def _transfer(self, context: grpc.aio.ServicerContext[Any, Any], meter: TransferMeter,
                        work: Coroutine[Any, Any, tuple[CheckpointRow, str]]
                        ) -> AsyncIterator[agent_pb2.TransferProgress]:
        """Run `work`, streaming the meter's progress while it runs, then its record.
        A client that leaves does not stop it (an upload or download half done is
        worth finishing; the next one would start over)."""
        task = asyncio.ensure_future(work)
        last: Snapshot | None = None
        while not task.done():
            await asyncio.wait([task], timeout=PROGRESS_INTERVAL_S)
            snapshot = meter.snapshot()
            if snapshot != last and not task.done():
                last = snapshot
                yield agent_pb2.TransferProgress(step=snapshot.step, done_bytes=snapshot.done_bytes,
                                                 total_bytes=snapshot.total_bytes)
        try:
            row, digest = task.result()
        except KybernateError as exc:
            await context.abort(grpc_code(exc.code), str(exc))
        except Exception as exc:
            log.exception("transfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        snapshot = meter.snapshot()
        if snapshot != last and snapshot.step:  # where it ended, however quickly
            yield agent_pb2.TransferProgress(step=snapshot.step, done_bytes=snapshot.done_bytes,
                                             total_bytes=snapshot.total_bytes)
        yield agent_pb2.TransferProgress(step="done", done_bytes=snapshot.done_bytes,
                                         total_bytes=snapshot.total_bytes, record=await self._record(row),
                                         digest=digest)

    def _plain_record(self, row: CheckpointRow) -> agent_pb2.CheckpointRecord:
        """The record of a row that may be gone from the registry (no shares read)."""
        return agent_pb2.CheckpointRecord(
            id=row.id, name=row.name, state=row.state.value, tier=row.tier.value, dirty=row.dirty,
            size_bytes=row.size_bytes, file_count=row.file_count, container_id=row.container_id,
            namespace=row.namespace, pod_namespace=row.pod_namespace, image=row.image,
            created_at=row.created_at.isoformat(), error=row.error,
            local_path=str(self._deps.local.committed(row.id)) if self._deps.local.has(row.id) else "")

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


def _restore_user(request: agent_pb2.PrepareRestoreRequest | agent_pb2.CompleteRestoreRequest) -> str:
    """Who holds a checkpoint during a restore: the restoring container (a client that
    names none gets a hold of its own, which only its timeout ends)."""
    return f"restore of container {request.container_id or uuid.uuid4().hex}"


def _party(namespace: str, pod_namespace: str, what: str) -> Party:
    if not namespace:
        raise InvalidArgument(f"{what}: the namespace is required")
    naming.containerd_namespace(namespace)
    if pod_namespace:
        naming.kubernetes_namespace(pod_namespace)
    return Party(namespace, pod_namespace)


def probe_local_tier(local: LocalTier) -> tuple[int, str]:
    """(free bytes, "" or why the local tier cannot take a checkpoint): a file is
    written, synced and removed, as a commit would."""
    try:
        local.prepare()
        probe = local.root / f".probe-{os.getpid()}"
        with probe.open("wb") as f:
            f.write(b"kybernate")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        return local.free_bytes(), ""
    except OSError as exc:
        return 0, f"{local.root}: {exc.strerror or exc}"


def _requester(request: agent_pb2.PrepareRestoreRequest) -> Party:
    if not request.namespace:
        raise InvalidArgument("restore of a registry checkpoint: the restoring container's namespace is required")
    naming.containerd_namespace(request.namespace)
    if request.pod_namespace:
        naming.kubernetes_namespace(request.pod_namespace)
    return Party(request.namespace, request.pod_namespace)

