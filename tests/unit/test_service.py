"""TaskService driven directly (no containerd, no ttrpc) with real runc and busybox
bundles; events go to a recording publisher so their order can be checked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from kybernate.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KybernateError,
    NotFound,
    Unimplemented,
)
from kybernate.protos import events_pb2, runc_options_pb2, shim_pb2, task_types_pb2
from kybernate.runtime.reaper import Reaper
from kybernate.shim.service import TaskService

from tests.support.runc_sandbox import RuncSandbox

PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
NAMESPACE = f"kyb-test-{os.getpid()}"


class RecordingPublisher:
    """EventPublisher that keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Message]] = []

    def publish(self, topic: str, message: Message) -> None:
        self.events.append((topic, message))

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.events]

    def of(self, topic: str) -> list[Message]:
        return [message for t, message in self.events if t == topic]


class Sandbox(RuncSandbox):
    """Bundles, a private runc root and cgroups for one test; all removed afterwards."""

    def __init__(self) -> None:
        super().__init__("svc")
        # Like runc's shim, runc keeps state under the root option plus the namespace.
        self.state_root = self.root / NAMESPACE

    @property
    def runc_root(self) -> Path:
        return self.state_root

    def options(self) -> any_pb2.Any:
        opts = runc_options_pb2.Options(root=str(self.root))
        return any_pb2.Any(type_url="containerd.runc.v1.Options", value=opts.SerializeToString())

    def create_request(self, args: list[str], *, terminal: bool = False,
                       edit_spec: Callable[[dict[str, Any]], None] | None = None,
                       **stdio: str) -> shim_pb2.CreateTaskRequest:
        cid = self.new_id()
        self.cgroups.append(f"/{cid}")  # the tests read the container's cgroup by its id
        bundle = self.bundle(cid, args, terminal=terminal, cgroups_path=f"/{cid}")
        if edit_spec is not None:
            config = bundle / "config.json"
            spec = json.loads(config.read_text())
            edit_spec(spec)
            config.write_text(json.dumps(spec))
        return shim_pb2.CreateTaskRequest(id=cid, bundle=str(bundle), options=self.options(),
                                          terminal=terminal, **stdio)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    try:
        yield box
    finally:
        box.cleanup()


Body = Callable[[TaskService, RecordingPublisher, asyncio.Event], Awaitable[None]]


def run_service(body: Body, timeout: float = 60.0) -> None:
    """Run `body` against a fresh TaskService on a fresh loop with a started Reaper."""
    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        publisher = RecordingPublisher()
        shutdown = asyncio.Event()
        service = TaskService(namespace=NAMESPACE, shim_id="test",
                              publisher=publisher, reaper=reaper, shutdown=shutdown)
        try:
            await asyncio.wait_for(body(service, publisher, shutdown), timeout)
        finally:
            await service.close()
            reaper.stop()
    asyncio.run(main())


def exec_spec(args: list[str]) -> any_pb2.Any:
    process = {"args": args, "cwd": "/", "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
               "user": {"uid": 0, "gid": 0}}
    return any_pb2.Any(type_url=PROCESS_TYPE_URL, value=json.dumps(process).encode())


async def wait_for_events(publisher: RecordingPublisher, topic: str, count: int,
                          within: float = 2.0) -> None:
    """Events published from the exit task may trail the Wait that saw the exit."""
    deadline = asyncio.get_running_loop().time() + within
    while len(publisher.of(topic)) < count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"expected {count} {topic} events, got {publisher.topics()}")
        await asyncio.sleep(0.01)


def test_create_start_wait_delete(sandbox: Sandbox) -> None:
    out = sandbox.dir / "out.log"
    request = sandbox.create_request(["sh", "-c", "echo hi; exit 5"], stdout=f"file://{out}")
    cid = request.id

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        created = await service.create(request)
        assert created.pid > 0
        assert json.loads((Path(request.bundle) / "options.json").read_text())["root"] \
            == str(sandbox.root)
        connected = await service.connect(shim_pb2.ConnectRequest(id=cid))
        assert (connected.shim_pid, connected.task_pid) == (os.getpid(), created.pid)
        state = await service.state(shim_pb2.StateRequest(id=cid))
        assert (state.status, state.pid, state.bundle) == (task_types_pb2.CREATED, created.pid,
                                                          request.bundle)
        with pytest.raises(AlreadyExists):
            await service.create(request)

        waiting = asyncio.ensure_future(service.wait(shim_pb2.WaitRequest(id=cid)))
        started = await service.start(shim_pb2.StartRequest(id=cid))
        assert started.pid == created.pid
        waited = await waiting
        assert waited.exit_status == 5 and waited.exited_at.seconds > 0
        await wait_for_events(publisher, "/tasks/exit", 1)
        state = await service.state(shim_pb2.StateRequest(id=cid))
        assert (state.status, state.exit_status) == (task_types_pb2.STOPPED, 5)

        await service.shutdown(shim_pb2.ShutdownRequest(id=cid))
        assert not shutdown.is_set(), "Shutdown must wait while a container remains"
        deleted = await service.delete(shim_pb2.DeleteRequest(id=cid))
        assert (deleted.pid, deleted.exit_status) == (created.pid, 5)
        with pytest.raises(NotFound):
            await service.state(shim_pb2.StateRequest(id=cid))
        await service.shutdown(shim_pb2.ShutdownRequest(id=cid))
        assert shutdown.is_set()

        assert publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                      "/tasks/delete"]
        create_event, start_event, exit_event, delete_event = (m for _, m in publisher.events)
        assert isinstance(create_event, events_pb2.TaskCreate)
        assert (create_event.container_id, create_event.pid, create_event.io.stdout) == \
            (cid, created.pid, f"file://{out}")
        assert isinstance(start_event, events_pb2.TaskStart) and start_event.pid == created.pid
        assert isinstance(exit_event, events_pb2.TaskExit)
        assert (exit_event.container_id, exit_event.id, exit_event.pid, exit_event.exit_status) \
            == (cid, cid, created.pid, 5)
        assert isinstance(delete_event, events_pb2.TaskDelete)
        assert (delete_event.pid, delete_event.exit_status) == (created.pid, 5)
        assert out.read_text() == "hi\n"

    run_service(body)


def test_immediate_exit_is_published_after_start(sandbox: Sandbox) -> None:
    request = sandbox.create_request(["true"])

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        await service.create(request)
        await service.start(shim_pb2.StartRequest(id=request.id))
        assert (await service.wait(shim_pb2.WaitRequest(id=request.id))).exit_status == 0
        await wait_for_events(publisher, "/tasks/exit", 1)
        assert publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit"]
        with pytest.raises(NotFound, match="process already finished"):
            await service.kill(shim_pb2.KillRequest(id=request.id, signal=signal.SIGKILL))
        with pytest.raises(FailedPrecondition, match="stopped"):
            await service.exec(shim_pb2.ExecProcessRequest(id=request.id, exec_id="late",
                                                           spec=exec_spec(["true"])))
        await service.delete(shim_pb2.DeleteRequest(id=request.id))

    run_service(body)


def test_exec_exits_are_published_before_init_exit(sandbox: Sandbox) -> None:
    request = sandbox.create_request(["sleep", "1000"])
    cid = request.id

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        await service.create(request)
        init_pid = (await service.start(shim_pb2.StartRequest(id=cid))).pid
        await service.exec(shim_pb2.ExecProcessRequest(id=cid, exec_id="e1",
                                                       spec=exec_spec(["sleep", "1000"])))
        with pytest.raises(AlreadyExists):
            await service.exec(shim_pb2.ExecProcessRequest(id=cid, exec_id="e1",
                                                           spec=exec_spec(["sleep", "1"])))
        with pytest.raises(InvalidArgument):
            await service.exec(shim_pb2.ExecProcessRequest(
                id=cid, exec_id="bad", spec=any_pb2.Any(type_url=PROCESS_TYPE_URL, value=b"{")))
        exec_state = await service.state(shim_pb2.StateRequest(id=cid, exec_id="e1"))
        assert exec_state.status == task_types_pb2.CREATED
        exec_pid = (await service.start(shim_pb2.StartRequest(id=cid, exec_id="e1"))).pid
        assert exec_pid not in (0, init_pid)
        # Refused restarts must not double the bookkeeping (one exit event each, below).
        with pytest.raises(FailedPrecondition, match="cannot start a running process"):
            await service.start(shim_pb2.StartRequest(id=cid, exec_id="e1"))
        with pytest.raises(FailedPrecondition, match="cannot start a running process"):
            await service.start(shim_pb2.StartRequest(id=cid))

        pids = await service.pids(shim_pb2.PidsRequest(id=cid))
        by_pid = {p.pid: p for p in pids.processes}
        assert set(by_pid) == {init_pid, exec_pid}
        info = by_pid[exec_pid].info
        assert info.type_url == "containerd.runc.v1.ProcessDetails"
        assert runc_options_pb2.ProcessDetails.FromString(info.value).exec_id == "e1"
        assert not by_pid[init_pid].HasField("info")

        with pytest.raises(NotFound):
            await service.state(shim_pb2.StateRequest(id=cid, exec_id="nope"))
        with pytest.raises(FailedPrecondition, match="cannot delete a running process"):
            await service.delete(shim_pb2.DeleteRequest(id=cid, exec_id="e1"))

        # The init dies; the kernel kills the exec with it (private pid namespace).
        await service.kill(shim_pb2.KillRequest(id=cid, signal=signal.SIGKILL))
        init_exit = await service.wait(shim_pb2.WaitRequest(id=cid))
        exec_exit = await service.wait(shim_pb2.WaitRequest(id=cid, exec_id="e1"))
        assert init_exit.exit_status == exec_exit.exit_status == 128 + signal.SIGKILL
        await wait_for_events(publisher, "/tasks/exit", 2)
        assert publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                                      "/tasks/exec-started", "/tasks/exit", "/tasks/exit"]
        first_exit, second_exit = publisher.of("/tasks/exit")
        assert isinstance(first_exit, events_pb2.TaskExit)
        assert isinstance(second_exit, events_pb2.TaskExit)
        assert (first_exit.id, first_exit.pid) == ("e1", exec_pid)
        assert (second_exit.id, second_exit.pid) == (cid, init_pid)
        started = publisher.of("/tasks/exec-started")[0]
        assert isinstance(started, events_pb2.TaskExecStarted)
        assert (started.exec_id, started.pid) == ("e1", exec_pid)

        deleted = await service.delete(shim_pb2.DeleteRequest(id=cid, exec_id="e1"))
        assert deleted.exit_status == 128 + signal.SIGKILL
        with pytest.raises(NotFound):
            await service.state(shim_pb2.StateRequest(id=cid, exec_id="e1"))
        await service.delete(shim_pb2.DeleteRequest(id=cid))
        assert publisher.topics()[-1] == "/tasks/delete"

    run_service(body)


def test_pause_resume_update_stats(sandbox: Sandbox) -> None:
    request = sandbox.create_request(["sleep", "1000"])
    cid = request.id

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        await service.create(request)
        await service.start(shim_pb2.StartRequest(id=cid))

        await service.pause(shim_pb2.PauseRequest(id=cid))
        assert (await service.state(shim_pb2.StateRequest(id=cid))).status == task_types_pb2.PAUSED
        assert Path(f"/sys/fs/cgroup/freezer/{cid}/freezer.state").read_text().strip() == "FROZEN"
        with pytest.raises(FailedPrecondition, match="paused"):
            await service.exec(shim_pb2.ExecProcessRequest(id=cid, exec_id="e1",
                                                           spec=exec_spec(["true"])))
        with pytest.raises(FailedPrecondition, match="cannot pause a paused container"):
            await service.pause(shim_pb2.PauseRequest(id=cid))
        await service.resume(shim_pb2.ResumeRequest(id=cid))
        assert (await service.state(shim_pb2.StateRequest(id=cid))).status == task_types_pb2.RUNNING

        resources = {"pids": {"limit": 77}}
        await service.update(shim_pb2.UpdateTaskRequest(id=cid, resources=any_pb2.Any(
            type_url=RESOURCES_TYPE_URL, value=json.dumps(resources).encode())))
        assert Path(f"/sys/fs/cgroup/pids/{cid}/pids.max").read_text().strip() == "77"

        stats = (await service.stats(shim_pb2.StatsRequest(id=cid))).stats
        assert stats.type_url == "io.containerd.cgroups.v1.Metrics"
        from kybernate.protos import cgroups_v1_metrics_pb2

        metrics = cgroups_v1_metrics_pb2.Metrics.FromString(stats.value)
        assert metrics.pids.current >= 1 and metrics.pids.limit == 77

        with pytest.raises(Unimplemented, match="agent"):
            await service.checkpoint(shim_pb2.CheckpointTaskRequest(id=cid, path="/tmp/x"))
        with pytest.raises(FailedPrecondition, match="cannot delete a running process"):
            await service.delete(shim_pb2.DeleteRequest(id=cid))

        await service.kill(shim_pb2.KillRequest(id=cid, signal=signal.SIGKILL, all=True))
        assert (await service.wait(shim_pb2.WaitRequest(id=cid))).exit_status == 137
        await service.delete(shim_pb2.DeleteRequest(id=cid))
        await wait_for_events(publisher, "/tasks/delete", 1)
        assert publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/paused",
                                      "/tasks/resumed", "/tasks/exit", "/tasks/delete"]

    run_service(body)


def test_unknown_container(sandbox: Sandbox) -> None:
    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        connected = await service.connect(shim_pb2.ConnectRequest(id="no-such-container"))
        assert (connected.shim_pid, connected.task_pid) == (os.getpid(), 0)
        assert connected.version == "2"
        for call in (
            service.state(shim_pb2.StateRequest(id="no-such-container")),
            service.start(shim_pb2.StartRequest(id="no-such-container")),
            service.kill(shim_pb2.KillRequest(id="no-such-container", signal=9)),
            service.delete(shim_pb2.DeleteRequest(id="no-such-container")),
            service.wait(shim_pb2.WaitRequest(id="no-such-container")),
        ):
            with pytest.raises(NotFound, match="no-such-container"):
                await call
        with pytest.raises(InvalidArgument, match="config.json"):
            await service.create(shim_pb2.CreateTaskRequest(id="x", bundle=str(sandbox.dir)))
        with pytest.raises(InvalidArgument, match="absolute"):
            await service.create(shim_pb2.CreateTaskRequest(id="x", bundle="relative/bundle"))
        with pytest.raises(InvalidArgument, match="cannot write options"):
            await service.create(shim_pb2.CreateTaskRequest(
                id="x", bundle=str(sandbox.dir / "missing")))
        with pytest.raises(InvalidArgument, match="unsupported create options"):
            await service.create(shim_pb2.CreateTaskRequest(
                id="x", bundle=str(sandbox.dir), options=any_pb2.Any(type_url="nope.Options")))
        await service.shutdown(shim_pb2.ShutdownRequest())
        assert shutdown.is_set()
        assert publisher.events == []

    run_service(body)


def test_terminal_init_gets_resized_pty(sandbox: Sandbox) -> None:
    fifo = sandbox.dir / "console-out"
    os.mkfifo(fifo)
    request = sandbox.create_request(["sh", "-c", "stty size; exit 4"], terminal=True,
                                     stdout=str(fifo))
    # containerd's side of the stdout FIFO.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        await service.create(request)
        state = await service.state(shim_pb2.StateRequest(id=request.id))
        assert state.terminal and state.stdout == str(fifo)
        await service.resize_pty(shim_pb2.ResizePtyRequest(id=request.id, width=123, height=45))
        await service.start(shim_pb2.StartRequest(id=request.id))
        assert (await service.wait(shim_pb2.WaitRequest(id=request.id))).exit_status == 4
        await service.delete(shim_pb2.DeleteRequest(id=request.id))
        output = b""
        while True:
            try:
                chunk = os.read(reader, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            output += chunk
        assert b"45 123" in output

    try:
        run_service(body)
    finally:
        os.close(reader)


@pytest.mark.parametrize("named_by", ["checkpoint", "criu_image_path"])
def test_restore_from_runc_checkpoint(sandbox: Sandbox, named_by: str) -> None:
    """Create with a checkpoint runs nothing; Start restores with `runc restore`. The
    checkpoint comes as the request's `checkpoint` or, as containerd 1.7 sends it for a
    runtime not named io.containerd.runc.*, as the create options' criu_image_path."""
    original = sandbox.create_request(["sleep", "1000"])
    images = sandbox.dir / "images"

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        reaper = service._reaper
        await service.create(original)
        await service.start(shim_pb2.StartRequest(id=original.id))
        dumped = await reaper.run(
            ["runc", "--root", str(sandbox.runc_root), "checkpoint", "--image-path", str(images),
             "--work-path", str(sandbox.dir / "dump-work"), original.id], timeout=60)
        assert dumped.returncode == 0, dumped.stderr.decode()
        await service.wait(shim_pb2.WaitRequest(id=original.id))
        await service.delete(shim_pb2.DeleteRequest(id=original.id))

        restored = sandbox.create_request(["sleep", "1000"])
        if named_by == "checkpoint":
            restored.checkpoint = str(images)
        else:
            options = runc_options_pb2.Options(root=str(sandbox.root),
                                               criu_image_path=str(images))
            restored.options.value = options.SerializeToString()
        publisher.events.clear()
        created = await service.create(restored)
        assert created.pid == 0
        state = await service.state(shim_pb2.StateRequest(id=restored.id))
        assert (state.status, state.pid) == (task_types_pb2.CREATED, 0)
        with pytest.raises(FailedPrecondition, match="created state"):
            await service.exec(shim_pb2.ExecProcessRequest(id=restored.id, exec_id="e",
                                                           spec=exec_spec(["true"])))
        pid = (await service.start(shim_pb2.StartRequest(id=restored.id))).pid
        assert pid > 0
        state = await service.state(shim_pb2.StateRequest(id=restored.id))
        assert (state.status, state.pid) == (task_types_pb2.RUNNING, pid)
        connected = await service.connect(shim_pb2.ConnectRequest(id=restored.id))
        assert connected.task_pid == pid
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"

        await service.kill(shim_pb2.KillRequest(id=restored.id, signal=signal.SIGKILL))
        assert (await service.wait(shim_pb2.WaitRequest(id=restored.id))).exit_status == 137
        await service.delete(shim_pb2.DeleteRequest(id=restored.id))
        assert publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                      "/tasks/delete"]
        create_event = publisher.of("/tasks/create")[0]
        assert isinstance(create_event, events_pb2.TaskCreate)
        assert (create_event.pid, create_event.checkpoint) == (0, str(images))

    run_service(body, timeout=120)


def test_relative_criu_image_path_is_refused(sandbox: Sandbox) -> None:
    request = sandbox.create_request(["sleep", "1000"])
    request.options.value = runc_options_pb2.Options(
        root=str(sandbox.root), criu_image_path="images/../../etc").SerializeToString()

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        with pytest.raises(InvalidArgument, match="criu_image_path must be an absolute path"):
            await service.create(request)
        assert publisher.topics() == []
        with pytest.raises(NotFound):
            await service.state(shim_pb2.StateRequest(id=request.id))

    run_service(body)


def test_init_exit_kills_execs_in_shared_pid_namespace(sandbox: Sandbox) -> None:
    def share_host_pid_namespace(spec: dict[str, Any]) -> None:
        spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"]
                                       if ns["type"] != "pid"]

    request = sandbox.create_request(["sleep", "1000"], edit_spec=share_host_pid_namespace)
    cid = request.id

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        await service.create(request)
        await service.start(shim_pb2.StartRequest(id=cid))
        await service.exec(shim_pb2.ExecProcessRequest(id=cid, exec_id="e1",
                                                       spec=exec_spec(["sleep", "1000"])))
        exec_pid = (await service.start(shim_pb2.StartRequest(id=cid, exec_id="e1"))).pid
        # Only the init is signalled; nothing but the shim would stop the exec.
        await service.kill(shim_pb2.KillRequest(id=cid, signal=signal.SIGKILL))
        assert (await service.wait(shim_pb2.WaitRequest(id=cid))).exit_status == 137
        assert (await service.wait(shim_pb2.WaitRequest(id=cid, exec_id="e1"))).exit_status \
            == 137
        assert not Path(f"/proc/{exec_pid}").exists()
        await wait_for_events(publisher, "/tasks/exit", 2)
        assert [m.id for m in publisher.of("/tasks/exit")] == ["e1", cid]  # type: ignore[attr-defined]
        with pytest.raises(FailedPrecondition, match="not running"):
            await service.start(shim_pb2.StartRequest(id=cid, exec_id="e1"))
        await service.delete(shim_pb2.DeleteRequest(id=cid, exec_id="e1"))
        await service.delete(shim_pb2.DeleteRequest(id=cid))

    run_service(body)


def test_oom_kill_is_published(sandbox: Sandbox) -> None:
    def limit_memory(spec: dict[str, Any]) -> None:
        spec["linux"].setdefault("resources", {})["memory"] = {"limit": 24 << 20}

    # Wait a moment so the watch is in place, then grow a shell variable past the limit.
    request = sandbox.create_request(
        ["sh", "-c", "sleep 1; a=$(head -c 200000000 /dev/zero | tr '\\0' x); echo ${#a}"],
        edit_spec=limit_memory)

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        await service.create(request)
        await service.start(shim_pb2.StartRequest(id=request.id))
        await wait_for_events(publisher, "/tasks/oom", 1, within=20.0)
        oom = publisher.of("/tasks/oom")
        assert isinstance(oom[0], events_pb2.TaskOOM) and oom[0].container_id == request.id
        await service.kill(shim_pb2.KillRequest(id=request.id, signal=signal.SIGKILL, all=True))
        await service.wait(shim_pb2.WaitRequest(id=request.id))
        await service.delete(shim_pb2.DeleteRequest(id=request.id))

    run_service(body)


def test_delete_of_an_exec_that_never_started_reports_status_0(sandbox: Sandbox) -> None:
    # As runc's shim: such an exec never ran, so there is no failure to report.
    request = sandbox.create_request(["sleep", "1000"])
    cid = request.id

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        await service.create(request)
        await service.start(shim_pb2.StartRequest(id=cid))
        await service.exec(shim_pb2.ExecProcessRequest(id=cid, exec_id="idle",
                                                       spec=exec_spec(["sleep", "1000"])))
        waiting = asyncio.ensure_future(service.wait(shim_pb2.WaitRequest(id=cid, exec_id="idle")))
        await asyncio.sleep(0.1)  # the Wait is in before the Delete
        deleted = await service.delete(shim_pb2.DeleteRequest(id=cid, exec_id="idle"))
        assert (deleted.pid, deleted.exit_status) == (0, 0)
        assert (await asyncio.wait_for(waiting, 5)).exit_status == 0
        with pytest.raises(NotFound):
            await service.state(shim_pb2.StateRequest(id=cid, exec_id="idle"))
        # Nothing ran, so nothing exited: no exec-started, no exit event for it.
        assert "/tasks/exec-started" not in publisher.topics()
        assert "/tasks/exit" not in publisher.topics()
        await service.kill(shim_pb2.KillRequest(id=cid, signal=signal.SIGKILL))
        await service.wait(shim_pb2.WaitRequest(id=cid))
        await service.delete(shim_pb2.DeleteRequest(id=cid))

    run_service(body)


def test_delete_of_a_task_that_never_started(sandbox: Sandbox) -> None:
    request = sandbox.create_request(["sleep", "1000"])

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        created = await service.create(request)
        waiting = asyncio.ensure_future(service.wait(shim_pb2.WaitRequest(id=request.id)))
        deleted = await service.delete(shim_pb2.DeleteRequest(id=request.id))
        assert (deleted.pid, deleted.exit_status) == (created.pid, 255)
        assert (await asyncio.wait_for(waiting, 5)).exit_status == 255
        # runc delete killed the waiting init; its exit must not trail TaskDelete.
        await asyncio.sleep(0.5)
        assert not Path(f"/proc/{created.pid}").exists()
        assert publisher.topics() == ["/tasks/create", "/tasks/delete"]

    run_service(body)


def test_failed_create_leaves_nothing_behind(sandbox: Sandbox) -> None:
    request = sandbox.create_request(["/no/such/binary"])

    async def body(service: TaskService, publisher: RecordingPublisher,
                   shutdown: asyncio.Event) -> None:
        with pytest.raises(KybernateError, match="no/such/binary"):
            await service.create(request)
        assert (await service.connect(shim_pb2.ConnectRequest(id=request.id))).task_pid == 0
        assert not (sandbox.runc_root / request.id).exists()
        assert publisher.events == []
        await service.shutdown(shim_pb2.ShutdownRequest())
        assert shutdown.is_set()

    run_service(body)
