"""The agent process: start-up recovery, the gRPC server, background jobs, shutdown.

Start-up order matters: the registry is opened and leftover staging directories
(checkpoints a previous agent never committed) are marked failed and removed before
the socket accepts a single request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from pathlib import Path

import grpc
import psutil
from kybernate.agent import commit, naming
from kybernate.agent.checkpoint import HostVersions, PipelineDeps
from kybernate.agent.config import AgentConfig
from kybernate.agent.fetch import remove_leftover_fetches
from kybernate.agent.gpu import GpuControl
from kybernate.agent.limits import CheckpointLimits
from kybernate.agent.metrics import AgentMetrics
from kybernate.agent.promoter import Promoter
from kybernate.agent.registry import CheckpointRow, CheckpointState, Registry, Tier
from kybernate.agent.remote import RemoteTier
from kybernate.agent.server import AgentService
from kybernate.agent.storage import LocalTier
from kybernate.errors import AlreadyExists, FailedPrecondition, KybernateError, NotFound
from kybernate.protos import agent_pb2_grpc

log = logging.getLogger(__name__)

LEFTOVER_REASON = "the agent stopped before the checkpoint committed"
#: Logs of failed checkpoints (CRIU's dump.log) kept for the operator, newest first.
FAILED_LOGS_KEPT = 50
#: What the grace period keeps back for cancelled checkpoints to report on their streams.
STREAM_FLUSH_S = 5.0


def _check_socket_directory(directory: Path) -> None:
    """The socket is root's alone (0600): its directory must not let anyone else swap it
    for their own (writable by others, without the sticky bit), nor belong to another."""
    info = directory.stat()
    writable_by_others = info.st_mode & 0o022 and not info.st_mode & 0o1000
    if info.st_uid != os.geteuid() or writable_by_others:
        raise FailedPrecondition(
            f"refusing to listen in {directory}: it is owned by uid {info.st_uid} with mode"
            f" {oct(info.st_mode & 0o7777)}; the agent's socket directory must be its own and not"
            " writable by others")


def _prune_oldest(directory: Path, keep: int) -> None:
    if not directory.is_dir():
        return
    entries = sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


async def _runc_version() -> str:
    try:
        process = await asyncio.create_subprocess_exec(
            "runc", "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except FileNotFoundError:
        return ""
    out, _ = await process.communicate()
    first = out.decode(errors="replace").splitlines()[:1]
    return first[0].removeprefix("runc version ").strip() if first else ""


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Agent:
    """One agent: `start()`, then `wait_closed()` or `stop()`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.registry = Registry(config.registry_path)
        self.local = LocalTier(config.local_tier)
        self.metrics = AgentMetrics()
        self._server: grpc.aio.Server | None = None
        self._service: AgentService | None = None
        self._promoter: Promoter | None = None
        self._remote: RemoteTier | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        for directory in (config.state_dir, config.work_root, config.failed_root):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.local.prepare()
        await self.registry.open()
        await self.recover()

        from kybernate.criu import CriuClient

        criu = CriuClient()
        gpu = await asyncio.to_thread(
            GpuControl, config.cuda_backend, str(config.cuda_fake_dir) if config.cuda_fake_dir else None)
        versions = HostVersions(kernel=os.uname().release, criu=await criu.version(), runc=await _runc_version(),
                                cuda_driver=await gpu.driver_version())
        remote = self._remote = await asyncio.to_thread(RemoteTier, config.s3) if config.s3 else None
        if remote is not None and config.s3 is not None:
            self._promoter = Promoter(remote, self.registry, self.local, config.s3, node=config.node_name,
                                      on_uploaded=self._on_uploaded)
            self._promoter.start()  # its first sweep re-queues what was dirty
        budget = config.memory_budget_bytes or psutil.virtual_memory().total
        deps = PipelineDeps(config=config, registry=self.registry, local=self.local, gpu=gpu, criu=criu,
                            versions=versions, limits=CheckpointLimits(budget), metrics=self.metrics,
                            promoter=self._promoter)
        self._service = AgentService(deps, remote)
        self.metrics.dirty_checkpoints.set(await self.registry.dirty_count())
        if config.metrics_port:
            self.metrics.serve(config.metrics_port)
        await self._listen()
        log.info("agent serving on %s (CRIU %s, runc %s, CUDA backend %s, remote %s)", config.socket,
                 versions.criu, versions.runc, gpu.backend_name, remote.url if remote else "none")

    async def _on_uploaded(self, checkpoint_id: str) -> None:
        self.metrics.uploaded()
        self.metrics.dirty_checkpoints.set(await self.registry.dirty_count())

    async def recover(self) -> None:
        """Make the registry agree with the disk before the first request.

        - A staging directory whose data is complete (its draft says the dump finished,
          on this boot) is committed; any other is a failed checkpoint and goes.
        - A committed directory whose metadata verifies is committed, whatever its row
          says; a row whose local data is gone (and never reached the remote tier) is
          failed; a row still `staging` is failed.
        - A committed directory no row knows (a lost registry) gets its row back.
        - A download that never completed (a `.fetch-` directory) is removed.
        - CRIU work directories of unfinished checkpoints keep their logs with the
          other failures; only the newest `FAILED_LOGS_KEPT` are kept.
        """
        local, registry = self.local, self.registry
        dirty = self.config.s3 is not None
        for leftover in await asyncio.to_thread(remove_leftover_fetches, local):
            log.warning("removed a download that never completed: %s", leftover)
        for checkpoint_id, path in local.leftover_staging():
            document = None
            if naming.is_checkpoint_id(checkpoint_id) and not local.committed(checkpoint_id).exists():
                try:
                    document = await asyncio.to_thread(commit.recover, path, local.committed(checkpoint_id))
                except (KybernateError, OSError) as exc:
                    log.error("checkpoint %s: its complete data could not be committed: %s", checkpoint_id, exc)
            if document is not None:
                log.warning("committed checkpoint %s, left complete in staging by a stopped agent", checkpoint_id)
                await asyncio.to_thread(shutil.rmtree, self.config.work_root / checkpoint_id, True)
                continue  # its row is reconciled below, with the others
            log.warning("removing uncommitted checkpoint %s (%s)", checkpoint_id, path)
            with contextlib.suppress(NotFound):
                await registry.mark_failed(checkpoint_id, LEFTOVER_REASON)
            await asyncio.to_thread(shutil.rmtree, path, True)

        rows = {row.id: row for row in await registry.all()}
        for row in rows.values():
            if local.has(row.id):
                if row.state is not CheckpointState.COMMITTED:
                    await self._reconcile_committed(row.id, dirty=dirty)
            elif row.state is CheckpointState.STAGING:
                await registry.mark_failed(row.id, LEFTOVER_REASON)
            elif row.state is CheckpointState.COMMITTED and row.tier is Tier.LOCAL:
                log.error("checkpoint %s (%s): its data is missing from %s", row.id, row.qualified_name, local.root)
                await registry.mark_failed(row.id, f"its data is missing from the local tier {local.root}")
        for checkpoint_id in local.committed_ids():
            if checkpoint_id not in rows:
                await self._reconcile_committed(checkpoint_id, dirty=dirty)

        if self.config.work_root.is_dir():
            for work in self.config.work_root.iterdir():
                target = self.config.failed_root / work.name
                if target.exists():
                    await asyncio.to_thread(shutil.rmtree, work, True)
                else:
                    await asyncio.to_thread(shutil.move, str(work), str(target))
        await asyncio.to_thread(_prune_oldest, self.config.failed_root, FAILED_LOGS_KEPT)

    async def _reconcile_committed(self, checkpoint_id: str, *, dirty: bool) -> None:
        """A committed directory the registry does not show as committed: verify it,
        then record it (or leave the row as it is, if it does not verify)."""
        try:
            metadata = await asyncio.to_thread(commit.verify, self.local.committed(checkpoint_id))
            row = CheckpointRow.from_metadata(metadata, tier=Tier.LOCAL, dirty=dirty)
        except KybernateError as exc:
            log.error("checkpoint %s in %s does not verify, leaving it alone: %s", checkpoint_id,
                      self.local.root, exc)
            return
        if row.id != checkpoint_id:
            log.error("checkpoint directory %s holds checkpoint %s; leaving it alone", checkpoint_id, row.id)
            return
        try:
            await self.registry.mark_committed(checkpoint_id, size_bytes=row.size_bytes, file_count=row.file_count,
                                               checksums=row.checksums, dirty=dirty)
        except NotFound:
            row = await self.registry.add_committed(row)
        log.warning("registry: checkpoint %s (%s) is committed on disk; recorded so", checkpoint_id,
                    row.qualified_name)

    async def _listen(self) -> None:
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_socket_directory(path.parent)
        if path.exists() or path.is_symlink():
            if _socket_in_use(path):
                raise AlreadyExists(f"another agent is already serving on {path}")
            path.unlink()
        assert self._service is not None
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
        agent_pb2_grpc.add_AgentServicer_to_server(self._service, server)
        # The socket is created by grpc's own threads: a restrictive umask keeps it
        # root-only from the first moment, not just after the chmod.
        previous = os.umask(0o077)
        try:
            if server.add_insecure_port(f"unix:{path}") == 0:
                raise FailedPrecondition(f"cannot listen on {path}")
            await server.start()
        finally:
            os.umask(previous)
        os.chmod(path, 0o600)
        self._server = server

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace_s: float = 60.0) -> None:
        """Refuse new calls; give those in flight `grace_s` to finish, then cancel them.

        Checkpoints are cancelled before their streams close, so that each one's
        recovery (the container back as it was, or killed by its shim; complete data
        committed) reaches its shim.
        """
        owned_socket = self._server is not None
        stopping = asyncio.create_task(self._server.stop(grace_s)) if self._server is not None else None
        if self._service is not None:
            await self._service.close(grace_s=max(0.0, grace_s - STREAM_FLUSH_S))
        if stopping is not None:
            await stopping
            self._server = None
        if self._promoter is not None:
            await self._promoter.stop()
        if self._remote is not None:  # cancels transfers still running in threads
            await asyncio.to_thread(self._remote.close)
        await self.registry.close()
        self.metrics.close()
        if owned_socket:  # never remove another agent's socket
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()
        self._stopped.set()


async def serve(config: AgentConfig) -> None:
    """Run an agent until SIGTERM or SIGINT."""
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await agent.start()
        await stop_requested.wait()
        log.info("agent stopping")
    finally:
        await agent.stop()
