"""Pods through containerd's CRI plugin, driven as kubelet drives them.

A private containerd with CRI enabled runs the `kybernate` handler (RuntimeClass
handler -> io.containerd.kybernate.v1) beside the stock `runc` handler; pods are
host-network pods (no CNI on these machines) with the static pause image. The same
tests run on containerd 1.7 and 2.x (`--containerd`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import default_release
from tests.support.cri import (
    KYBERNATE_HANDLER,
    RUNC_HANDLER,
    CriSandbox,
    cri_sandbox,
    exec_sync,
    network_namespaces,
)


@pytest.fixture(scope="module")
def cri(busybox_archive: Path) -> Iterator[CriSandbox]:
    netns_before = network_namespaces()
    with cri_sandbox(default_release(), busybox_archive) as sandbox:
        yield sandbox
        left = sandbox.leftovers()
    assert left == [], f"the CRI tests left behind: {left}"
    # Host-network pods: CRI must not have made (or left) a network namespace.
    assert network_namespaces() - netns_before == set()


@pytest.fixture
def pods(cri: CriSandbox) -> Iterator[list[str]]:
    """Sandbox ids a test ran; whatever is left of them is removed afterwards."""
    with cri.pods_removed_after() as ran:
        yield ran


def container_info(cri: CriSandbox, container_id: str) -> tuple[object, dict]:
    """ContainerStatus with CRI's verbose info (pid, runtime type) decoded."""
    response = cri.client.call(cri.client.runtime.ContainerStatus, cri.api.ContainerStatusRequest(
        container_id=container_id, verbose=True))
    return response.status, json.loads(response.info.get("info", "{}"))


def parent_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid in /proc/{pid}/status")


@pytest.mark.parametrize("handler", [KYBERNATE_HANDLER, RUNC_HANDLER])
def test_pod_and_container_lifecycle(cri: CriSandbox, pods: list[str], handler: str) -> None:
    api, client = cri.api, cri.client
    sandbox_id, pod = cri.run_pod(f"life-{handler}", handler)
    pods.append(sandbox_id)
    status = client.call(client.runtime.PodSandboxStatus,
                         api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
    assert status.state == api.SANDBOX_READY
    assert status.runtime_handler == handler

    container_id = cri.start_container(sandbox_id, pod, "main", ["sleep", "600"])
    state, info = container_info(cri, container_id)
    assert state.state == api.CONTAINER_RUNNING
    expected_type = "io.containerd.kybernate.v1" if handler == KYBERNATE_HANDLER else \
        "io.containerd.runc.v2"
    assert info["runtimeType"] == expected_type

    result = exec_sync(cri, container_id, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)

    stats = client.call(client.runtime.ContainerStats,
                        api.ContainerStatsRequest(container_id=container_id)).stats
    assert stats.attributes.id == container_id
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.working_set_bytes.value > 0

    client.call(client.runtime.StopContainer,
                api.StopContainerRequest(container_id=container_id, timeout=10))
    state, _ = container_info(cri, container_id)
    assert state.state == api.CONTAINER_EXITED
    assert state.exit_code == 128 + 15  # sleep ends on SIGTERM, within the timeout
    client.call(client.runtime.RemoveContainer,
                api.RemoveContainerRequest(container_id=container_id))
    client.call(client.runtime.StopPodSandbox, api.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    status = client.call(client.runtime.PodSandboxStatus,
                         api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
    assert status.state == api.SANDBOX_NOTREADY
    client.call(client.runtime.RemovePodSandbox,
                api.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    assert sandbox_id not in {p.id for p in cri.pods()}
    assert cri.leftovers() == []


def test_one_shim_serves_a_pod_of_two_containers(cri: CriSandbox, pods: list[str]) -> None:
    sandbox_id, pod = cri.run_pod("two", KYBERNATE_HANDLER)
    pods.append(sandbox_id)
    first = cri.start_container(sandbox_id, pod, "first", ["sleep", "600"])
    second = cri.start_container(sandbox_id, pod, "second", ["sleep", "600"])

    shims = cri.containerd.shim_pids()
    assert len(shims) == 1, f"a pod of two containers runs {len(shims)} shims: {shims}"
    for container_id in (first, second):
        _, info = container_info(cri, container_id)
        # The shim is the containers' subreaper: their init is its child.
        assert parent_pid(info["pid"]) == shims[0]
        # The containers share the sandbox's pid namespace (CRI's default, pid=POD):
        # its pid 1 is our static pause.
        result = exec_sync(cri, container_id, ["cat", "/proc/1/comm"])
        assert result.exit_code == 0 and result.stdout == b"pause\n"

    cri.remove_pod(sandbox_id)
    assert cri.leftovers() == []
