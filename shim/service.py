"""The `containerd.task.v2.Task` service, with the semantics of runc's shim.

One TaskService serves every container of its shim (a pod shares one shim), keyed
by container id. Operations on processes go through the state machines of
`kybernate.runtime.process`; this module adds what spans processes:

- Events, in the order containerd requires: /tasks/create after Create, /tasks/start
  and /tasks/exec-started before any /tasks/exit of that pid, the exits of exec
  processes before the exit of their init, /tasks/delete last.
- Exits: one background task consumes a reaper subscription and matches each pid
  to a started process. An exit whose pid belongs to a start still in flight (the
  process died before `runc start`/`runc exec` returned) is held and handled when
  that start has published its event, so containerd never sees an exit before the
  start. When an init exits, its container's remaining processes are killed (unless
  a private pid namespace lets the kernel do it) and its exit is published once
  every running exec's exit has been.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from google.protobuf import empty_pb2, timestamp_pb2
from kybernate.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KybernateError,
    NotFound,
    Unimplemented,
)
from kybernate.protos import (
    events_pb2,
    runc_options_pb2,
    shim_pb2,
    shim_v3_pb2,
    task_types_pb2,
    typeurl,
)
from kybernate.runtime.container import Container, ProcessSettings
from kybernate.runtime.process import (
    ExecProcess,
    InitProcess,
    Process,
    ProcessState,
    RestoreStrategy,
    Stdio,
)
from kybernate.runtime.runc import Runc
from kybernate.shim.options import (
    CheckpointRequestOptions,
    decode_checkpoint_options,
    decode_create_options,
    save_options,
)

if TYPE_CHECKING:
    import datetime

    from google.protobuf.message import Message
    from kybernate.runtime.reaper import Exit, Reaper
    from kybernate.shim.ttrpc import CallContext, TtrpcServer

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.task.v2.Task"
SERVICE_NAME_V3 = shim_v3_pb2.DESCRIPTOR.services_by_name["Task"].full_name
#: ConnectResponse.version by the service a call came in on: the API version spoken.
TASK_API_VERSIONS = {SERVICE_NAME: "2", SERVICE_NAME_V3: "3"}

_STATUS = {
    ProcessState.CREATED: task_types_pb2.CREATED,
    ProcessState.RUNNING: task_types_pb2.RUNNING,
    ProcessState.PAUSING: task_types_pb2.PAUSING,
    ProcessState.PAUSED: task_types_pb2.PAUSED,
    ProcessState.CHECKPOINTING: task_types_pb2.RUNNING,  # never reported: see reported_state
    ProcessState.STOPPED: task_types_pb2.STOPPED,
    ProcessState.DELETED: task_types_pb2.UNKNOWN,
}


class EventPublisher(Protocol):
    """Forwards events to containerd; non-blocking, keeps order."""

    def publish(self, topic: str, message: Message) -> None: ...


class Checkpointer(Protocol):
    """Performs a checkpoint of a container (the agent's pipeline).

    Called with the init's lock held and its state checked (running or paused); it
    must not call the init's locked operations.
    """

    async def checkpoint(self, container: Container, path: str,
                         options: CheckpointRequestOptions) -> None: ...


class GpuPauseHooks(Protocol):
    """GPU locking around Pause/Resume: a frozen CUDA process cannot be locked, so the
    lock comes before the freeze and the unlock after the thaw."""

    async def before_pause(self, container: Container) -> None: ...

    async def pause_failed(self, container: Container) -> None: ...

    async def after_resume(self, container: Container) -> None: ...


class RestoreSource(Protocol):
    """Decides at Create what the init restores from ("" = an ordinary create): the
    request's checkpoint, or one the container's spec names."""

    def checkpoint_for(self, request: shim_pb2.CreateTaskRequest) -> str: ...


def timestamp(at: datetime.datetime | None) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp (zero for None, as Go's zero time marshals)."""
    stamp = timestamp_pb2.Timestamp()
    if at is not None:
        stamp.FromDatetime(at)
    return stamp


@dataclasses.dataclass
class _PendingStart:
    """Exits seen while a Create or Start is in flight, by pid."""

    exits: dict[int, list[Exit]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _ExecCount:
    """Exec processes of one container that started and have not had their exit
    published; the init's exit waits for zero."""

    running: int = 0
    drained: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def add(self) -> None:
        self.running += 1
        self.drained.clear()

    def remove(self) -> None:
        self.running = max(0, self.running - 1)
        if self.running == 0:
            self.drained.set()


class TaskService:
    """containerd.task.v2.Task for every container of this shim."""

    def __init__(self, *, namespace: str, shim_id: str, publisher: EventPublisher,
                 reaper: Reaper, shutdown: asyncio.Event,
                 checkpointer: Checkpointer | None = None,
                 restore_strategy: RestoreStrategy | None = None,
                 gpu_hooks: GpuPauseHooks | None = None,
                 restore_source: RestoreSource | None = None) -> None:
        self.namespace = namespace
        self.shim_id = shim_id
        self._publisher = publisher
        self._reaper = reaper
        self._shutdown = shutdown
        self._checkpointer = checkpointer
        self._restore_strategy = restore_strategy
        self._gpu_hooks = gpu_hooks
        self._restore_source = restore_source
        self._containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        # Exit bookkeeping, the asyncio counterpart of runc's shim's lifecycle lock:
        # everything below is touched only between awaits.
        self._running: dict[int, list[tuple[Container, Process]]] = {}
        self._pending_starts: list[_PendingStart] = []
        self._init_exited: set[str] = set()
        self._exec_counts: dict[str, _ExecCount] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._subscription = reaper.subscribe()
        self._exit_loop = asyncio.get_running_loop().create_task(
            self._consume_exits(), name=f"exits-{shim_id}")

    # -- wiring ---------------------------------------------------------------------

    def register(self, server: TtrpcServer) -> None:
        """Route every Task RPC of `server`, in task API v2 and v3, to this service.

        containerd 1.7 calls v2; 2.x calls v3 when `start` said so (bootstrap.py), v2
        otherwise. v3's messages are v2's field for field under another package name
        (test_protos checks both against containerd's), so v3 payloads decode with the
        v2 classes and one set of handlers serves both."""
        methods: dict[str, tuple[type[Message], Callable[..., Awaitable[Message]]]] = {
            "State": (shim_pb2.StateRequest, self.state),
            "Create": (shim_pb2.CreateTaskRequest, self.create),
            "Start": (shim_pb2.StartRequest, self.start),
            "Delete": (shim_pb2.DeleteRequest, self.delete),
            "Pids": (shim_pb2.PidsRequest, self.pids),
            "Pause": (shim_pb2.PauseRequest, self.pause),
            "Resume": (shim_pb2.ResumeRequest, self.resume),
            "Checkpoint": (shim_pb2.CheckpointTaskRequest, self.checkpoint),
            "Kill": (shim_pb2.KillRequest, self.kill),
            "Exec": (shim_pb2.ExecProcessRequest, self.exec),
            "ResizePty": (shim_pb2.ResizePtyRequest, self.resize_pty),
            "CloseIO": (shim_pb2.CloseIORequest, self.close_io),
            "Update": (shim_pb2.UpdateTaskRequest, self.update),
            "Wait": (shim_pb2.WaitRequest, self.wait),
            "Stats": (shim_pb2.StatsRequest, self.stats),
            "Connect": (shim_pb2.ConnectRequest, self.connect),
            "Shutdown": (shim_pb2.ShutdownRequest, self.shutdown),
        }
        for method, (request_type, handler) in methods.items():
            server.register(SERVICE_NAME, method, request_type, handler)
        v3 = shim_v3_pb2.DESCRIPTOR.services_by_name["Task"]
        for rpc in v3.methods:
            request_type, handler = methods[rpc.name]
            if rpc.input_type.name != request_type.DESCRIPTOR.name:
                raise TypeError(f"task API v3 {rpc.name} takes {rpc.input_type.full_name}, "
                                f"not a {request_type.DESCRIPTOR.name}")
            server.register(v3.full_name, rpc.name, request_type, handler)

    async def close(self) -> None:
        """Stop consuming exits (the shim is going away)."""
        self._subscription.close()
        self._exit_loop.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(self._exit_loop, *self._background, return_exceptions=True)

    # -- lifecycle RPCs -------------------------------------------------------------

    async def create(self, request: shim_pb2.CreateTaskRequest,
                     ctx: CallContext | None = None) -> shim_pb2.CreateTaskResponse:
        if request.id in self._containers or request.id in self._creating:
            raise AlreadyExists(f"container {request.id} already exists in this shim")
        if not request.bundle or not os.path.isabs(request.bundle):
            raise InvalidArgument(f"bundle must be an absolute path, got {request.bundle!r}")
        options = decode_create_options(request.options if request.HasField("options") else None)
        if not request.checkpoint and options.criu_image_path:
            # containerd turns criu_image_path into `checkpoint` only for runc's own
            # runtime names (1.7) or not at all for the older CreateOptions: do it here.
            if not os.path.isabs(options.criu_image_path):
                raise InvalidArgument("criu_image_path must be an absolute path, got "
                                      f"{options.criu_image_path!r}")
            request = _with_checkpoint(request, options.criu_image_path)
        if self._restore_source is not None:
            checkpoint = self._restore_source.checkpoint_for(request)
            if checkpoint != request.checkpoint:
                request = _with_checkpoint(request, checkpoint)
        self._creating.add(request.id)
        pending = self._begin_start()
        try:
            # The shim's `delete` command reads these to find runc's binary and root.
            try:
                save_options(request.bundle, options)
            except OSError as err:
                raise InvalidArgument(f"cannot write options into bundle {request.bundle}: "
                                      f"{err.strerror}") from None
            runc = Runc(self._reaper, binary=options.runc_binary(),
                        root=options.runc_root(self.namespace),
                        systemd_cgroup=options.systemd_cgroup, log_dir=request.bundle)
            settings = ProcessSettings(
                io_uid=options.io_uid, io_gid=options.io_gid,
                no_pivot_root=options.no_pivot_root, no_new_keyring=options.no_new_keyring,
                criu_work_path=options.criu_work_path)
            container = await Container.create(
                request, namespace=self.namespace, runc=runc, settings=settings,
                on_oom=self._publish_oom, restore_strategy=self._restore_strategy)
            self._containers[request.id] = container
            self._publish("/tasks/create", events_pb2.TaskCreate(
                container_id=request.id, bundle=request.bundle, rootfs=list(request.rootfs),
                io=events_pb2.TaskIO(stdin=request.stdin, stdout=request.stdout,
                                     stderr=request.stderr, terminal=request.terminal),
                checkpoint=request.checkpoint, pid=container.pid))
            await self._end_start(pending, container, container.init)
            return shim_pb2.CreateTaskResponse(pid=container.pid)
        finally:
            self._drop_pending(pending)
            self._creating.discard(request.id)

    async def start(self, request: shim_pb2.StartRequest,
                    ctx: CallContext | None = None) -> shim_pb2.StartResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        is_exec = isinstance(process, ExecProcess)
        if is_exec:
            if container.id in self._init_exited:
                raise FailedPrecondition(f"container {container.id} init process is not running")
            self._exec_count(container.id).add()
        else:
            # The init's pid is tracked since Create: take it out so that an exit
            # during Start is held until TaskStart is out.
            self._untrack(container, process)
        pending = self._begin_start()
        try:
            try:
                pid = await container.start(request.exec_id)
            except BaseException:
                if is_exec:
                    self._exec_count(container.id).remove()
                await self._end_start(pending, container, process)
                raise
            if is_exec:
                self._publish("/tasks/exec-started", events_pb2.TaskExecStarted(
                    container_id=container.id, exec_id=request.exec_id, pid=pid))
            else:
                self._publish("/tasks/start", events_pb2.TaskStart(
                    container_id=container.id, pid=pid))
            await self._end_start(pending, container, process)
            return shim_pb2.StartResponse(pid=pid)
        finally:
            self._drop_pending(pending)

    async def delete(self, request: shim_pb2.DeleteRequest,
                     ctx: CallContext | None = None) -> shim_pb2.DeleteResponse:
        container = self._container(request.id)
        if request.exec_id:
            process = container.process(request.exec_id)
            exit_ = await container.delete_process(request.exec_id)
            self._untrack(container, process)
        else:
            exit_ = await container.delete()
            self._containers.pop(container.id, None)
            for process in [container.init, *container.exec_processes()]:
                self._untrack(container, process)
            self._init_exited.discard(container.id)
            self._exec_counts.pop(container.id, None)
            self._publish("/tasks/delete", events_pb2.TaskDelete(
                container_id=container.id, pid=exit_.pid, exit_status=exit_.status,
                exited_at=timestamp(exit_.at)))
        return shim_pb2.DeleteResponse(pid=exit_.pid, exit_status=exit_.status,
                                       exited_at=timestamp(exit_.at))

    async def exec(self, request: shim_pb2.ExecProcessRequest,
                   ctx: CallContext | None = None) -> empty_pb2.Empty:
        container = self._container(request.id)
        await container.add_exec(
            request.exec_id, request.spec,
            Stdio(request.stdin, request.stdout, request.stderr, request.terminal))
        self._publish("/tasks/exec-added", events_pb2.TaskExecAdded(
            container_id=container.id, exec_id=request.exec_id))
        return empty_pb2.Empty()

    async def wait(self, request: shim_pb2.WaitRequest,
                   ctx: CallContext | None = None) -> shim_pb2.WaitResponse:
        process = self._container(request.id).process(request.exec_id)
        exit_ = await process.wait()
        return shim_pb2.WaitResponse(exit_status=exit_.status, exited_at=timestamp(exit_.at))

    async def kill(self, request: shim_pb2.KillRequest,
                   ctx: CallContext | None = None) -> empty_pb2.Empty:
        if request.signal == 0 or request.signal >= signal.NSIG:
            raise InvalidArgument(f"invalid signal {request.signal}")
        process = self._container(request.id).process(request.exec_id)
        if isinstance(process, InitProcess):
            await process.kill(request.signal, all=request.all)
        else:
            assert isinstance(process, ExecProcess)
            await process.kill(request.signal)
        return empty_pb2.Empty()

    async def pause(self, request: shim_pb2.PauseRequest,
                    ctx: CallContext | None = None) -> empty_pb2.Empty:
        container = self._container(request.id)
        hooks = self._gpu_hooks if container.init.state is ProcessState.RUNNING else None
        if hooks is not None:
            await hooks.before_pause(container)
        try:
            await container.init.pause()
        except BaseException:
            if hooks is not None:
                await hooks.pause_failed(container)
            raise
        self._publish("/tasks/paused", events_pb2.TaskPaused(container_id=container.id))
        return empty_pb2.Empty()

    async def resume(self, request: shim_pb2.ResumeRequest,
                     ctx: CallContext | None = None) -> empty_pb2.Empty:
        container = self._container(request.id)
        await container.init.resume()
        # Thawed is resumed, whatever the unlock says next.
        self._publish("/tasks/resumed", events_pb2.TaskResumed(container_id=container.id))
        if self._gpu_hooks is not None:
            await self._gpu_hooks.after_resume(container)
        return empty_pb2.Empty()

    async def checkpoint(self, request: shim_pb2.CheckpointTaskRequest,
                         ctx: CallContext | None = None) -> empty_pb2.Empty:
        container = self._container(request.id)
        checkpointer = self._checkpointer
        if checkpointer is None:
            raise Unimplemented("checkpoint needs the kybernate agent")
        if not request.path:
            raise InvalidArgument("checkpoint path must not be empty")
        options = decode_checkpoint_options(
            request.options if request.HasField("options") else None)
        await container.init.checkpoint(
            lambda: checkpointer.checkpoint(container, request.path, options))
        self._publish("/tasks/checkpointed", events_pb2.TaskCheckpointed(
            container_id=container.id, checkpoint=request.path))
        return empty_pb2.Empty()

    async def shutdown(self, request: shim_pb2.ShutdownRequest,
                       ctx: CallContext | None = None) -> empty_pb2.Empty:
        # Another container of the pod may still be served: then this is a no-op.
        if not self._containers and not self._creating:
            self._shutdown.set()
        return empty_pb2.Empty()

    # -- queries and adjustments ------------------------------------------------------

    async def state(self, request: shim_pb2.StateRequest,
                    ctx: CallContext | None = None) -> shim_pb2.StateResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        return shim_pb2.StateResponse(
            id=process.id, bundle=str(container.bundle), pid=process.pid,
            status=_STATUS[process.reported_state], stdin=process.stdio.stdin,
            stdout=process.stdio.stdout, stderr=process.stdio.stderr,
            terminal=process.stdio.terminal, exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at), exec_id=request.exec_id)

    async def pids(self, request: shim_pb2.PidsRequest,
                   ctx: CallContext | None = None) -> shim_pb2.PidsResponse:
        container = self._container(request.id)
        processes = []
        for pid, exec_id in await container.pids():
            info = task_types_pb2.ProcessInfo(pid=pid)
            if exec_id:
                info.info.CopyFrom(typeurl.pack(runc_options_pb2.ProcessDetails(exec_id=exec_id)))
            processes.append(info)
        return shim_pb2.PidsResponse(processes=processes)

    async def stats(self, request: shim_pb2.StatsRequest,
                    ctx: CallContext | None = None) -> shim_pb2.StatsResponse:
        return shim_pb2.StatsResponse(stats=self._container(request.id).stats())

    async def update(self, request: shim_pb2.UpdateTaskRequest,
                     ctx: CallContext | None = None) -> empty_pb2.Empty:
        await self._container(request.id).update(request.resources)
        return empty_pb2.Empty()

    async def resize_pty(self, request: shim_pb2.ResizePtyRequest,
                         ctx: CallContext | None = None) -> empty_pb2.Empty:
        process = self._container(request.id).process(request.exec_id)
        await process.resize(request.width, request.height)
        return empty_pb2.Empty()

    async def close_io(self, request: shim_pb2.CloseIORequest,
                       ctx: CallContext | None = None) -> empty_pb2.Empty:
        process = self._container(request.id).process(request.exec_id)
        if request.stdin:
            await process.close_io()
        return empty_pb2.Empty()

    async def connect(self, request: shim_pb2.ConnectRequest,
                      ctx: CallContext | None = None) -> shim_pb2.ConnectResponse:
        # containerd asks before it knows whether the task exists: 0, not an error.
        container = self._containers.get(request.id)
        version = TASK_API_VERSIONS.get(ctx.service, "2") if ctx is not None else "2"
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(),
                                        task_pid=container.pid if container else 0,
                                        version=version)

    # -- exits ------------------------------------------------------------------------

    def _begin_start(self) -> _PendingStart:
        """From now until `_end_start`, exits are also kept for the starting process."""
        pending = _PendingStart()
        self._pending_starts.append(pending)
        return pending

    def _drop_pending(self, pending: _PendingStart) -> None:
        if pending in self._pending_starts:
            self._pending_starts.remove(pending)

    async def _end_start(self, pending: _PendingStart, container: Container,
                         process: Process) -> None:
        """The start's event is out: track the pid, or handle the exit it already had."""
        self._drop_pending(pending)
        pid = process.pid
        if pid == 0 or self._exit_handled(container, process):
            return  # nothing runs (restore pending, failed exec), or a refused restart
        held = pending.exits.get(pid, [])
        if held:
            for exit_ in held:
                await self._dispatch_exit(exit_, container, process)
            return
        entries = self._running.setdefault(pid, [])
        if not any(tracked is process for _, tracked in entries):
            entries.append((container, process))

    def _exit_handled(self, container: Container, process: Process) -> bool:
        """Whether this process's exit was already taken in hand."""
        if isinstance(process, InitProcess):
            return container.id in self._init_exited
        return process.exit is not None

    def _untrack(self, container: Container, process: Process) -> None:
        entries = self._running.get(process.pid)
        if not entries:
            return
        kept = [(c, p) for c, p in entries if p is not process]
        if kept:
            self._running[process.pid] = kept
        else:
            del self._running[process.pid]

    async def _consume_exits(self) -> None:
        async for exit_ in self._subscription:
            try:
                await self._on_exit(exit_)
            except Exception:  # one bad exit must not stop the others
                log.exception("handling the exit of pid %d", exit_.pid)

    async def _on_exit(self, exit_: Exit) -> None:
        for pending in self._pending_starts:
            pending.exits.setdefault(exit_.pid, []).append(exit_)
        # If a pid was recycled we cannot tell which one died: treat all as exited.
        for container, process in self._running.pop(exit_.pid, []):
            await self._dispatch_exit(exit_, container, process)

    async def _dispatch_exit(self, exit_: Exit, container: Container, process: Process) -> None:
        if isinstance(process, InitProcess):
            self._init_exited.add(container.id)
            task = asyncio.get_running_loop().create_task(
                self._finish_init_exit(exit_, container, process),
                name=f"init-exit-{container.id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            await self._publish_exit(exit_, container, process)

    async def _finish_init_exit(self, exit_: Exit, container: Container,
                                init: InitProcess) -> None:
        """Kill what the init left behind, wait for the execs' exits, then publish."""
        try:
            if init.state is ProcessState.DELETED:
                return  # a created task deleted before it ran: TaskDelete said it all
            if container.kill_all_on_init_exit:
                try:
                    await init.kill(signal.SIGKILL, all=True)
                except KybernateError as err:
                    log.warning("container %s: killing the init's children: %s",
                                container.id, err)
            counts = self._exec_count(container.id)
            await counts.drained.wait()
            await self._publish_exit(exit_, container, init)
        except Exception:  # a background task must not die silently
            log.exception("container %s: handling the init's exit", container.id)

    async def _publish_exit(self, exit_: Exit, container: Container, process: Process) -> None:
        await process.set_exited(exit_.status, exit_.at)
        # An exit that lands after Delete (runc delete killed a created process) is
        # not news to containerd and must not follow its TaskDelete.
        if process.state is not ProcessState.DELETED:
            self._publish("/tasks/exit", events_pb2.TaskExit(
                container_id=container.id, id=process.id, pid=exit_.pid,
                exit_status=exit_.status, exited_at=timestamp(process.exited_at or exit_.at)))
        if isinstance(process, ExecProcess):
            self._exec_count(container.id).remove()

    def _exec_count(self, container_id: str) -> _ExecCount:
        counts = self._exec_counts.get(container_id)
        if counts is None:
            counts = self._exec_counts[container_id] = _ExecCount()
            counts.drained.set()
        return counts

    # -- helpers ----------------------------------------------------------------------

    def _container(self, id: str) -> Container:
        container = self._containers.get(id)
        if container is None:
            raise NotFound(f"container {id} not created")
        return container

    def _publish(self, topic: str, message: Message) -> None:
        self._publisher.publish(topic, message)

    def _publish_oom(self, container_id: str) -> None:
        self._publish("/tasks/oom", events_pb2.TaskOOM(container_id=container_id))


def _with_checkpoint(request: shim_pb2.CreateTaskRequest,
                     checkpoint: str) -> shim_pb2.CreateTaskRequest:
    """A copy of the request that restores from `checkpoint`."""
    copy = shim_pb2.CreateTaskRequest()
    copy.CopyFrom(request)
    copy.checkpoint = checkpoint
    return copy
