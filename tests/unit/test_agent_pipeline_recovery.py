"""The checkpoint pipeline's failure paths, decided without a container: what the
agent tells the shim about the container (UNTOUCHED, RESTORED, EXITED, MUST_KILL),
and what happens to the data (discarded when incomplete, committed when complete,
whatever else failed). The cgroup and the GPU are recording stand-ins; the registry,
the local tier and the commit are the real ones."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from kybernate.agent import naming
from kybernate.agent.config import AgentConfig
from kybernate.agent.limits import CheckpointLimits
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.metadata import HostVersions
from kybernate.agent.metrics import AgentMetrics
from kybernate.agent.pipeline import CheckpointPipeline, ContainerCondition, PipelineDeps
from kybernate.agent.plan import CheckpointPlan
from kybernate.agent.registry import CheckpointState, Registry
from kybernate.cuda import CudaState
from kybernate.errors import DeadlineExceeded, Internal
from kybernate.protos import agent_pb2


class RecordingCgroup:
    def __init__(self, fail_thaw: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_thaw = fail_thaw

    async def thaw(self, timeout: float) -> None:
        self.calls.append("thaw")
        if self.fail_thaw:
            raise DeadlineExceeded("did not thaw")

    async def freeze(self, timeout: float) -> None:
        self.calls.append("freeze")


class RecordingGpu:
    backend_name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    async def restore(self, pids: list[int], gpu_map: Any = None) -> dict[str, Any]:
        self.calls.append(("restore", list(pids)))
        return {}

    async def unlock(self, pids: list[int]) -> dict[str, Any]:
        self.calls.append(("unlock", list(pids)))
        return {}


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.config = AgentConfig(socket=tmp_path / "a.sock", state_dir=tmp_path / "state",
                                  local_tier=tmp_path / "tier", min_free_bytes=0)
        self.registry = Registry(self.config.registry_path)
        self.local = LocalTier(self.config.local_tier)
        self.gpu = RecordingGpu()
        self.reports: list[agent_pb2.CheckpointProgress] = []

    async def pipeline(self, *, exit: bool = False) -> CheckpointPipeline:
        await self.registry.open()
        self.local.prepare()
        deps = PipelineDeps(config=self.config, registry=self.registry, local=self.local,
                            gpu=self.gpu,  # type: ignore[arg-type]
                            criu=None, versions=HostVersions("6.18", "4.2.1", "1.1.15"),
                            limits=CheckpointLimits(1 << 30), metrics=AgentMetrics(), promoter=None)
        plan = CheckpointPlan(
            checkpoint_id=naming.new_checkpoint_id(), name="web-1", container_id="web", namespace="default",
            pod_namespace="", bundle=Path("/nonexistent"), runc_root="", init_pid=os.getpid(), destination=None,
            exit=exit, open_tcp=False, external_unix_sockets=False, terminal=False, file_locks=False,
            rootfs_upperdir=None, gpu_lock_timeout_ms=1000, deadline_s=None, image_ref="", labels={},
            memory_estimate=0)

        async def report(message: agent_pb2.CheckpointProgress) -> None:
            self.reports.append(message)

        pipeline = CheckpointPipeline(deps, plan, report)
        await self.registry.add_staging(plan.checkpoint_id, plan.name, container_id="web", namespace="default",
                                        image="")
        pipeline._staging.mkdir()
        (pipeline._staging / "pages-1.img").write_bytes(b"memory")
        return pipeline

    @property
    def failure(self) -> agent_pb2.CheckpointProgress:
        assert self.reports and self.reports[-1].phase == agent_pb2.FAILED, self.reports
        return self.reports[-1]


def _at(pipeline: CheckpointPipeline, condition: ContainerCondition, *, cuda: dict[int, CudaState],
        was_frozen: bool = False, cgroup: RecordingCgroup | None = None) -> RecordingCgroup:
    pipeline._condition = condition
    pipeline._cuda_pids = sorted(cuda)
    pipeline._entry_cuda = dict(cuda)
    pipeline._was_frozen = was_frozen
    pipeline._cgroup = cgroup or RecordingCgroup()  # type: ignore[assignment]
    return pipeline._cgroup  # type: ignore[return-value]


def test_untouched_and_exited_need_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        harness = Harness(tmp_path)
        pipeline = await harness.pipeline()
        _at(pipeline, ContainerCondition.UNTOUCHED, cuda={})
        await pipeline._fail(Internal("refused"))
        assert harness.failure.container_state == agent_pb2.UNTOUCHED
        row = await harness.registry.get(pipeline._plan.checkpoint_id)
        assert row.state is CheckpointState.FAILED and "refused" in row.error
        assert not pipeline._staging.exists(), "incomplete data is discarded"
        await harness.registry.close()
    asyncio.run(body())


def test_a_failure_while_frozen_brings_the_container_back_as_it_came(tmp_path: Path) -> None:
    """Paused by containerd (frozen), one process locked by Pause and one not: thaw,
    restore, unlock only the one Pause had not locked, freeze again."""
    async def body() -> None:
        harness = Harness(tmp_path)
        pipeline = await harness.pipeline()
        cgroup = _at(pipeline, ContainerCondition.FROZEN, was_frozen=True,
                     cuda={11: CudaState.LOCKED, 12: CudaState.RUNNING})
        await pipeline._fail(Internal("CRIU said no"))
        assert harness.failure.container_state == agent_pb2.RESTORED
        assert cgroup.calls == ["thaw", "freeze"]
        assert harness.gpu.calls == [("restore", [11, 12]), ("unlock", [12])]
        await harness.registry.close()
    asyncio.run(body())


def test_a_deadline_past_the_lock_means_kill(tmp_path: Path) -> None:
    async def body() -> None:
        harness = Harness(tmp_path)
        pipeline = await harness.pipeline()
        cgroup = _at(pipeline, ContainerCondition.GPU_CHECKPOINTED, cuda={11: CudaState.RUNNING})
        await pipeline._fail(DeadlineExceeded("too slow"), deadline_passed=True)
        assert harness.failure.container_state == agent_pb2.MUST_KILL
        assert "must be killed" in harness.failure.error_message
        assert cgroup.calls == [] and harness.gpu.calls == [], "nothing more is tried on it"
        await harness.registry.close()
    asyncio.run(body())


def test_a_container_that_cannot_be_brought_back_must_die(tmp_path: Path) -> None:
    async def body() -> None:
        harness = Harness(tmp_path)
        pipeline = await harness.pipeline()
        _at(pipeline, ContainerCondition.FROZEN, cuda={}, cgroup=RecordingCgroup(fail_thaw=True))
        await pipeline._fail(Internal("CRIU said no"))
        assert harness.failure.container_state == agent_pb2.MUST_KILL
        await harness.registry.close()
    asyncio.run(body())


@pytest.mark.parametrize("exit_", [True, False], ids=["exited", "must-kill"])
def test_complete_data_is_committed_whatever_failed(tmp_path: Path, exit_: bool) -> None:
    """The dump succeeded: with `exit` the container is gone and the data is its only
    copy; without, bringing it back failed. Either way the checkpoint commits."""
    async def body() -> None:
        harness = Harness(tmp_path)
        pipeline = await harness.pipeline(exit=exit_)
        condition = ContainerCondition.EXITED if exit_ else ContainerCondition.FROZEN
        _at(pipeline, condition, cuda={}, cgroup=RecordingCgroup(fail_thaw=True))
        pipeline._data_complete = True
        await pipeline._fail(Internal("the resume failed"))
        failure = harness.failure
        assert failure.container_state == (agent_pb2.EXITED if exit_ else agent_pb2.MUST_KILL)
        assert f"committed as {pipeline._plan.checkpoint_id}" in failure.error_message
        checkpoint_id = pipeline._plan.checkpoint_id
        assert (await harness.registry.get(checkpoint_id)).state is CheckpointState.COMMITTED
        assert harness.local.has(checkpoint_id) and not pipeline._staging.exists()
        await harness.registry.close()
    asyncio.run(body())


def test_a_cancelled_commit_still_commits(tmp_path: Path) -> None:
    """The agent is stopped (its pipelines cancelled) while the commit's thread runs:
    the commit is waited for and recorded before the cancellation goes on."""
    async def body() -> None:
        harness = Harness(tmp_path)
        harness.config = AgentConfig(socket=tmp_path / "a.sock", state_dir=tmp_path / "state",
                                     local_tier=tmp_path / "tier", min_free_bytes=0,
                                     debug_hold_during_commit_s=0.5)
        pipeline = await harness.pipeline()
        _at(pipeline, ContainerCondition.RESTORED, cuda={})
        pipeline._data_complete = True
        sealing = asyncio.create_task(pipeline._seal())
        await asyncio.sleep(0.1)
        sealing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sealing
        checkpoint_id = pipeline._plan.checkpoint_id
        assert harness.local.has(checkpoint_id)
        assert (await harness.registry.get(checkpoint_id)).state is CheckpointState.COMMITTED
        await harness.registry.close()
    asyncio.run(body())
