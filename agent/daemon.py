"""The agent process: start-up recovery, the gRPC server, background jobs, shutdown.

Start-up order matters: the registry is opened and made to agree with the disk
(`recovery`: leftover staging directories committed or removed) before the socket
accepts a single request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

import grpc
import psutil
from kybernate.agent.config import AgentConfig
from kybernate.agent.fetch import Fetcher
from kybernate.agent.gpu import GpuControl
from kybernate.agent.inuse import InUse
from kybernate.agent.lifecycle import Lifecycle
from kybernate.agent.limits import CheckpointLimits
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.metadata import HostVersions
from kybernate.agent.metrics import AgentMetrics
from kybernate.agent.oci_tier import OciTier
from kybernate.agent.pipeline import PipelineDeps
from kybernate.agent.promoter import Promoter
from kybernate.agent.recovery import recover
from kybernate.agent.registry import Registry
from kybernate.agent.remote import RemoteTier
from kybernate.agent.restore import RestorePreparer
from kybernate.agent.server import AgentService
from kybernate.errors import AlreadyExists, FailedPrecondition
from kybernate.protos import agent_pb2_grpc

log = logging.getLogger(__name__)

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
        self._lifecycle: Lifecycle | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        for directory in (config.state_dir, config.work_root, config.failed_root):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.local.prepare()
        await self.registry.open()
        await recover(self.config, self.local, self.registry)

        from kybernate.criu import CriuClient

        criu = CriuClient()
        gpu = await asyncio.to_thread(
            GpuControl, config.cuda_backend, str(config.cuda_fake_dir) if config.cuda_fake_dir else None)
        versions = HostVersions(kernel=os.uname().release, criu=await criu.version(), runc=await _runc_version(),
                                cuda_driver=await gpu.driver_version())
        remote = self._remote = await asyncio.to_thread(RemoteTier, config.s3) if config.s3 else None
        if remote is not None and config.s3 is not None:
            self._promoter = Promoter(remote, self.registry, self.local, config.s3, node=config.node_name,
                                      on_uploaded=self._on_uploaded, on_retry=self.metrics.upload_retried)
            self._promoter.start()  # its first sweep re-queues what was dirty
        budget = config.memory_budget_bytes or psutil.virtual_memory().total
        deps = PipelineDeps(config=config, registry=self.registry, local=self.local, gpu=gpu, criu=criu,
                            versions=versions, limits=CheckpointLimits(budget), metrics=self.metrics,
                            promoter=self._promoter)
        inuse = InUse()
        fetcher = Fetcher(remote, self.local, criu_version=versions.criu) if remote is not None else None
        preparer = RestorePreparer(
            self.registry, self.local, remote, gpu, versions.criu, allowed_roots=config.restore_allowed_roots,
            forbidden_roots=(config.local_tier, config.state_dir), shares=config.restore_shares, fetcher=fetcher,
            lazy_pages=config.restore_lazy_pages)
        self._lifecycle = Lifecycle(config, self.registry, self.local, remote, self._promoter, preparer, inuse,
                                    self.metrics)
        oci = OciTier(config, self.registry, self.local, inuse, self.metrics, criu_version=versions.criu)
        self._service = AgentService(deps, remote, preparer=preparer, lifecycle=self._lifecycle, oci=oci,
                                     inuse=inuse)
        await self._lifecycle.refresh_occupancy()
        self._lifecycle.start()
        if config.metrics_port:
            self.metrics.serve(config.metrics_port, config.metrics_address)
        await self._listen()
        log.info("agent serving on %s (CRIU %s, runc %s, CUDA backend %s, remote %s)", config.socket,
                 versions.criu, versions.runc, gpu.backend_name, remote.url if remote else "none")

    async def _on_uploaded(self, checkpoint_id: str) -> None:
        self.metrics.uploaded()
        self.metrics.dirty_checkpoints.set(await self.registry.dirty_count())

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
        if self._lifecycle is not None:
            await self._lifecycle.stop()
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
