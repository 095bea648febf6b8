"""The ordinary container lifecycle, through `ctr --runtime io.containerd.kybernate.v1`.

Everything here goes through a private containerd of this module's own (restarting it
and killing shims must not disturb other modules), a real runc and real processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from kybernate.protos import shim_pb2
from kybernate.shim.start import socket_address, socket_path
from kybernate.shim.ttrpc import NAMESPACE_METADATA_KEY, TtrpcClient

from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.events import CtrEvents
from tests.support.images import BUSYBOX_IMAGE_REF
from tests.support.tasks import private_containerd, remove_container, task_pid

RUN = ("run", "--runtime", KYBERNATE_RUNTIME)
LINUX_RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
MessageT = TypeVar("MessageT", bound=Message)


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[Containerd]:
    with private_containerd(Containerd(), busybox_archive) as instance:
        yield instance


@pytest.fixture(scope="module")
def used_ids() -> list[str]:
    """Every container id this module created, for the final leftover check."""
    return []


@pytest.fixture
def new_id(ctd: Containerd, used_ids: list[str]) -> Iterator[Callable[[], str]]:
    """Makes unique container ids; whatever they left is removed after the test."""
    made: list[str] = []

    def make() -> str:
        container_id = f"kyb-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        made.append(container_id)
        used_ids.append(container_id)
        return container_id

    yield make
    for container_id in made:
        remove_container(ctd, container_id)


def run_detached(ctd: Containerd, container_id: str, *args: str) -> None:
    ctd.ctr(*RUN, "-d", BUSYBOX_IMAGE_REF, container_id, *args, check=True)
    ctd.wait_task_status(container_id, "RUNNING")


class PtyProcess:
    """A command whose stdin/stdout/stderr are a pseudo-terminal we hold the master of."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int, cols: int) -> None:
        self.master, slave = pty.openpty()
        self.resize(rows, cols)
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                        start_new_session=True)
        os.close(slave)
        self.output = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_available(self, wait: float) -> None:
        ready, _, _ = select.select([self.master], [], [], wait)
        if ready:
            try:
                self.output += os.read(self.master, 65536)
            except OSError:  # EIO: the other side is gone
                time.sleep(wait)

    def poke_until(self, pattern: bytes, poke: bytes, timeout: float = 20.0,
                   signal_each_time: int | None = None) -> None:
        """Write `poke` (after sending `signal_each_time` to the process, if given) every
        half second until `pattern` shows up in the output."""
        deadline = time.monotonic() + timeout
        start = len(self.output)
        while pattern not in self.output[start:]:
            assert time.monotonic() < deadline, f"{pattern!r} never came; got {self.output!r}"
            if signal_each_time is not None:
                self.process.send_signal(signal_each_time)
            self.write(poke)
            end = time.monotonic() + 0.5
            while time.monotonic() < end and pattern not in self.output[start:]:
                self.read_available(0.1)

    def read_until(self, pattern: bytes, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in self.output:
            assert time.monotonic() < deadline, f"{pattern!r} never came; got {self.output!r}"
            self.read_available(0.1)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            assert time.monotonic() < deadline, "process on the pty did not exit"
            self.read_available(0.1)
        self.read_available(0.2)
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def on_pty(ctd: Containerd) -> Iterator[Callable[..., PtyProcess]]:
    started: list[PtyProcess] = []

    def spawn(*ctr_args: str, rows: int = 30, cols: int = 90) -> PtyProcess:
        proc = PtyProcess(ctd.ctr_argv(*ctr_args), ctd.environment(), rows, cols)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.close()


@pytest.fixture
def events(ctd: Containerd) -> Iterator[CtrEvents]:
    with CtrEvents(ctd) as watcher:
        yield watcher


# ---- run, stdio, terminals ---------------------------------------------------------------


def test_run_rm_returns_exit_code_and_output(ctd: Containerd, new_id) -> None:
    result = ctd.ctr(*RUN, "--rm", BUSYBOX_IMAGE_REF, new_id(),
                     "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7")
    assert result.returncode == 7, result.stderr
    assert result.stdout == "to-stdout\n"
    assert "to-stderr" in result.stderr


def test_stdin_reaches_the_container(ctd: Containerd, new_id) -> None:
    text = "line one\nline two\n" + "x" * 100_000 + "\n"
    # ctr 1.7's run has no -i: without -t it always wires its stdin to the task.
    result = ctd.ctr(*RUN, "--rm", BUSYBOX_IMAGE_REF, new_id(),
                     "sh", "-c", "cat; echo end-of-input", input=text)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "end-of-input\n"


def test_terminal_output_and_resize(ctd: Containerd, new_id, on_pty) -> None:
    script = 'while read line; do [ "$line" = q ] && exit 3; stty size; tty; done'
    proc = on_pty(*RUN, "--rm", "-t", BUSYBOX_IMAGE_REF, new_id(), "sh", "-c", script,
                  rows=30, cols=90)
    proc.poke_until(b"30 90", b"\r")
    proc.read_until(b"/dev/")  # `tty` names the terminal: /dev/pts/N or /dev/console
    proc.resize(50, 120)
    # What the terminal does on a resize. Again until it shows: ctr starts watching for
    # SIGWINCH only after the task started, so the first one may come too early.
    proc.poke_until(b"50 120", b"\r", signal_each_time=signal.SIGWINCH)
    proc.write(b"q\r")
    assert proc.wait() == 3


# ---- a running task: exec, kill, pause, ps, metrics, update ---------------------------------


def test_exec_with_and_without_terminal(ctd: Containerd, new_id, on_pty) -> None:
    container_id = new_id()
    run_detached(ctd, container_id, "sleep", "600")
    result = ctd.ctr("task", "exec", "--exec-id", "plain", container_id,
                     "sh", "-c", "echo from-exec; read x; echo got-$x; exit 3", input="abc\n")
    assert result.returncode == 3, result.stderr
    assert result.stdout == "from-exec\ngot-abc\n"
    proc = on_pty("task", "exec", "-t", "--exec-id", "term", container_id,
                  "sh", "-c", "tty; stty size; exit 4", rows=33, cols=77)
    assert proc.wait() == 4
    assert b"/dev/pts/" in proc.output
    # The exec ids are free again once their processes are gone.
    again = ctd.ctr("task", "exec", "--exec-id", "plain", container_id, "true")
    assert again.returncode == 0, again.stderr
    assert ctd.task_status(container_id) == "RUNNING"


def test_kill_delivers_signals_and_all_reaches_execs(ctd: Containerd, new_id) -> None:
    container_id = new_id()
    run_detached(ctd, container_id, "sh", "-c",
                 'trap "exit 9" USR1; trap "" TERM; while true; do sleep 0.1; done')
    ctd.ctr("task", "kill", "-s", "SIGTERM", container_id, check=True)  # ignored by the trap
    time.sleep(0.5)
    assert ctd.task_status(container_id) == "RUNNING"
    ctd.ctr("task", "exec", "-d", "--exec-id", "bg", container_id, "sleep", "600", check=True)
    ctd.ctr("task", "kill", "-s", "SIGUSR1", container_id, check=True)
    ctd.wait_task_status(container_id, "STOPPED")
    deleted = ctd.ctr("task", "delete", container_id)
    assert deleted.returncode == 0, deleted.stderr
    assert "non-zero exit code 9" in deleted.stderr

    other = new_id()
    run_detached(ctd, other, "sleep", "600")
    ctd.ctr("task", "exec", "-d", "--exec-id", "bg", other, "sleep", "600", check=True)
    init_pid = task_pid(ctd, other)
    pids_before = [int(p) for p in re.findall(r"^(\d+)", ctd.ctr("task", "ps", other).stdout, re.MULTILINE)]
    assert len(pids_before) == 2 and init_pid in pids_before
    ctd.ctr("task", "kill", "-s", "SIGKILL", "--all", other, check=True)
    ctd.wait_task_status(other, "STOPPED")
    for pid in pids_before:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} survived kill --all"
    missing = ctd.ctr("task", "kill", "-s", "SIGKILL", other)
    assert missing.returncode != 0  # killing an exited task is an error, like runc's shim


async def shim_call(path: str, service: str, method: str, request: Message,
                    response_type: type[MessageT], namespace: str) -> MessageT:
    """One task API call on a shim's own socket, as `ctr shim` makes it."""
    client = await TtrpcClient.connect(path)
    try:
        return await client.call(service, method, request, response_type, timeout=10,
                                 metadata={NAMESPACE_METADATA_KEY: [namespace]})
    finally:
        await client.close()


def update_resources(ctd: Containerd, container_id: str, resources: dict) -> None:
    """UpdateTask over the shim's own socket, as `ctr shim` reaches it."""
    request = shim_pb2.UpdateTaskRequest(id=container_id)
    request.resources.type_url = LINUX_RESOURCES_TYPE_URL
    request.resources.value = json.dumps(resources).encode()
    path = socket_path(socket_address(ctd.address, ctd.namespace, container_id))
    asyncio.run(shim_call(path, "containerd.task.v2.Task", "Update", request, empty_pb2.Empty,
                          ctd.namespace))


def test_pause_resume_ps_metrics_update(ctd: Containerd, new_id) -> None:
    container_id = new_id()
    run_detached(ctd, container_id, "sh", "-c", "sleep 600 & sleep 600; true")
    ctd.ctr("task", "pause", container_id, check=True)
    ctd.wait_task_status(container_id, "PAUSED", timeout=5)
    ctd.ctr("task", "resume", container_id, check=True)
    ctd.wait_task_status(container_id, "RUNNING", timeout=5)

    ps = ctd.ctr("task", "ps", container_id, check=True).stdout
    pids = [int(p) for p in re.findall(r"^(\d+)", ps, re.MULTILINE)]
    assert task_pid(ctd, container_id) in pids and len(pids) == 3, ps

    # ctr 1.7 has no `task update`; send the shim the Update containerd would send.
    limit = 64 * 1024 * 1024
    update_resources(ctd, container_id, {"memory": {"limit": limit}})
    metrics = ctd.ctr("task", "metrics", container_id, check=True).stdout
    assert container_id in metrics
    assert re.search(r"pids.current\s+3\b", metrics), metrics
    if "memory.limit_in_bytes" in metrics:  # cgroup v1 table
        assert re.search(rf"memory.limit_in_bytes\s+{limit}\b", metrics), metrics
    else:
        json_metrics = ctd.ctr("task", "metrics", "--format", "json", container_id,
                               check=True).stdout
        assert str(limit) in json_metrics


def test_process_exiting_by_itself_is_reported(ctd: Containerd, new_id, events) -> None:
    container_id = new_id()
    ctd.ctr(*RUN, "-d", BUSYBOX_IMAGE_REF, container_id, "sh", "-c", "sleep 0.5; exit 5",
            check=True)
    ctd.wait_task_status(container_id, "STOPPED")
    exit_line = events.wait_for_line(lambda line: "/tasks/exit" in line and container_id in line)
    assert '"exit_status":5' in exit_line.replace(" ", "")
    deleted = ctd.ctr("task", "delete", container_id)
    assert deleted.returncode == 0, deleted.stderr
    assert "non-zero exit code 5" in deleted.stderr
    events.wait_for_line(lambda line: "/tasks/delete" in line and container_id in line)
    topics = events.topics_for(container_id)
    order = [t for t in topics if t in ("/tasks/create", "/tasks/start", "/tasks/exit",
                                        "/tasks/delete")]
    assert order == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], topics
    assert ctd.task_status(container_id) is None


def test_ctr_shim_state_talks_to_our_socket(ctd: Containerd, new_id) -> None:
    container_id = new_id()
    run_detached(ctd, container_id, "sleep", "600")
    result = ctd.ctr("shim", "--id", container_id, "state", check=True)
    state = json.loads(result.stdout)
    assert state["id"] == container_id
    assert state["pid"] == task_pid(ctd, container_id)
    assert state["status"] in (2, "RUNNING")
    assert state["bundle"].endswith(container_id)


def test_shim_speaks_the_task_api_its_containerd_prefers(ctd: Containerd, new_id) -> None:
    container_id = new_id()
    run_detached(ctd, container_id, "sleep", "600")
    bundle = ctd.state / "io.containerd.runtime.v2.task" / ctd.namespace / container_id
    address = socket_address(ctd.address, ctd.namespace, container_id)
    assert (bundle / "address").read_text() == address
    if ctd.release.config_version >= 3:
        # containerd 2.x keeps what `start` printed: task API v3 over ttrpc.
        bootstrap = json.loads((bundle / "bootstrap.json").read_text())
        assert bootstrap == {"version": 3, "address": address, "protocol": "ttrpc"}
    else:
        assert not (bundle / "bootstrap.json").exists()  # 1.7 knows only v2
    # Both APIs answer on the one socket, each naming its own version.
    for service, version in (("containerd.task.v2.Task", "2"), ("containerd.task.v3.Task", "3")):
        connected = asyncio.run(shim_call(socket_path(address), service, "Connect",
                                          shim_pb2.ConnectRequest(id=container_id),
                                          shim_pb2.ConnectResponse, ctd.namespace))
        assert connected.version == version
        assert connected.task_pid == task_pid(ctd, container_id)


def test_twenty_containers_concurrently(ctd: Containerd, new_id) -> None:
    ids = [new_id() for _ in range(20)]

    def run_one(container_id: str) -> subprocess.CompletedProcess[str]:
        return ctd.ctr(*RUN, "--rm", BUSYBOX_IMAGE_REF, container_id,
                       "sh", "-c", f"echo hello-{container_id}; exit 4", timeout=180)

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(run_one, ids))
    for container_id, result in zip(ids, results):
        assert result.returncode == 4, (container_id, result.stderr)
        assert result.stdout == f"hello-{container_id}\n"
    left = set(ctd.ctr("containers", "ls", "-q", check=True).stdout.split())
    assert not set(ids) & left  # --rm removed every one of them


# ---- failures: containerd restarting, the shim killed -----------------------------------


def test_containers_survive_a_containerd_restart(ctd: Containerd, new_id) -> None:
    container_id = new_id()
    run_detached(ctd, container_id, "sleep", "600")
    pid = task_pid(ctd, container_id)
    ctd.restart()
    assert ctd.task_status(container_id) == "RUNNING"
    assert task_pid(ctd, container_id) == pid
    result = ctd.ctr("task", "exec", "--exec-id", "after", container_id, "echo", "after-restart")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "after-restart\n"
    ctd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=True)
    ctd.wait_task_status(container_id, "STOPPED")
    ctd.ctr("task", "delete", container_id, check=True)
    assert ctd.task_status(container_id) is None
    assert not Path(f"/proc/{pid}").exists()


def test_killed_shim_is_cleaned_up_by_delete(ctd: Containerd, new_id, events) -> None:
    container_id = new_id()
    run_detached(ctd, container_id, "sleep", "600")
    pid = task_pid(ctd, container_id)
    shims = ctd.shims_serving(container_id)
    assert len(shims) == 1, shims
    os.kill(shims[0], signal.SIGKILL)
    exit_line = events.wait_for_line(lambda line: "/tasks/exit" in line and container_id in line)
    assert '"exit_status":137' in exit_line.replace(" ", "")
    deadline = time.monotonic() + 20
    while ctd.task_status(container_id) is not None:
        assert time.monotonic() < deadline, "task still listed after its shim died"
        time.sleep(0.1)
    # containerd ran our `delete`: the container is gone, nothing stays mounted or bound.
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not (ctd.runc_root() / container_id).exists()
    assert not ctd.mounts_under(ctd.state / "io.containerd.runtime.v2.task" / ctd.namespace / container_id)
    address = socket_address(ctd.address, ctd.namespace, container_id)
    assert not os.path.exists(socket_path(address))
    ctd.ctr("containers", "rm", container_id, check=True)


def _gone_or_zombie(pid: int) -> bool:
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return True


def test_sigterm_stops_the_shim_promptly_even_with_a_waiter(ctd: Containerd, new_id) -> None:
    """SIGTERM ends the shim (as it ends Go shims) though `ctr run` holds a Wait open;
    containerd's `delete` then removes the orphaned container."""
    container_id = new_id()
    waiter = subprocess.Popen(ctd.ctr_argv(*RUN, BUSYBOX_IMAGE_REF, container_id, "sleep", "600"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=ctd.environment())
    try:
        ctd.wait_task_status(container_id, "RUNNING")
        pid = task_pid(ctd, container_id)
        shims = ctd.shims_serving(container_id)
        assert len(shims) == 1, shims
        started = time.monotonic()
        os.kill(shims[0], signal.SIGTERM)
        deadline = started + 15
        while Path(f"/proc/{shims[0]}").exists():
            assert time.monotonic() < deadline, "shim ignored SIGTERM"
            time.sleep(0.05)
        assert waiter.wait(timeout=30) != 0  # its Wait ended with the shim
        while ctd.task_status(container_id) is not None:
            assert time.monotonic() < deadline + 15, "task still listed after its shim exited"
            time.sleep(0.1)
        # containerd's `delete` kills the orphan, and init reaps it, on their own time.
        while not _gone_or_zombie(pid):
            assert time.monotonic() < deadline + 30, f"container process {pid} outlived its shim"
            time.sleep(0.1)
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.communicate()


def test_nothing_left_behind(ctd: Containerd, used_ids: list[str]) -> None:
    """Runs last in this module: every earlier test cleaned up through containerd alone."""
    # One container of its own, so the check means something even when run alone.
    own = f"kyb-{os.getpid()}-last-{uuid.uuid4().hex[:6]}"
    used_ids.append(own)
    result = ctd.ctr(*RUN, "--rm", BUSYBOX_IMAGE_REF, own, "true")
    assert result.returncode == 0, result.stderr
    assert ctd.ctr("containers", "ls", "-q", check=True).stdout.split() == []
    deadline = time.monotonic() + 10  # a shim may take a moment to exit after its Shutdown
    while ctd.shim_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ctd.shim_pids() == []
    runc_root = ctd.runc_root()
    assert not runc_root.exists() or list(runc_root.iterdir()) == []
    assert ctd.mounts_under(ctd.base) == []
    for cgroup in ctd.namespace_cgroups():
        assert [p for p in cgroup.iterdir() if p.is_dir()] == [], f"cgroups left in {cgroup}"
    for container_id in used_ids:
        path = socket_path(socket_address(ctd.address, ctd.namespace, container_id))
        assert not os.path.exists(path), f"socket of {container_id} left at {path}"
