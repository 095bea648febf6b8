"""An established TCP connection survives checkpoint and restore through containerd.

The Kubernetes case: the network namespace exists before the container (CNI made it),
the container joins it (`ctr run --with-ns network:/var/run/netns/NAME`), and a
restored container joins it again. CRIU treats it as an external namespace
(`net[<inode>]:extRootNetNS`), dumps the connection with `tcp_established` and
rebuilds it with TCP repair inside that same namespace.

Inside the container: a busybox `nc -l` server writing what it receives to a file,
and an `nc` client fed by `tail -f` of an outbox file, both on /dev/shm (a tmpfs
that CRIU saves with the images). The server accepts one connection only, so data
written to the outbox after the restore can only arrive over the old connection.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kybernate.shim.agent_settings import ANNOTATION_AGENT_SOCKET

from tests.support.agent import AgentProcess, running_agent, temporary_workdir
from tests.support.cgroups import freezer_state
from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.images import BUSYBOX_IMAGE_REF
from tests.support.tasks import assert_task_running, private_containerd, remove_container

pytestmark = pytest.mark.integration

PORT = 9000
ANNOTATION_TCP = "io.kybernate.checkpoint.tcp-established"
ANNOTATION_EXIT = "io.kybernate.checkpoint.exit"
TCP_ESTABLISHED = "01"  # the st column of /proc/net/tcp
SERVER_AND_CLIENT = (
    "mkdir -p /dev/shm/t && : > /dev/shm/t/outbox; "
    # busybox nc quits at end of stdin: a sleep keeps the server's stdin open.
    f"sleep 1000000 | nc -l -p {PORT} > /dev/shm/t/received & "
    "sleep 0.5; "
    f"tail -f /dev/shm/t/outbox | nc 127.0.0.1 {PORT} & "
    "wait"
)


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[Containerd]:
    with private_containerd(Containerd(), busybox_archive) as instance:
        yield instance


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with temporary_workdir("kyb-tcp") as workdir, running_agent(workdir, "agent") as running:
        yield running


@pytest.fixture
def netns() -> Iterator[str]:
    """A named network namespace with loopback up, made before any container."""
    name = f"kyb-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True,
                       timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def cleanup(ctd: Containerd) -> Iterator[Callable[[str, str], str]]:
    """Registers ("container", id) or ("image", ref) for removal after the test."""
    made: list[tuple[str, str]] = []

    def register(kind: str, name: str) -> str:
        made.append((kind, name))
        return name

    yield register
    for kind, name in reversed(made):
        if kind == "container":
            remove_container(ctd, name)
        else:
            ctd.ctr("images", "rm", name, timeout=30)


def established(netns: str) -> set[tuple[int, int]]:
    """(local port, remote port) of every ESTABLISHED TCP socket in the namespace (the
    server's side is in tcp6: busybox nc listens dual-stack, so it is ::ffff:127.0.0.1)."""
    table = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/tcp", "/proc/net/tcp6"],
                           capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()
    pairs = set()
    for line in table:
        fields = line.split()
        if len(fields) > 3 and fields[3] == TCP_ESTABLISHED and ":" in fields[1]:
            pairs.add((int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)))
    return pairs


def client_connection(netns: str) -> tuple[int, int]:
    """The client side of the connection to PORT: (its ephemeral port, PORT)."""
    clients = [pair for pair in established(netns) if pair[1] == PORT]
    assert len(clients) == 1, f"expected one connection to {PORT}, found {established(netns)}"
    return clients[0]


def send(ctd: Containerd, container_id: str, text: str) -> None:
    result = ctd.ctr("task", "exec", "--exec-id", f"send-{uuid.uuid4().hex[:6]}", container_id,
                     "sh", "-c", f"echo {text} >> /dev/shm/t/outbox", timeout=30)
    assert result.returncode == 0, result.stderr


def received(ctd: Containerd, container_id: str) -> str:
    result = ctd.ctr("task", "exec", "--exec-id", f"read-{uuid.uuid4().hex[:6]}", container_id,
                     "cat", "/dev/shm/t/received", timeout=30)
    return result.stdout if result.returncode == 0 else ""


def wait_received(ctd: Containerd, container_id: str, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = received(ctd, container_id)
        if text in got.split():
            return got
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never arrived at the server of {container_id}; it got {got!r}")


def run_pair(ctd: Containerd, agent: AgentProcess, netns: str, container_id: str,
             annotations: dict[str, str]) -> None:
    args = ["run", "--runtime", KYBERNATE_RUNTIME, "-d", "--with-ns", f"network:/var/run/netns/{netns}",
            "--annotation", f"{ANNOTATION_AGENT_SOCKET}={agent.socket}"]
    for key, value in annotations.items():
        args += ["--annotation", f"{key}={value}"]
    ctd.ctr(*args, BUSYBOX_IMAGE_REF, container_id, "sh", "-c", SERVER_AND_CLIENT, check=True)
    ctd.wait_task_status(container_id, "RUNNING")
    deadline = time.monotonic() + 10
    while not any(pair[1] == PORT for pair in established(netns)):
        assert time.monotonic() < deadline, f"the client never connected: {established(netns)}"
        time.sleep(0.1)


def test_established_connection_survives_checkpoint_and_restore(
        ctd: Containerd, agent: AgentProcess, netns: str, cleanup) -> None:
    original = cleanup("container", f"kyb-tcp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    run_pair(ctd, agent, netns, original, {ANNOTATION_TCP: "true", ANNOTATION_EXIT: "true"})
    send(ctd, original, "before-checkpoint")
    wait_received(ctd, original, "before-checkpoint")
    connection = client_connection(netns)

    ref = cleanup("image", f"kybernate-test/tcp:{original}")
    result = ctd.ctr("containers", "checkpoint", "--task", original, ref, timeout=120)
    assert result.returncode == 0, result.stderr + "\n--- agent ---\n" + agent.log()[-3000:]
    ctd.wait_task_status(original, "STOPPED", timeout=15)  # dumped with exit: CRIU stopped it
    remove_container(ctd, original)

    restored = cleanup("container", f"kyb-tcp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    result = ctd.ctr("containers", "restore", "--live", restored, ref, timeout=120)
    assert result.returncode == 0, result.stderr + "\n--- agent ---\n" + agent.log()[-3000:]
    ctd.wait_task_status(restored, "RUNNING")

    # The same connection (same ports, still established), and it carries new data.
    assert client_connection(netns) == connection
    assert (PORT, connection[0]) in established(netns)
    send(ctd, restored, "after-restore")
    got = wait_received(ctd, restored, "after-restore")
    assert got.split() == ["before-checkpoint", "after-restore"], got


def test_established_connection_without_tcp_option_fails_the_dump_and_keeps_running(
        ctd: Containerd, agent: AgentProcess, netns: str, cleanup) -> None:
    """CRIU refuses an established connection unless told; the dump fails with CRIU's
    own line, and the container (its state known good) runs on with its connection."""
    container_id = cleanup("container", f"kyb-tcp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    run_pair(ctd, agent, netns, container_id, {ANNOTATION_TCP: "false"})
    connection = client_connection(netns)
    failed_logs_before = set(agent.state_dir.joinpath("failed-checkpoints").glob("*"))

    result = ctd.ctr("task", "checkpoint", container_id, timeout=120)
    assert result.returncode != 0, f"a dump of an established connection succeeded:\n{result.stdout}"
    assert "tcp-established" in result.stderr or "TCP" in result.stderr, result.stderr
    assert "Error (criu/" in result.stderr, result.stderr

    # Back as it was, and containerd's client resumed what it had paused.
    assert freezer_state(ctd, container_id) == "THAWED"
    assert_task_running(ctd, container_id)
    assert client_connection(netns) == connection
    send(ctd, container_id, "after-failed-dump")
    wait_received(ctd, container_id, "after-failed-dump")
    kept = set(agent.state_dir.joinpath("failed-checkpoints").glob("*")) - failed_logs_before
    assert any((d / "dump.log").exists() for d in kept), f"no dump.log kept; new failed dirs: {kept}"
