"""Checkpoint and restore of pods through containerd's CRI plugin, as kubelet drives them.

A private CRI containerd runs the `kybernate` handler beside the stock `runc` one, with a
real node agent (fake CUDA backend) that the pods name by annotation. On containerd 2.x
kubelet's checkpoint API (CRI CheckpointContainer) writes an archive that
`checkpointctl` reads whole; containerd 1.7's CRI has no such call, and says so.
"""

from __future__ import annotations

import concurrent.futures
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
    PodNetwork,
    cri_sandbox,
    enable_pod_network,
    exec_sync,
    network_namespaces,
    pull_through_registry,
)
from tests.support.registry import running_registry
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


@pytest.fixture(scope="module")
def pod_network(cri: CriSandbox) -> Iterator[PodNetwork]:
    """Pods of their own network namespaces, for the tests that need them."""
    netns_before = network_namespaces()
    network = enable_pod_network(cri)
    try:
        yield network
    finally:
        for pod in cri.pods():
            cri.remove_pod(pod.id)
        network.remove()
    assert network_namespaces() - netns_before == set(), "pods left their network namespaces"


@pytest.fixture
def pods(cri: CriSandbox) -> Iterator[list[str]]:
    """Sandbox ids a test ran; whatever is left of them is removed afterwards."""
    with cri.pods_removed_after() as ran:
        yield ran


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
                   name: str = "restored", own_network: bool = False) -> tuple[str, str]:
    """A new pod whose container restores CHECKPOINT by annotation; (sandbox, container)."""
    sandbox_id, pod = cri.run_pod(f"{name}-{uuid.uuid4().hex[:6]}", KYBERNATE_HANDLER, annotations={
        "io.kybernate.agent-socket": str(agent.socket), "io.kybernate.restore-from": checkpoint},
        own_network=own_network)
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


#: A warmed-up server: a counter in a shell variable (memory only), and busybox httpd
#: listening on port 8080 in the pod's own network namespace, serving the count.
SERVER = ("mkdir -p /www; httpd -f -p 8080 -h /www & i=0; while true; do i=$((i+1)); "
          "echo $i > /www/count; echo $i > /tmp/count; sleep 0.1; done")
CLONES = 5


def served_count(cri: CriSandbox, container_id: str) -> int:
    """What the container's own server answers on 127.0.0.1:8080 of its network namespace."""
    result = exec_sync(cri, container_id, ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/count"])
    text = result.stdout.decode().strip()
    return int(text) if result.exit_code == 0 and text.isdigit() else -1


def host_pids(cri: CriSandbox, container_id: str) -> set[int]:
    """Host pids of the container's processes (its init and the init's children)."""
    response = cri.client.call(cri.client.runtime.ContainerStatus, cri.api.ContainerStatusRequest(
        container_id=container_id, verbose=True))
    init = json.loads(response.info["info"])["pid"]
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    return {init, *map(int, children)}


def test_five_pods_restored_at_once_from_one_golden_snapshot(
        cri: CriSandbox, pods: list[str], agent: AgentProcess, pod_network: PodNetwork) -> None:
    """Fast clone: a server with a listening port and in-memory state, snapshotted once,
    restored into five pods concurrently. Every clone runs and goes on from the
    snapshot's count; each has its own processes, its own files and its own port 8080
    in its own network namespace, so none disturbs another."""
    sandbox_id, pod = cri.run_pod(f"server-{uuid.uuid4().hex[:6]}", KYBERNATE_HANDLER, annotations={
        "io.kybernate.agent-socket": str(agent.socket)}, own_network=True)
    pods.append(sandbox_id)
    source = cri.start_container(sandbox_id, pod, "counter", ["sh", "-c", SERVER])
    wait_for("the source server", lambda: served_count(cri, source) >= 10)
    name = f"golden-server-{uuid.uuid4().hex[:8]}"
    golden_snapshot(cri, agent, source, name)
    at_checkpoint = count_of(cri, source)
    cri.remove_pod(sandbox_id)

    with concurrent.futures.ThreadPoolExecutor(CLONES) as pool:
        started = list(pool.map(lambda i: start_restored(cri, pods, agent, name, f"clone{i}", own_network=True),
                                range(CLONES)))
    clones = [container for _, container in started]
    for clone in clones:
        wait_for(f"clone {clone[:12]} to serve on", lambda c=clone: served_count(cri, c) > at_checkpoint)
    # Each continues from the snapshot's memory, not from 1 (a cold start would count anew).
    counts = [served_count(cri, clone) for clone in clones]
    assert all(count > at_checkpoint for count in counts), counts
    # Processes: five distinct sets on the host, the same pids inside each clone's own
    # pid namespace (CRIU restored them there).
    pid_sets = [host_pids(cri, clone) for clone in clones]
    assert all(a.isdisjoint(b) for i, a in enumerate(pid_sets) for b in pid_sets[i + 1:]), pid_sets
    inside = {exec_sync(cri, clone, ["sh", "-c", "pidof httpd"]).stdout for clone in clones}
    assert len(inside) == 1, inside
    # Files: what one clone writes, no other sees.
    assert exec_sync(cri, clones[0], ["sh", "-c", "echo mine > /tmp/mark"]).exit_code == 0
    for clone in clones[1:]:
        assert exec_sync(cri, clone, ["cat", "/tmp/mark"]).exit_code != 0
    # Network: five pod addresses in the private subnet, each pod's port its own.
    addresses = {cri.client.call(cri.client.runtime.PodSandboxStatus, cri.api.PodSandboxStatusRequest(
        pod_sandbox_id=sandbox)).status.network.ip for sandbox, _ in started}
    assert len(addresses) == CLONES and all(address.startswith(pod_network.subnet.rsplit(".", 2)[0])
                                             for address in addresses), addresses
    # Killing one clone leaves the others serving.
    cri.remove_pod(started[0][0])
    for clone in clones[1:]:
        before = served_count(cri, clone)
        wait_for(f"clone {clone[:12]} to go on", lambda c=clone, b=before: served_count(cri, c) > b)


@pytest.fixture(scope="module")
def registry_image(cri: CriSandbox) -> Iterator[str]:
    """The busybox image served by a loopback registry and pulled through CRI: CRI's
    restore from an archive pulls the checkpoint's base image by its repository digest,
    which an image imported with ctr does not have."""
    with running_registry() as registry:
        yield pull_through_registry(cri, registry.host)


def create_from_image(cri: CriSandbox, sandbox_id: str, pod: object, image: str,
                      command: list[str]) -> str:
    api, client = cri.api, cri.client
    created = client.call(client.runtime.CreateContainer, api.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=cri.container_config("counter", command, image=image, pod=pod),
        sandbox_config=pod))
    client.call(client.runtime.StartContainer, api.StartContainerRequest(container_id=created.container_id))
    return str(created.container_id)


def kubelet_checkpoint(cri: CriSandbox, pods: list[str], agent: AgentProcess, handler: str, image: str,
                       archive: Path) -> int:
    """A counter pod of `handler` from `image`, checkpointed through CRI into `archive`
    and removed; the count at the checkpoint."""
    sandbox_id, pod = cri.run_pod(f"src-{handler}-{uuid.uuid4().hex[:6]}", handler, annotations={
        "io.kybernate.agent-socket": str(agent.socket)})
    pods.append(sandbox_id)
    container_id = create_from_image(cri, sandbox_id, pod, image, ["sh", "-c", COUNTER])
    wait_for("the counter", lambda: count_of(cri, container_id) >= 5)
    cri.client.call(cri.client.runtime.CheckpointContainer, cri.api.CheckpointContainerRequest(
        container_id=container_id, location=str(archive)))
    at_checkpoint = count_of(cri, container_id)
    cri.remove_pod(sandbox_id)
    return at_checkpoint


@pytest.mark.containerd2
@pytest.mark.parametrize("source, target", [(KYBERNATE_HANDLER, KYBERNATE_HANDLER),
                                            (RUNC_HANDLER, KYBERNATE_HANDLER),
                                            (KYBERNATE_HANDLER, RUNC_HANDLER)])
def test_kubelet_archive_restores_through_create_container(
        cri: CriSandbox, pods: list[str], agent: AgentProcess, registry_image: str, tmp_path: Path,
        source: str, target: str) -> None:
    """CRI's restore (containerd 2.1: CreateContainer with the archive as the image)
    between the handlers both ways: our archive into our pod and into runc's (stock
    `runc restore` reads our images), and a runc pod's archive into ours (verified as a
    foreign checkpoint first). The counter goes on, the held file is back."""
    archive = tmp_path / "checkpoint.tar"
    at_checkpoint = kubelet_checkpoint(cri, pods, agent, source, registry_image, archive)
    sandbox_id, pod = cri.run_pod(f"dst-{target}-{uuid.uuid4().hex[:6]}", target, annotations={
        "io.kybernate.agent-socket": str(agent.socket)})
    pods.append(sandbox_id)
    restored = create_from_image(cri, sandbox_id, pod, str(archive), [])
    wait_for("the restored counter", lambda: count_of(cri, restored) > at_checkpoint + 3)
    held = exec_sync(cri, restored, ["cat", "/tmp/held"]).stdout.decode().split()
    assert held[:3] == ["1", "2", "3"], held[:5]
    if (source, target) == (RUNC_HANDLER, KYBERNATE_HANDLER):
        assert "not a Kybernate checkpoint" not in agent.log()


@pytest.mark.containerd2
def test_tampered_runc_archive_is_refused_before_anything_runs(
        cri: CriSandbox, pods: list[str], agent: AgentProcess, registry_image: str, tmp_path: Path) -> None:
    """A runc archive whose pages file lost a page: refused by the agent's foreign
    checkpoint checks, naming the file, and nothing of the container runs."""
    archive = tmp_path / "checkpoint.tar"
    kubelet_checkpoint(cri, pods, agent, RUNC_HANDLER, registry_image, archive)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(unpacked)], check=True)
    pages = max((unpacked / "checkpoint").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with pages.open("r+b") as f:
        f.truncate(pages.stat().st_size - 4096)
    tampered = tmp_path / "tampered.tar"
    subprocess.run(["tar", "-cf", str(tampered), "-C", str(unpacked), "."], check=True)
    sandbox_id, pod = cri.run_pod(f"dst-{uuid.uuid4().hex[:6]}", KYBERNATE_HANDLER, annotations={
        "io.kybernate.agent-socket": str(agent.socket)})
    pods.append(sandbox_id)
    with pytest.raises(grpc.RpcError) as refused:
        create_from_image(cri, sandbox_id, pod, str(tampered), [])
    assert f"{pages.name} holds" in (refused.value.details() or ""), refused.value.details()
    containers = cri.client.call(cri.client.runtime.ListContainers, cri.api.ListContainersRequest(
        filter=cri.api.ContainerFilter(pod_sandbox_id=sandbox_id))).containers
    assert all(c.state != cri.api.CONTAINER_RUNNING for c in containers)
