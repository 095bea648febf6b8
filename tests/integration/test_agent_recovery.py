"""The agent keeps its promises when things go wrong: a real agent process, a real runc
container, real CRIU; the fake CUDA backend stands in for the GPU.

- A deadline passing during the commit, the agent stopped (SIGTERM) or killed
  (SIGKILL) during it, the container's resume failing after the dump: complete data
  is committed and restorable, never destroyed.
- The registry and the disk never disagree for long: a registry that lags behind the
  disk is corrected at restore time and at start-up.
- Names never collide: two default-named checkpoints in a row, a retry after a failure.
- A shim that leaves the stream stops the pipeline, which puts the container back.
- A paused container stays frozen (and its GPU locked) while its checkpoint waits for
  admission behind another one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kybernate.agent.commit import verify
from kybernate.api.client import AgentClient
from kybernate.errors import KybernateError
from kybernate.protos import agent_pb2

from tests.support.agent import AgentProcess, temporary_workdir
from tests.support.processes import live_pids_with_marker
from tests.support.runc_container import (
    Container,
    checkpoint_request,
    phase_names,
    stream_checkpoint,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir() -> Iterator[Path]:
    with temporary_workdir("kyb-recovery") as path:
        yield path


@pytest.fixture
def container(workdir: Path) -> Iterator[Container]:
    box = Container(workdir)
    try:
        box.run()
        box.wait_count(3)
        yield box
    finally:
        box.close()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents a test started; each is stopped afterwards (continued first if stopped)."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.cont()
        agent.stop()


def start_agent(agents: list[AgentProcess], workdir: Path, **config: object) -> AgentProcess:
    agent = AgentProcess.in_dir(workdir, "agent", **config)  # type: ignore[arg-type]
    agent.start()
    agents.append(agent)
    return agent


def restart(agent: AgentProcess, sig: int = signal.SIGTERM, **config: object) -> None:
    agent.cont()
    agent.stop(sig)
    agent.write_config(**config)  # type: ignore[arg-type]
    agent.start()


def record(agent: AgentProcess, reference: str) -> agent_pb2.CheckpointRecord:
    async def call() -> agent_pb2.CheckpointRecord:
        async with AgentClient(agent.socket) as client:
            response = await client.inspect_checkpoint(agent_pb2.InspectCheckpointRequest(checkpoint=reference))
            return response.record
    return asyncio.run(call())


def prepare(agent: AgentProcess, reference: str) -> agent_pb2.PrepareRestoreResponse:
    async def call() -> agent_pb2.PrepareRestoreResponse:
        async with AgentClient(agent.socket) as client:
            return await client.prepare_restore(
                agent_pb2.PrepareRestoreRequest(checkpoint=reference, namespace="default"))
    return asyncio.run(call())


def wait_for_log(agent: AgentProcess, needle: str, offset: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while needle not in agent.log()[offset:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent never logged {needle!r}:\n{agent.log()[offset:]}")
        time.sleep(0.05)


def assert_restores(box: Container, image_dir: Path, dumped_at: int) -> None:
    """runc restores the images and the counter goes on from the dump, not from 1."""
    box.delete()
    box.restore(image_dir)
    assert box.status() == "running"
    assert box.wait_count(dumped_at + 3) > dumped_at


def staging_dirs(agent: AgentProcess) -> list[Path]:
    return sorted(agent.local_tier.glob(".staging-*")) if agent.local_tier.exists() else []


def test_a_deadline_passing_during_the_commit_keeps_the_checkpoint(
        workdir: Path, container: Container, agents: list[AgentProcess]) -> None:
    """With `exit` the dump is the only copy of the container: the deadline bounds the
    time the container is held, never the commit that follows."""
    deadline_ms = 8000  # room for the dump on a loaded machine; the commit then holds longer
    agent = start_agent(agents, workdir, hold_during_commit=deadline_ms / 1000 + 2)
    seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(
        container, exit=True, name=f"{container.id}-slow", deadline_ms=deadline_ms)))
    assert error is None, f"{error}\n{agent.log()[-3000:]}"
    assert phase_names(seen)[-1] == "COMMITTED"
    assert seen[-1].elapsed_ms > deadline_ms, "the commit did outlast the deadline"
    image_dir = Path(seen[-1].local_path)
    assert verify(image_dir)["id"] == seen[-1].checkpoint_id
    assert record(agent, seen[-1].checkpoint_id).state == "committed"
    assert container.status() == "stopped"
    assert_restores(container, image_dir, dumped_at=container.count())


def test_an_agent_stopped_during_the_commit_finishes_it(
        workdir: Path, container: Container, agents: list[AgentProcess]) -> None:
    """SIGTERM: the agent refuses new calls but lets the checkpoint in flight commit."""
    agent = start_agent(agents, workdir, hold_during_commit=3.0)
    offset = len(agent.log())

    async def scenario() -> tuple[list[agent_pb2.CheckpointProgress], KybernateError | None]:
        stream = asyncio.create_task(stream_checkpoint(agent, checkpoint_request(
            container, exit=False, name=f"{container.id}-term")))
        await asyncio.to_thread(wait_for_log, agent, "holding 3.0s during commit", offset)
        assert agent.process is not None
        agent.process.send_signal(signal.SIGTERM)
        return await stream

    seen, error = asyncio.run(scenario())
    assert error is None, f"{error}\n{agent.log()[offset:]}"
    assert phase_names(seen)[-1] == "COMMITTED"
    assert agent.process is not None and agent.process.wait(30) == 0
    restart(agent)
    checkpoint_id = seen[-1].checkpoint_id
    assert record(agent, checkpoint_id).state == "committed"
    assert verify(agent.local_tier / checkpoint_id)["id"] == checkpoint_id
    assert staging_dirs(agent) == []
    assert container.status() == "running"


def test_an_agent_killed_during_the_commit_is_succeeded_by_one_that_commits(
        workdir: Path, container: Container, agents: list[AgentProcess]) -> None:
    agent = start_agent(agents, workdir, hold_during_commit=60.0)
    offset = len(agent.log())

    async def scenario() -> tuple[list[agent_pb2.CheckpointProgress], KybernateError | None]:
        stream = asyncio.create_task(stream_checkpoint(agent, checkpoint_request(
            container, exit=True, name=f"{container.id}-kill")))
        await asyncio.to_thread(wait_for_log, agent, "holding 60.0s during commit", offset)
        agent.stop(signal.SIGKILL)
        return await stream

    seen, error = asyncio.run(scenario())
    assert error is not None and phase_names(seen)[-1] == "EXPORTED", (phase_names(seen), error)
    checkpoint_id = seen[-1].checkpoint_id
    assert (agent.local_tier / f".staging-{checkpoint_id}").is_dir()
    assert container.status() == "stopped", "CRIU's exit stopped it: the dump is the only copy"
    dumped_at = container.count()

    agent.write_config()
    agent.start()
    assert staging_dirs(agent) == []
    assert record(agent, f"default/{container.id}-kill").state == "committed"
    image_dir = agent.local_tier / checkpoint_id
    assert verify(image_dir)["id"] == checkpoint_id
    assert_restores(container, image_dir, dumped_at)


def test_a_resume_that_fails_once_after_the_dump_is_retried_and_the_checkpoint_commits(
        workdir: Path, container: Container, agents: list[AgentProcess]) -> None:
    agent = start_agent(agents, workdir)
    from kybernate.cuda.fake import FakeBackend

    FakeBackend(agent.fake_dir).inject_failure("restore")
    seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(
        container, exit=False, name=f"{container.id}-resume")))
    assert error is not None, phase_names(seen)
    assert seen[-1].phase == agent_pb2.FAILED and seen[-1].container_state == agent_pb2.RESTORED, seen[-1]
    assert "committed as" in str(error), str(error)
    checkpoint_id = seen[-1].checkpoint_id
    assert record(agent, checkpoint_id).state == "committed"
    assert verify(agent.local_tier / checkpoint_id)["id"] == checkpoint_id
    assert container.status() == "running" and agent.cuda_state(container.token) == "RUNNING"


def test_a_container_that_cannot_be_resumed_after_the_dump_must_die_and_the_checkpoint_commits(
        workdir: Path, container: Container, agents: list[AgentProcess]) -> None:
    """Its CUDA process vanished while the agent held it after the dump: the container's
    state is undefined (MUST_KILL), and the complete dump is committed all the same."""
    agent = start_agent(agents, workdir, hold_after_phase={"dumped": 3})
    offset = len(agent.log())

    async def scenario() -> tuple[list[agent_pb2.CheckpointProgress], KybernateError | None]:
        stream = asyncio.create_task(stream_checkpoint(agent, checkpoint_request(
            container, exit=False, name=f"{container.id}-gone")))
        await asyncio.to_thread(wait_for_log, agent, "after phase dumped", offset)
        for pid in live_pids_with_marker(container.token):
            os.kill(pid, signal.SIGKILL)  # frozen: it dies as soon as it is thawed
        return await stream

    seen, error = asyncio.run(scenario())
    assert error is not None, phase_names(seen)
    assert seen[-1].phase == agent_pb2.FAILED and seen[-1].container_state == agent_pb2.MUST_KILL, seen[-1]
    assert "must be killed" in str(error) and "committed as" in str(error), str(error)
    checkpoint_id = seen[-1].checkpoint_id
    assert record(agent, checkpoint_id).state == "committed"
    assert verify(agent.local_tier / checkpoint_id)["id"] == checkpoint_id


def test_names_never_collide(workdir: Path, container: Container, agents: list[AgentProcess]) -> None:
    agent = start_agent(agents, workdir)
    first, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=False, name="")))
    assert error is None, error
    second, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(container, exit=False, name="")))
    assert error is None, error
    ids = {first[-1].checkpoint_id, second[-1].checkpoint_id}
    names = {record(agent, i).name for i in ids}
    assert len(ids) == 2 and len(names) == 2, (ids, names)

    # A failed attempt does not reserve its name: the retry right after it succeeds.
    from kybernate.cuda.fake import FakeBackend

    FakeBackend(agent.fake_dir).inject_failure("lock")
    failed, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(
        container, exit=False, name="retry-me")))
    assert error is not None and failed[-1].phase == agent_pb2.FAILED
    retried, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(
        container, exit=False, name="retry-me")))
    assert error is None, error
    assert record(agent, "default/retry-me").id == retried[-1].checkpoint_id
    assert record(agent, failed[-1].checkpoint_id).state == "failed"


def test_the_registry_is_reconciled_with_the_disk(
        workdir: Path, container: Container, agents: list[AgentProcess]) -> None:
    agent = start_agent(agents, workdir)
    made = []
    for suffix in ("lagging", "vanished", "forgotten"):
        seen, error = asyncio.run(stream_checkpoint(agent, checkpoint_request(
            container, exit=False, name=f"{container.id}-{suffix}")))
        assert error is None, error
        made.append(seen[-1].checkpoint_id)
    lagging, vanished, forgotten = made

    # A row that says failed although its data committed (the agent stopped between
    # the rename and the row's update): a restore by name still works, and fixes it.
    agent.registry_sql("UPDATE checkpoints SET state = 'failed', error = 'lagged' WHERE id = ?", lagging)
    prepared = prepare(agent, f"{container.id}-lagging")
    assert prepared.checkpoint_id == lagging
    assert record(agent, lagging).state == "committed"

    # At start-up: a row whose data is gone is failed; a committed directory the
    # registry forgot is recorded again; a row left staging with no data is failed.
    agent.registry_sql("UPDATE checkpoints SET state = 'failed' WHERE id = ?", lagging)
    shutil.rmtree(agent.local_tier / vanished)
    agent.registry_sql("DELETE FROM checkpoints WHERE id = ?", forgotten)
    orphan = "20261207T000000000000Z-00000000000000ff"
    agent.registry_sql("INSERT INTO checkpoints (id, name, state, tier, created_at, namespace)"
                       " VALUES (?, 'orphan', 'staging', 'local', '2026-12-07T00:00:00+00:00', 'default')", orphan)
    restart(agent)
    assert record(agent, lagging).state == "committed"
    assert record(agent, vanished).state == "failed" and "missing" in record(agent, vanished).error
    assert record(agent, forgotten).state == "committed"
    assert record(agent, f"default/{container.id}-forgotten").id == forgotten
    assert record(agent, orphan).state == "failed"


def test_a_shim_leaving_the_stream_stops_the_pipeline(
        workdir: Path, container: Container, agents: list[AgentProcess]) -> None:
    agent = start_agent(agents, workdir, hold_after_phase={"gpu_locked": 60})
    offset = len(agent.log())

    async def leave_after_gpu_locked() -> str:
        async with AgentClient(agent.socket) as client:
            async for progress in client.checkpoint(checkpoint_request(
                    container, exit=False, name=f"{container.id}-left")):
                if progress.phase == agent_pb2.GPU_LOCKED:
                    return progress.checkpoint_id  # leaving the loop cancels the call
        raise AssertionError("the stream ended before GPU_LOCKED")

    checkpoint_id = asyncio.run(leave_after_gpu_locked())
    wait_for_log(agent, "the shim left the stream", offset, timeout=15)
    deadline = time.monotonic() + 15
    while record(agent, checkpoint_id).state != "failed":
        assert time.monotonic() < deadline, f"{record(agent, checkpoint_id)}\n{agent.log()[offset:]}"
        time.sleep(0.1)
    assert agent.cuda_state(container.token) == "RUNNING", "the pipeline's lock was given back"
    assert container.status() == "running"
    container.wait_count(container.count() + 3)
    assert staging_dirs(agent) == []


def test_a_paused_container_stays_frozen_while_it_waits_for_admission(
        workdir: Path, agents: list[AgentProcess]) -> None:
    """A one-byte memory budget admits one checkpoint at a time: the second container,
    paused as containerd leaves it before Checkpoint (GPU locked, cgroup frozen), stays
    so while the first holds the budget."""
    agent = start_agent(agents, workdir, memory_budget_bytes=1, hold_after_phase={"dumped": 5})
    first, second = Container(workdir / "first"), Container(workdir / "second")
    try:
        for box in (first, second):
            box.run()
            box.wait_count(2)

        async def scenario() -> None:
            async with AgentClient(agent.socket) as client:
                locked = await client.lock_gpu(agent_pb2.GpuLockRequest(container_id=second.id,
                                                                        init_pid=second.pid))
                assert len(locked.cuda_pids) == 1
                assert second.runc("pause", second.id).returncode == 0
                holder = client.checkpoint(checkpoint_request(first, exit=False, name=f"{first.id}-1"))
                async for progress in holder:
                    if progress.phase == agent_pb2.DUMPED:
                        break  # the first now holds the budget, and holds still for a while
                waiting: list[int] = []

                async def second_checkpoint() -> None:
                    async for progress in client.checkpoint(
                            checkpoint_request(second, exit=False, name=f"{second.id}-2")):
                        waiting.append(progress.phase)

                queued = asyncio.create_task(second_checkpoint())
                for _ in range(100):
                    if waiting:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                # Still the first's turn: the second is accepted, not admitted, untouched.
                assert waiting == [agent_pb2.ACCEPTED], waiting
                assert second.status() == "paused"
                assert agent.cuda_state(second.token) == "LOCKED"
                async for _ in holder:
                    pass
                await queued
                assert agent_pb2.ADMITTED in waiting and waiting[-1] == agent_pb2.COMMITTED, waiting
                assert second.status() == "paused", "given back as it came: paused"
                assert agent.cuda_state(second.token) == "LOCKED"
                assert second.runc("resume", second.id).returncode == 0
                await client.unlock_gpu(agent_pb2.GpuLockRequest(container_id=second.id, init_pid=second.pid))
                assert agent.cuda_state(second.token) == "RUNNING"

        asyncio.run(scenario())
        second.wait_count(second.count() + 3)
    finally:
        first.close()
        second.close()
