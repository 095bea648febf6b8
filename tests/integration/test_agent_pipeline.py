"""The agent's checkpoint pipeline end to end: a real agent process, a real runc
container, real CRIU; the fake CUDA backend stands in for the GPU.

The container runs a counter in shell memory (written to /tmp/count each tick) and
one long-lived "CUDA" process (the fake backend's environment marker, set on that
process alone so the counter's short-lived children are not CUDA processes).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kybernate.api.client import AgentClient
from kybernate.cli.checkpoint import checkpoint_inspect_main, checkpoint_list_main
from kybernate.errors import DeadlineExceeded, KybernateError
from kybernate.protos import agent_pb2

from tests.support.agent import AgentProcess, running_agent, temporary_workdir
from tests.support.runc_container import (
    TCP_PAIR,
    Container,
    checkpoint_request,
    phase_names,
    stream_checkpoint,
)
from tests.support.s3 import S3Server

pytestmark = pytest.mark.integration

ALL_PHASES = ["ACCEPTED", "ADMITTED", "GPU_LOCKED", "GPU_CHECKPOINTED", "FROZEN", "DUMPED", "RESUMED", "EXPORTED",
              "COMMITTED"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    with temporary_workdir("kyb-agent-it") as path:
        yield path


def _agent(workdir: Path, node: str = "agent", **config: Any) -> AgentProcess:
    return AgentProcess.in_dir(workdir, node, **config)


@pytest.fixture
def agent(workdir: Path) -> Iterator[AgentProcess]:
    with running_agent(workdir) as agent:
        yield agent


@pytest.fixture
def container(workdir: Path) -> Iterator[Container]:
    box = Container(workdir)
    try:
        box.run()
        yield box
    finally:
        box.close()


def _fake_events(agent: AgentProcess) -> list[dict[str, object]]:
    return agent.fake_events()


def test_checkpoint_leave_running_then_exit_and_runc_restore(agent: AgentProcess, container: Container,
                                                              workdir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    container.wait_count(10)
    destination = workdir / "containerd-path"
    seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=False, name=f"{container.id}-live",
                                                          destination=destination)))
    assert error is None, f"{error}\n{agent.log_path.read_text()}"
    assert phase_names(seen) == ALL_PHASES
    assert [p.elapsed_ms for p in seen] == sorted(p.elapsed_ms for p in seen)
    gpu_locked = seen[ALL_PHASES.index("GPU_LOCKED")]
    assert len(gpu_locked.cuda_pids) == 1, "exactly the one marked process is a CUDA process"
    committed = Path(seen[-1].local_path)
    assert committed.parent == agent.local_tier and committed.name == seen[-1].checkpoint_id

    # Still running, counting, and its GPU back in RUNNING state.
    assert container.status() == "running"
    before = container.count()
    container.wait_count(before + 3)
    events = [e for e in _fake_events(agent) if e["action"] in ("lock", "checkpoint", "restore", "unlock")]
    assert [e["action"] for e in events] == ["lock", "checkpoint", "restore", "unlock"]
    assert all(e["ok"] for e in events)
    # GPU quiesced before the freeze, and restored after the thaw.
    assert not any(e["frozen"] for e in events), events

    metadata = json.loads((committed / "metadata.json").read_text())
    assert metadata["container"]["id"] == container.id and metadata["container"]["image"] == "busybox:test"
    assert metadata["host"]["kernel"] == os.uname().release
    assert metadata["host"]["criu_version"].startswith("4.")
    assert metadata["cuda"]["gpus"][0]["model"] == "Fake H100"
    assert "inventory.img" in metadata["files"] and "descriptors.json" in metadata["files"]
    assert set(metadata["timings_ms"]) >= {"accepted", "dumped", "resumed"}
    # containerd's path got the same files (hard links on the same filesystem).
    assert sorted(p.name for p in destination.iterdir()) == sorted(p.name for p in committed.iterdir())

    # Now with exit: CRIU kills the tasks; stock runc restores our images.
    value = container.wait_count(before + 5)
    seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=True, name=f"{container.id}-exit")))
    assert error is None, f"{error}\n{agent.log_path.read_text()}"
    assert phase_names(seen) == [p for p in ALL_PHASES if p != "RESUMED"]
    assert container.status() == "stopped"
    dumped_at = container.count()
    assert dumped_at >= value
    image_dir = Path(seen[-1].local_path)

    async def prepare_and_restore() -> tuple[agent_pb2.PrepareRestoreResponse, agent_pb2.CompleteRestoreResponse]:
        async with AgentClient(agent.socket) as client:
            prepared = await client.prepare_restore(agent_pb2.PrepareRestoreRequest(checkpoint=f"{container.id}-exit", namespace="default"))
            container.delete()
            container.restore(Path(prepared.image_dir))
            completed = await client.complete_restore(agent_pb2.CompleteRestoreRequest(
                container_id=container.id, init_pid=container.pid, gpu_map=prepared.gpu_map))
            return prepared, completed

    prepared, completed = asyncio.run(prepare_and_restore())
    assert Path(prepared.image_dir) == image_dir
    # The checkpointed GPU is here with room: the driver restores in place, no map.
    assert dict(prepared.gpu_map) == {}
    assert len(completed.cuda_pids) == 1
    assert container.status() == "running"
    # The counter continues from where it was dumped, not from 1.
    resumed = container.wait_count(dumped_at + 3)
    assert resumed > dumped_at

    async def listing() -> list[agent_pb2.CheckpointRecord]:
        async with AgentClient(agent.socket) as client:
            return list((await client.list_checkpoints(agent_pb2.ListCheckpointsRequest())).checkpoints)
    records = {r.name: r for r in asyncio.run(listing())}
    assert records[f"{container.id}-live"].state == "committed"
    assert records[f"{container.id}-exit"].local_path == str(image_dir)

    async def status() -> agent_pb2.StatusResponse:
        async with AgentClient(agent.socket) as client:
            return await client.status()
    health = asyncio.run(status())
    assert (health.cuda_backend, health.local_tier, health.remote_tier) == ("fake", str(agent.local_tier), "")
    assert health.dirty_count == 0 and health.checkpoints_in_flight == 0
    socket_mode = os.stat(agent.socket)
    assert (stat.S_IMODE(socket_mode.st_mode), socket_mode.st_uid) == (0o600, 0), "root-only socket"
    # Another user cannot even connect: the kernel checks its uid against the socket's.
    os.chmod(agent.socket.parent, 0o711)  # let it reach the socket file, to be refused there
    try:
        connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
        probe = subprocess.run([sys.executable, "-c", connect, str(agent.socket)],
                               user=65534, capture_output=True, text=True, timeout=30, check=False)
    finally:
        os.chmod(agent.socket.parent, 0o700)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr

    # The `kybernate checkpoint list|inspect` entries print the same registry.
    capsys.readouterr()
    assert checkpoint_list_main(["--socket", str(agent.socket), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in listed} == {f"{container.id}-live", f"{container.id}-exit"}
    assert checkpoint_inspect_main(["--socket", str(agent.socket), f"{container.id}-exit"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["metadata"]["options"]["exit"] is True
    assert checkpoint_inspect_main(["--socket", str(agent.socket), "no-such-checkpoint"]) == 1
    assert "no-such-checkpoint" in capsys.readouterr().err


def test_paused_container_is_checkpointed_and_left_paused(agent: AgentProcess, container: Container) -> None:
    """containerd's order: Pause (the shim locks the GPU, then freezes), Checkpoint, Resume."""
    container.wait_count(3)

    async def scenario() -> list[agent_pb2.CheckpointProgress]:
        async with AgentClient(agent.socket) as client:
            locked = await client.lock_gpu(agent_pb2.GpuLockRequest(container_id=container.id,
                                                                    init_pid=container.pid))
            assert len(locked.cuda_pids) == 1
            assert container.runc("pause", container.id).returncode == 0
            seen = [p async for p in client.checkpoint(checkpoint_request(container, exit=False, name=f"{container.id}-p"))]
            assert container.status() == "paused", "left as it came: paused, GPU locked"
            assert container.runc("resume", container.id).returncode == 0
            await client.unlock_gpu(agent_pb2.GpuLockRequest(container_id=container.id, init_pid=container.pid))
            return seen

    seen = asyncio.run(scenario())
    assert phase_names(seen) == ALL_PHASES
    events = [e for e in _fake_events(agent) if e["ok"] and e["action"] in ("lock", "checkpoint", "restore", "unlock")]
    # One lock (Pause's), one unlock (Resume's); the pipeline's lock found it locked already.
    assert [e["action"] for e in events] == ["lock", "checkpoint", "restore", "unlock"]
    assert container.status() == "running"
    container.wait_count(container.count() + 3)


def test_restore_refused_when_gpu_memory_does_not_fit(agent: AgentProcess, container: Container) -> None:
    container.wait_count(2)
    seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=False, name=f"{container.id}-fit")))
    assert error is None, error
    from kybernate.cuda.fake import FakeBackend
    FakeBackend(agent.fake_dir).write_gpus([{"uuid": "GPU-fa4e0000-0000-4000-8000-000000000000",
                                             "model": "Fake H100", "memory_total": 64 << 20}])

    async def prepare() -> None:
        async with AgentClient(agent.socket) as client:
            await client.prepare_restore(agent_pb2.PrepareRestoreRequest(checkpoint=seen[-1].checkpoint_id, namespace="default"))
    with pytest.raises(KybernateError, match=r"not enough GPU memory on GPU .*need \d+, free \d+") as caught:
        asyncio.run(prepare())
    assert caught.value.code == 8  # ResourceExhausted


def test_deadline_after_gpu_checkpoint_says_kill(workdir: Path, container: Container) -> None:
    agent = _agent(workdir, hold_after_phase={"gpu_checkpointed": 10})
    agent.start()
    try:
        container.wait_count(2)
        seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=False, name=f"{container.id}-d",
                                                              deadline_ms=1500)))
        assert isinstance(error, DeadlineExceeded), error
        assert "must be killed" in str(error)
        assert phase_names(seen) == ["ACCEPTED", "ADMITTED", "GPU_LOCKED", "GPU_CHECKPOINTED", "FAILED"]
        assert seen[-1].container_state == agent_pb2.MUST_KILL
    finally:
        agent.stop()


def test_gpu_lock_timeout_leaves_container_running(agent: AgentProcess, container: Container) -> None:
    container.wait_count(3)
    (agent.fake_dir / "hang-lock").write_text("")
    try:
        seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=False, name=f"{container.id}-t")))
    finally:
        (agent.fake_dir / "hang-lock").unlink(missing_ok=True)
    assert isinstance(error, DeadlineExceeded), error
    assert "1500 ms" in str(error) and "pid" in str(error)
    assert phase_names(seen) == ["ACCEPTED", "ADMITTED", "FAILED"]
    assert seen[-1].container_state == agent_pb2.RESTORED
    assert container.status() == "running"
    container.wait_count(container.count() + 3)
    assert not list(agent.local_tier.glob(".staging-*"))


def test_criu_failure_resumes_container_and_keeps_dump_log(agent: AgentProcess, workdir: Path) -> None:
    box = Container(workdir, prelude=TCP_PAIR)
    try:
        box.run()
        box.wait_count(5)
        seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(box, exit=False, name=f"{box.id}-tcp")))
        assert error is not None and error.code == 13, error  # Internal, from CRIU
        assert "TCP" in str(error) or "tcp" in str(error), str(error)
        assert phase_names(seen) == ["ACCEPTED", "ADMITTED", "GPU_LOCKED", "GPU_CHECKPOINTED", "FROZEN", "FAILED"]
        assert seen[-1].container_state == agent_pb2.RESTORED
        assert box.status() == "running"
        box.wait_count(box.count() + 3)
        actions = [e["action"] for e in _fake_events(agent)
                   if e["ok"] and e["action"] in ("lock", "checkpoint", "restore", "unlock")]
        assert actions == ["lock", "checkpoint", "restore", "unlock"], actions
        checkpoint_id = seen[-1].checkpoint_id
        assert (agent.state_dir / "failed-checkpoints" / checkpoint_id / "dump.log").is_file()
        assert not (agent.local_tier / f".staging-{checkpoint_id}").exists()
        assert not (agent.local_tier / checkpoint_id).exists()
    finally:
        box.close()


def test_rootfs_diff_saves_the_writable_layer(agent: AgentProcess, workdir: Path) -> None:
    box = Container(workdir, overlay=True)
    try:
        box.run()
        box.wait_count(3)
        seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(box, exit=True, name=f"{box.id}-diff",
                                                              rootfs_diff=True)))
        assert error is None, f"{error}\n{agent.log_path.read_text()}"
        committed = Path(seen[-1].local_path)
        listing = subprocess.run(["tar", "-tf", str(committed / "rootfs-diff.tar")], check=True,
                                 capture_output=True, text=True).stdout.split()
        assert "./tmp/count" in listing and "./bin/busybox" not in listing
        assert "rootfs-diff.tar" in json.loads((committed / "metadata.json").read_text())["files"]
    finally:
        box.close()


def test_rootfs_diff_without_overlay_is_refused_untouched(agent: AgentProcess, container: Container) -> None:
    container.wait_count(2)
    seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=False, name=f"{container.id}-nd",
                                                          rootfs_diff=True)))
    assert seen == [] and error is not None and error.code == 9  # FailedPrecondition, before ACCEPTED
    assert "overlay" in str(error)
    assert container.status() == "running"
    assert not [e for e in _fake_events(agent) if e["action"] == "lock"]


def test_tampered_checkpoint_is_refused_before_restore(agent: AgentProcess, container: Container) -> None:
    container.wait_count(2)
    seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=False, name=f"{container.id}-x")))
    assert error is None, error
    image_dir = Path(seen[-1].local_path)
    copy = image_dir.parent / "copy-for-tamper"
    shutil.copytree(image_dir, copy)
    pages = min(copy.glob("pages-*.img"))
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages.write_bytes(bytes(data))

    async def prepare() -> None:
        async with AgentClient(agent.socket) as client:
            await client.prepare_restore(agent_pb2.PrepareRestoreRequest(directory=str(copy)))
    with pytest.raises(KybernateError, match=pages.name) as caught:
        asyncio.run(prepare())
    assert caught.value.code == 15  # DataLoss
    shutil.rmtree(copy)


def test_agent_killed_mid_checkpoint_leaves_no_checkpoint(workdir: Path, container: Container) -> None:
    agent = _agent(workdir, hold_after_phase={"frozen": 60})
    agent.start()
    try:
        container.wait_count(2)

        async def until_frozen() -> str:
            async with AgentClient(agent.socket) as client:
                async for progress in client.checkpoint(checkpoint_request(container, exit=False, name=f"{container.id}-k")):
                    if progress.phase == agent_pb2.FROZEN:
                        return progress.checkpoint_id
            raise AssertionError("stream ended before FROZEN")

        checkpoint_id = asyncio.run(until_frozen())
        assert (agent.local_tier / f".staging-{checkpoint_id}").is_dir()
        agent.stop(signal.SIGKILL)
        # The shim's job after a broken stream: kill the container (force-delete thaws it first).
        container.delete()

        agent.start()
        assert not (agent.local_tier / f".staging-{checkpoint_id}").exists()
        assert not (agent.local_tier / checkpoint_id).exists()

        async def inspect() -> agent_pb2.InspectCheckpointResponse:
            async with AgentClient(agent.socket) as client:
                return await client.inspect_checkpoint(agent_pb2.InspectCheckpointRequest(checkpoint=checkpoint_id))
        response = asyncio.run(inspect())
        assert response.record.state == "failed" and "stopped before" in response.record.error
        assert response.metadata_json == ""
    finally:
        agent.stop()


def test_upload_to_s3_and_restore_by_name_on_another_node(workdir: Path, container: Container) -> None:
    s3 = S3Server()
    s3.start()
    node_a, node_b = _agent(workdir, "node-a"), _agent(workdir, "node-b")
    bucket = f"kyb-agent-{os.getpid()}"
    s3_section = (f'[s3]\nbucket = "{bucket}"\nendpoint_url = "{s3.url}"\nprefix = "ckpt/"\n'
                  'region = "us-east-1"\naccess_key_id = "k"\nsecret_access_key = "s"\n'
                  "backoff_base_s = 0.1\npromote_interval_s = 1.0\n")
    try:
        s3.make_bucket(bucket)
        node_a.write_config(extra_toml=s3_section, node_name="node-a")
        node_b.write_config(extra_toml=s3_section, node_name="node-b")
        node_a.start()
        container.wait_count(2)
        name = f"{container.id}-s3"
        seen, error = asyncio.run(stream_checkpoint(node_a, checkpoint_request(container, exit=False, name=name)))
        assert error is None, error

        async def record(agent: AgentProcess) -> agent_pb2.CheckpointRecord:
            async with AgentClient(agent.socket) as client:
                response = await client.inspect_checkpoint(agent_pb2.InspectCheckpointRequest(checkpoint=f"default/{name}"))
                return response.record
        deadline = time.monotonic() + 30
        while (row := asyncio.run(record(node_a))).dirty:
            assert time.monotonic() < deadline, "checkpoint never uploaded"
            time.sleep(0.2)
        assert row.tier == "remote" and row.local_path, "uploaded, and still usable locally"
        checkpoint_id = seen[-1].checkpoint_id
        entry = s3.client().get_object(Bucket=bucket, Key=f"ckpt/names/default/{name}/node-a")["Body"].read()
        assert json.loads(entry)["id"] == checkpoint_id, "node-a's own entry in the name index"

        node_b.start()  # another node: empty registry and tier, same bucket

        async def prepare() -> agent_pb2.PrepareRestoreResponse:
            async with AgentClient(node_b.socket) as client:
                return await client.prepare_restore(agent_pb2.PrepareRestoreRequest(checkpoint=name, namespace="default"))
        prepared = asyncio.run(prepare())
        assert Path(prepared.image_dir) == node_b.local_tier / checkpoint_id
        assert not list(node_b.local_tier.glob(".fetch-*"))
        assert json.loads(prepared.metadata_json)["name"] == name
        assert asyncio.run(record(node_b)).state == "committed"
    finally:
        node_a.stop()
        node_b.stop()
        s3.stop()


def test_unreachable_agent_is_unavailable_naming_the_socket(workdir: Path) -> None:
    socket_path = workdir / "nobody.sock"

    async def call() -> None:
        async with AgentClient(socket_path, connect_timeout=1) as client:
            await client.status()
    with pytest.raises(KybernateError, match=str(socket_path)) as caught:
        asyncio.run(call())
    assert caught.value.code == 14  # Unavailable
