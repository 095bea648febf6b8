"""Thirty checkpoint and restore cycles through containerd leave nothing behind but the
thirty checkpoints themselves: no `ctrd-checkpoint*` copy of the images in
containerd's runtime directory (containerd 1.7 never removes those; Kybernate does
once a restore has consumed one), no staging, work or download directory in the
agent, no mount, no cgroup, no shim, no process, and no file descriptor more in the
agent or in containerd than after the first cycles."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kybernate.shim.agent_settings import ANNOTATION_AGENT_SOCKET

from tests.support.agent import AgentProcess, running_agent, temporary_workdir
from tests.support.cgroups import container_cgroups
from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.images import BUSYBOX_IMAGE_REF
from tests.support.tasks import private_containerd, remove_container

pytestmark = pytest.mark.integration

CYCLES = 30
WARM_UP = 2  # grpc and containerd open what they keep open during the first cycles
FD_SLACK = 3


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with temporary_workdir("kyb-debris") as workdir, running_agent(workdir, "node") as node:
        yield node


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[Containerd]:
    with private_containerd(Containerd(), busybox_archive) as instance:
        yield instance


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _mounts(ctd: Containerd) -> list[str]:
    return ctd.mounts_under(ctd.base)


def _leftovers(ctd: Containerd, agent: AgentProcess) -> dict[str, list[str]]:
    state = agent.state_dir
    return {
        "containerd runtime dir": sorted(p.name for p in ctd.runtime_dir.iterdir()),
        "agent staging and downloads": sorted(p.name for p in agent.local_tier.iterdir()
                                              if p.name.startswith(".") and p.name != ".seals"),
        # A seal only for a checkpoint that is there.
        "seals without a checkpoint": sorted(
            p.name for p in (agent.local_tier / ".seals").glob("*")
            if not (agent.local_tier / p.name.removesuffix(".json") / "metadata.json").exists()),
        "agent work dirs": sorted(p.name for p in (state / "work").iterdir()) if (state / "work").exists() else [],
        "failed checkpoints": sorted(p.name for p in (state / "failed-checkpoints").iterdir())
        if (state / "failed-checkpoints").exists() else [],
        "shims": [str(pid) for pid in ctd.shim_pids()],
        "containers": ctd.ctr("containers", "ls", "-q", check=True).stdout.split(),
        "tasks": ctd.ctr("task", "ls", "-q", check=True).stdout.split(),
    }


def _cycle(ctd: Containerd, agent: AgentProcess, n: int) -> None:
    container_id, ref = f"kyb-debris-{os.getpid()}", f"docker.io/kybernate/debris:{n}"
    ctd.ctr("run", "--runtime", KYBERNATE_RUNTIME, "-d", "--annotation", f"{ANNOTATION_AGENT_SOCKET}={agent.socket}",
            BUSYBOX_IMAGE_REF, container_id, "sh", "-c", "echo $$ > /tmp/pid; exec sleep 1000000", check=True)
    ctd.wait_task_status(container_id, "RUNNING")
    ctd.ctr("container", "checkpoint", "--task", container_id, ref, check=True, timeout=120)
    remove_container(ctd, container_id)
    ctd.ctr("container", "restore", "--live", container_id, ref, check=True, timeout=120)
    ctd.wait_task_status(container_id, "RUNNING")
    remove_container(ctd, container_id)
    ctd.ctr("images", "rm", ref, check=True)
    assert container_cgroups(ctd, container_id) == []


def test_thirty_cycles_leave_nothing_behind(ctd: Containerd, agent: AgentProcess) -> None:
    assert agent.process is not None
    empty = _leftovers(ctd, agent)
    assert all(not found for found in empty.values()), empty
    mounts = _mounts(ctd)
    for n in range(WARM_UP):
        _cycle(ctd, agent, n)
    agent_fds, containerd_fds = _fds(agent.process.pid), _fds(ctd.pid)

    for n in range(WARM_UP, CYCLES):
        _cycle(ctd, agent, n)

    assert _leftovers(ctd, agent) == empty
    assert _mounts(ctd) == mounts
    assert _fds(agent.process.pid) <= agent_fds + FD_SLACK, "the agent leaks file descriptors"
    assert _fds(ctd.pid) <= containerd_fds + FD_SLACK, "containerd keeps descriptors of our shims"
    committed = agent.settled_checkpoints()
    assert len(committed) == CYCLES, f"{len(committed)} checkpoints committed for {CYCLES} cycles"
