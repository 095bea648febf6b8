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
from kybernate.agent.checkpoint import HostVersions, PipelineDeps
from kybernate.agent.config import AgentConfig
from kybernate.agent.gpu import GpuControl
from kybernate.agent.limits import CheckpointLimits
from kybernate.agent.metrics import AgentMetrics
from kybernate.agent.promoter import Promoter
from kybernate.agent.registry import CheckpointState, Registry
from kybernate.agent.remote import RemoteTier
from kybernate.agent.server import AgentService
from kybernate.agent.storage import LocalTier
from kybernate.errors import AlreadyExists, FailedPrecondition, NotFound
from kybernate.protos import agent_pb2_grpc

log = logging.getLogger(__name__)

LEFTOVER_REASON = "the agent stopped before the checkpoint committed"


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
        versions = HostVersions(kernel=os.uname().release, criu=await criu.version(), runc=await _runc_version())
        gpu = await asyncio.to_thread(
            GpuControl, config.cuda_backend, str(config.cuda_fake_dir) if config.cuda_fake_dir else None)
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
        """Leftovers of a previous agent: staging dirs are failed checkpoints; so are
        registry rows still `staging` (their directory may be gone already)."""
        for checkpoint_id, path in self.local.leftover_staging():
            log.warning("removing uncommitted checkpoint %s (%s)", checkpoint_id, path)
            with contextlib.suppress(NotFound):
                await self.registry.mark_failed(checkpoint_id, LEFTOVER_REASON)
            await asyncio.to_thread(shutil.rmtree, path, True)
        for row in await self.registry.all(CheckpointState.STAGING):
            await self.registry.mark_failed(row.id, LEFTOVER_REASON)
        # CRIU work dirs of those checkpoints: keep their logs with the other failures.
        if self.config.work_root.is_dir():
            for work in self.config.work_root.iterdir():
                target = self.config.failed_root / work.name
                if target.exists():
                    await asyncio.to_thread(shutil.rmtree, work, True)
                else:
                    await asyncio.to_thread(shutil.move, str(work), str(target))

    async def _listen(self) -> None:
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        """Refuse new calls; give those in flight `grace_s` to finish, then cancel them."""
        owned_socket = self._server is not None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._service is not None:
            await self._service.close()
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
