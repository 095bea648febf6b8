"""The shim's agent client: lazy grpc, status codes mapped both ways, clear Unavailable."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from kybernate.agent.server import grpc_code, status_from_errors
from kybernate.api.client import AgentClient
from kybernate.errors import DataLoss, DeadlineExceeded, Internal, NotFound, Unavailable
from kybernate.protos import agent_pb2, agent_pb2_grpc


def test_importing_the_client_does_not_import_grpc() -> None:
    code = "import sys, kybernate.api.client; sys.exit('grpc' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_grpc_code_mapping() -> None:
    assert grpc_code(DataLoss.code) is grpc.StatusCode.DATA_LOSS
    assert grpc_code(NotFound.code) is grpc.StatusCode.NOT_FOUND
    assert grpc_code(999) is grpc.StatusCode.UNKNOWN


class _Service(agent_pb2_grpc.AgentServicer):
    @status_from_errors
    async def PrepareRestore(self, request: agent_pb2.PrepareRestoreRequest) -> agent_pb2.PrepareRestoreResponse:
        raise DataLoss(f"checkpoint {request.directory}: file pages-1.img failed its sha256 check")

    @status_from_errors
    async def LockGpu(self, request: agent_pb2.GpuLockRequest) -> agent_pb2.GpuLockResponse:
        raise ValueError("a bug")

    @status_from_errors
    async def UnlockGpu(self, request: agent_pb2.GpuLockRequest) -> agent_pb2.GpuLockResponse:
        await asyncio.sleep(2)
        return agent_pb2.GpuLockResponse()

    async def Checkpoint(self, request, context):  # type: ignore[no-untyped-def]
        yield agent_pb2.CheckpointProgress(phase=agent_pb2.ACCEPTED, checkpoint_id="c1")
        yield agent_pb2.CheckpointProgress(phase=agent_pb2.FAILED, container_state=agent_pb2.MUST_KILL)
        await context.abort(grpc.StatusCode.NOT_FOUND, "pid 42 vanished")


def test_errors_travel_as_kybernate_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"

    async def scenario() -> None:
        server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServicer_to_server(_Service(), server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        try:
            async with AgentClient(path) as client:
                with pytest.raises(DataLoss, match="pages-1.img"):
                    await client.prepare_restore(agent_pb2.PrepareRestoreRequest(directory="/x"))
                with pytest.raises(Internal, match="ValueError: a bug"):
                    await client.lock_gpu(agent_pb2.GpuLockRequest(init_pid=1))
                with pytest.raises(DeadlineExceeded, match=str(path)):
                    await client.unlock_gpu(agent_pb2.GpuLockRequest(init_pid=1), timeout=0.2)
                seen = []
                with pytest.raises(NotFound, match="pid 42 vanished"):
                    async for progress in client.checkpoint(agent_pb2.CheckpointRequest()):
                        seen.append(progress)
                assert [p.phase for p in seen] == [agent_pb2.ACCEPTED, agent_pb2.FAILED]
                assert seen[-1].container_state == agent_pb2.MUST_KILL
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_socket_without_listener_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # the file exists, nobody accepts

    async def scenario() -> None:
        async with AgentClient(path, connect_timeout=0.5) as client:
            await client.lock_gpu(agent_pb2.GpuLockRequest(init_pid=1))

    with pytest.raises(Unavailable, match=str(path)):
        asyncio.run(scenario())
