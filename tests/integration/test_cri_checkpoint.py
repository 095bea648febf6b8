"""Checkpoint and restore of pods through containerd's CRI plugin, as kubelet drives them.

A private CRI containerd runs the `kybernate` handler beside the stock `runc` one, with a
real node agent (fake CUDA backend) that the pods name by annotation. On containerd 2.x
kubelet's checkpoint API (CRI CheckpointContainer) writes an archive that
`checkpointctl` reads whole; containerd 1.7's CRI has no such call, and says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.agent import AgentProcess, running_agent
from tests.support.containerd import default_release
from tests.support.cri import (
    KYBERNATE_HANDLER,
    POD_NAMESPACE,
    RUNC_HANDLER,
    CriSandbox,
    cri_sandbox,
    exec_sync,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

#: A counter in a shell variable (memory only), written to a file the shell holds open
#: in the writable layer, and to /tmp/count for the test to read.
COUNTER = ("exec 3>>/tmp/held; i=0; while true; do i=$((i+1)); echo $i >&3; "
           "echo $i > /tmp/count; sleep 0.1; done")
IS_2X = default_release().config_version >= 3


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with running_agent() as started:
        yield started


@pytest.fixture(scope="module")
def cri(busybox_archive: Path) -> Iterator[CriSandbox]:
    with cri_sandbox(default_release(), busybox_archive) as sandbox:
        yield sandbox
        left = sandbox.leftovers()
    assert left == [], f"the CRI checkpoint tests left behind: {left}"


@pytest.fixture
def pods(cri: CriSandbox) -> Iterator[list[str]]:
    ran: list[str] = []
    yield ran
    existing = {pod.id for pod in cri.pods()}
    for sandbox_id in ran:
        if sandbox_id in existing:
            cri.remove_pod(sandbox_id)


def count_of(cri: CriSandbox, container_id: str) -> int:
    result = exec_sync(cri, container_id, ["cat", "/tmp/count"])
    text = result.stdout.decode().strip()
    return int(text) if result.exit_code == 0 and text.isdigit() else -1


def run_counter(cri: CriSandbox, pods: list[str], agent: AgentProcess, handler: str,
                annotations: dict[str, str] | None = None) -> tuple[str, str]:
    """A pod of `handler` running COUNTER, counting; (sandbox id, container id)."""
    sandbox_id, pod = cri.run_pod(f"counter-{handler}-{uuid.uuid4().hex[:6]}", handler,
                                  annotations={"io.kybernate.agent-socket": str(agent.socket),
                                               **(annotations or {})})
    pods.append(sandbox_id)
    container_id = cri.start_container(sandbox_id, pod, "counter", ["sh", "-c", COUNTER])
    wait_for("the counter", lambda: count_of(cri, container_id) >= 5)
    return sandbox_id, container_id


def checkpointctl(*args: str) -> str:
    result = subprocess.run(["checkpointctl", *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, f"checkpointctl {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("handler", [KYBERNATE_HANDLER, RUNC_HANDLER])
def test_kubelet_checkpoint_archive_is_complete(cri: CriSandbox, pods: list[str], agent: AgentProcess,
                                                 handler: str, tmp_path: Path) -> None:
    """CheckpointContainer (what kubelet's checkpoint API calls): the archive carries
    CRIU's log and statistics at its top for the kybernate handler as for runc's, so
    `checkpointctl show` and `inspect --stats` read it; the container keeps running."""
    api, client = cri.api, cri.client
    _, container_id = run_counter(cri, pods, agent, handler)
    archive = tmp_path / "checkpoint.tar"
    request = api.CheckpointContainerRequest(container_id=container_id, location=str(archive))
    if not IS_2X:
        with pytest.raises(grpc.RpcError) as refused:
            client.call(client.runtime.CheckpointContainer, request)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        return
    client.call(client.runtime.CheckpointContainer, request)
    with tarfile.open(archive) as tar:
        top = {member.name.split("/", 1)[0] for member in tar.getmembers()}
        images = {member.name for member in tar.getmembers() if member.name.startswith("checkpoint/")}
    assert {"dump.log", "stats-dump", "config.dump", "spec.dump", "status.dump", "status",
            "checkpoint"} <= top, top
    assert "checkpoint/inventory.img" in images and "checkpoint/pstree.img" in images
    shown = checkpointctl("show", str(archive))
    assert "counter" in shown
    stats = checkpointctl("inspect", "--stats", str(archive))
    assert "CRIU dump statistics" in stats and "Pages written" in stats
    # Forensic checkpointing leaves the container running, counting on.
    before = count_of(cri, container_id)
    wait_for("the counter after the checkpoint", lambda: count_of(cri, container_id) > before + 3)


def kybernate_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("kybernate")), *args], capture_output=True,
                          text=True, timeout=300, check=False)


def golden_snapshot(cri: CriSandbox, agent: AgentProcess, target: str, name: str) -> dict[str, object]:
    """`kybernate checkpoint create` of TARGET as NAME; its registry record."""
    result = kybernate_command("checkpoint", "create", "--name", name, "--address", cri.containerd.address,
                               "--socket", str(agent.socket), "--json", target)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{agent.log()[-3000:]}"
    record: dict[str, object] = json.loads(result.stdout)
    return record


def start_restored(cri: CriSandbox, pods: list[str], agent: AgentProcess, checkpoint: str,
                   name: str = "restored") -> tuple[str, str]:
    """A new pod whose container restores CHECKPOINT by annotation; (sandbox, container)."""
    sandbox_id, pod = cri.run_pod(f"{name}-{uuid.uuid4().hex[:6]}", KYBERNATE_HANDLER, annotations={
        "io.kybernate.agent-socket": str(agent.socket), "io.kybernate.restore-from": checkpoint})
    pods.append(sandbox_id)
    # The command is the image's business only on a cold start: a restore ignores it.
    return sandbox_id, cri.start_container(sandbox_id, pod, "counter", ["sh", "-c", "exit 99"])


def test_golden_snapshot_by_checkpoint_create_restores_by_annotation(
        cri: CriSandbox, pods: list[str], agent: AgentProcess) -> None:
    """`kybernate checkpoint create POD_NAMESPACE/POD/CONTAINER` through containerd's task
    API (1.7 and 2.x alike), then a new pod restores it by `io.kybernate.restore-from`:
    the counter goes on from its memory, and the file its shell holds open in the
    writable layer came back with it (saved by default)."""
    sandbox_id, container_id = run_counter(cri, pods, agent, KYBERNATE_HANDLER)
    pod_name = cri.client.call(cri.client.runtime.PodSandboxStatus, cri.api.PodSandboxStatusRequest(
        pod_sandbox_id=sandbox_id)).status.metadata.name
    name = f"golden-{uuid.uuid4().hex[:8]}"
    record = golden_snapshot(cri, agent, f"{POD_NAMESPACE}/{pod_name}/counter", name)
    assert (record["name"], record["container_id"], record["state"]) == (name, container_id, "committed")
    assert (record["namespace"], record["pod_namespace"]) == ("k8s.io", POD_NAMESPACE)
    # Taken through the shim, which left the container running (the agent's default).
    before = count_of(cri, container_id)
    wait_for("the source counter after the checkpoint", lambda: count_of(cri, container_id) > before + 3)
    cri.remove_pod(sandbox_id)

    _, restored = start_restored(cri, pods, agent, name)
    wait_for("the restored counter", lambda: count_of(cri, restored) > before + 3)
    held = exec_sync(cri, restored, ["cat", "/tmp/held"]).stdout.decode().split()
    assert held[:3] == ["1", "2", "3"], held[:5]


def test_checkpoint_create_refuses_what_it_cannot_name(cri: CriSandbox, agent: AgentProcess) -> None:
    for target, why in (("kyb-test/no-such-pod/counter", "has no container"),
                        ("kyb-test/Bad_Pod/counter", "not a Kubernetes name"),
                        ("a/b", "POD_NAMESPACE/POD/CONTAINER")):
        result = kybernate_command("checkpoint", "create", "--name", "x", "--address", cri.containerd.address,
                                   "--socket", str(agent.socket), target)
        assert result.returncode == 1 and why in result.stderr, result.stderr
