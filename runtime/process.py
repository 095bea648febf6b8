"""Container processes (the init and the execs) as explicit state machines.

Every operation on a process is first looked up in a transition table keyed by
(kind of process, current state, operation). The table says whether the operation
proceeds (and which state it leads to), is refused (with the error and message
runc's shim gives), or is a silent no-op. Nothing here decides legality elsewhere:
`transition_rule` is the single source of truth, and the unit tests walk it
exhaustively.

Operations on one process are serialized by a per-process lock, as in containerd's
shim; `wait()` and `state` never take it.

Restore has its own seam: an `InitProcess` created with a checkpoint directory runs
nothing at create (pid 0) and its `start()` hands over to a `RestoreStrategy`. The
default one is `runc restore --detach`; the checkpoint/agent work plugs in another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import logging
import os
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from kybernate.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    KybernateError,
    NotFound,
)
from kybernate.runtime.console import ConsoleSocket, resize
from kybernate.runtime.reaper import Exit
from kybernate.runtime.runc import ContainerExists, ContainerNotFound, ProcessNotFound, Runc
from kybernate.runtime.stdio import ProcessIO

log = logging.getLogger(__name__)

#: The exit status containerd reports when the real one is unknown.
UNKNOWN_EXIT_STATUS = 255
#: What runc's shim reports for an exec deleted before it started: it never ran.
NEVER_STARTED_EXEC_STATUS = 0
#: How long Delete waits for stdout/stderr to be copied out (containerd: 2 s).
IO_DRAIN_TIMEOUT_S = 2.0
#: How long runc may take to hand the pty master over the console socket.
CONSOLE_TIMEOUT_S = 30.0


class ProcessState(enum.Enum):
    """Lifecycle states; the values are what runc's shim reports as a status string."""

    CREATED = "created"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    #: The node agent is checkpointing the container; Kill aborts the checkpoint.
    CHECKPOINTING = "checkpointing"
    STOPPED = "stopped"
    DELETED = "deleted"


class ProcessKind(enum.Enum):
    """Which transition table applies."""

    INIT = "init"
    #: An init created from a checkpoint whose restore has not run yet.
    RESTORING_INIT = "restoring init"
    EXEC = "exec"


class Operation(enum.Enum):
    """Everything that can be asked of a process; the value reads in error messages."""

    START = "start"
    KILL = "kill"
    #: Signal every process of the container (runc kill --all).
    KILL_ALL = "kill all processes of"
    DELETE = "delete"
    PAUSE = "pause"
    RESUME = "resume"
    UPDATE = "update"
    CHECKPOINT = "checkpoint"
    RESIZE = "resize"
    CLOSE_IO = "close the stdin of"
    EXEC = "exec in"
    #: The reaper saw the process exit.
    SET_EXITED = "set exited"


@dataclasses.dataclass(frozen=True)
class Proceed:
    """Run the operation. `during`: state while it runs; `then`: state after success
    (None keeps the state). A failed operation returns to the state it started from."""

    then: ProcessState | None = None
    during: ProcessState | None = None


@dataclasses.dataclass(frozen=True)
class Refuse:
    """The operation is illegal in this state: raise `error(message)`."""

    error: type[KybernateError]
    message: str

    def exception(self) -> KybernateError:
        return self.error(self.message)


@dataclasses.dataclass(frozen=True)
class Ignore:
    """The operation is a silent no-op in this state (a late duplicate exit)."""


Rule = Proceed | Refuse | Ignore

S = ProcessState
Op = Operation


def _no(message: str) -> Refuse:
    return Refuse(FailedPrecondition, message)


_PROCESS_FINISHED = Refuse(NotFound, "process already finished")

_INIT_TABLE: dict[ProcessState, dict[Operation, Rule]] = {
    S.CREATED: {
        Op.START: Proceed(then=S.RUNNING),
        Op.KILL: Proceed(),
        Op.KILL_ALL: Proceed(),
        Op.DELETE: Proceed(then=S.DELETED),
        Op.PAUSE: _no("cannot pause task in created state"),
        Op.RESUME: _no("cannot resume task in created state"),
        Op.UPDATE: Proceed(),
        Op.CHECKPOINT: _no("cannot checkpoint a task in created state"),
        Op.RESIZE: Proceed(),
        Op.CLOSE_IO: Proceed(),
        Op.EXEC: Proceed(),
        Op.SET_EXITED: Proceed(then=S.STOPPED),
    },
    S.RUNNING: {
        Op.START: _no("cannot start a running process"),
        Op.KILL: Proceed(),
        Op.KILL_ALL: Proceed(),
        Op.DELETE: _no("cannot delete a running process"),
        Op.PAUSE: Proceed(during=S.PAUSING, then=S.PAUSED),
        Op.RESUME: _no("cannot resume a running process"),
        Op.UPDATE: Proceed(),
        Op.CHECKPOINT: Proceed(during=S.CHECKPOINTING),
        Op.RESIZE: Proceed(),
        Op.CLOSE_IO: Proceed(),
        Op.EXEC: Proceed(),
        Op.SET_EXITED: Proceed(then=S.STOPPED),
    },
    # Only seen from outside the lock (status queries); an exit may still land here.
    S.PAUSING: {
        Op.START: _no("cannot start a pausing process"),
        Op.KILL: Proceed(),
        Op.KILL_ALL: Proceed(),
        Op.DELETE: _no("cannot delete a pausing process"),
        Op.PAUSE: _no("cannot pause a pausing process"),
        Op.RESUME: _no("cannot resume a pausing process"),
        Op.UPDATE: _no("cannot update a pausing process"),
        Op.CHECKPOINT: _no("cannot checkpoint a pausing process"),
        Op.RESIZE: Proceed(),
        Op.CLOSE_IO: Proceed(),
        Op.EXEC: _no("cannot exec in a pausing state"),
        Op.SET_EXITED: Proceed(then=S.STOPPED),
    },
    S.PAUSED: {
        Op.START: _no("cannot start a paused process"),
        Op.KILL: Proceed(),
        Op.KILL_ALL: Proceed(),
        Op.DELETE: _no("cannot delete a paused process"),
        Op.PAUSE: _no("cannot pause a paused container"),
        Op.RESUME: Proceed(then=S.RUNNING),
        Op.UPDATE: Proceed(),
        Op.CHECKPOINT: Proceed(during=S.CHECKPOINTING),
        Op.RESIZE: Proceed(),
        Op.CLOSE_IO: Proceed(),
        Op.EXEC: _no("cannot exec in a paused state"),
        Op.SET_EXITED: Proceed(then=S.STOPPED),
    },
    # The checkpoint runs without the process lock, so every operation is decided at
    # once: a kill aborts the checkpoint and goes through, whatever the agent is doing.
    S.CHECKPOINTING: {
        Op.START: _no("cannot start a process being checkpointed"),
        Op.KILL: Proceed(),
        Op.KILL_ALL: Proceed(),
        Op.DELETE: _no("cannot delete a process being checkpointed"),
        Op.PAUSE: _no("cannot pause a process being checkpointed"),
        Op.RESUME: _no("cannot resume a process being checkpointed"),
        Op.UPDATE: _no("cannot update a process being checkpointed"),
        Op.CHECKPOINT: _no("a checkpoint of this process is already in progress"),
        Op.RESIZE: Proceed(),
        Op.CLOSE_IO: Proceed(),
        Op.EXEC: _no("cannot exec in a process being checkpointed"),
        Op.SET_EXITED: Proceed(then=S.STOPPED),
    },
    S.STOPPED: {
        Op.START: _no("cannot start a stopped process"),
        Op.KILL: _PROCESS_FINISHED,
        # Leftover processes of a shared pid namespace may outlive the init.
        Op.KILL_ALL: Proceed(),
        Op.DELETE: Proceed(then=S.DELETED),
        Op.PAUSE: _no("cannot pause a stopped container"),
        Op.RESUME: _no("cannot resume a stopped container"),
        Op.UPDATE: _no("cannot update a stopped container"),
        Op.CHECKPOINT: _no("cannot checkpoint a stopped container"),
        Op.RESIZE: _no("cannot resize a stopped container"),
        Op.CLOSE_IO: Proceed(),
        Op.EXEC: _no("cannot exec in a stopped state"),
        Op.SET_EXITED: Ignore(),
    },
    S.DELETED: {
        **{op: _no(f"cannot {op.value} a deleted process") for op in Operation},
        Op.KILL: _PROCESS_FINISHED,
        Op.KILL_ALL: _PROCESS_FINISHED,
        Op.EXEC: _no("cannot exec in a deleted state"),
        Op.SET_EXITED: Ignore(),
    },
}

# Created from a checkpoint: nothing runs yet, so only start (the restore), delete
# and closing stdin make sense. Once started it is an ordinary init.
_RESTORING_INIT_TABLE: dict[ProcessState, dict[Operation, Rule]] = {
    **_INIT_TABLE,
    S.CREATED: {
        Op.START: Proceed(then=S.RUNNING),
        Op.KILL: _no("cannot signal a process that is not restored yet"),
        Op.KILL_ALL: _no("cannot signal a process that is not restored yet"),
        Op.DELETE: Proceed(then=S.DELETED),
        Op.PAUSE: _no("cannot pause task in created state"),
        Op.RESUME: _no("cannot resume task in created state"),
        Op.UPDATE: _no("cannot update a process that is not restored yet"),
        Op.CHECKPOINT: _no("cannot checkpoint a task in created state"),
        Op.RESIZE: _no("cannot resize a process that is not restored yet"),
        Op.CLOSE_IO: Proceed(),
        Op.EXEC: _no("cannot exec in a created state"),
        Op.SET_EXITED: Proceed(then=S.STOPPED),
    },
}

#: What an exec process can be asked; pause, update and the like act on the init.
EXEC_OPERATIONS: tuple[Operation, ...] = (
    Op.START, Op.KILL, Op.DELETE, Op.RESIZE, Op.CLOSE_IO, Op.SET_EXITED,
)
#: The states an exec process itself goes through (it reports its container's
#: paused/pausing state, but has none of its own).
EXEC_STATES: tuple[ProcessState, ...] = (S.CREATED, S.RUNNING, S.STOPPED, S.DELETED)

_EXEC_TABLE: dict[ProcessState, dict[Operation, Rule]] = {
    S.CREATED: {
        Op.START: Proceed(then=S.RUNNING),
        Op.KILL: _no("process not created"),
        Op.DELETE: Proceed(then=S.DELETED),
        Op.RESIZE: Proceed(),
        Op.CLOSE_IO: Proceed(),
        Op.SET_EXITED: Proceed(then=S.STOPPED),
    },
    S.RUNNING: {
        Op.START: _no("cannot start a running process"),
        Op.KILL: Proceed(),
        Op.DELETE: _no("cannot delete a running process"),
        Op.RESIZE: Proceed(),
        Op.CLOSE_IO: Proceed(),
        Op.SET_EXITED: Proceed(then=S.STOPPED),
    },
    S.STOPPED: {
        Op.START: _no("cannot start a stopped process"),
        Op.KILL: _PROCESS_FINISHED,
        Op.DELETE: Proceed(then=S.DELETED),
        Op.RESIZE: _no("cannot resize a stopped container"),
        Op.CLOSE_IO: Proceed(),
        Op.SET_EXITED: Ignore(),
    },
    S.DELETED: {
        Op.START: _no("cannot start a deleted process"),
        Op.KILL: _PROCESS_FINISHED,
        Op.DELETE: _no("cannot delete a deleted process"),
        Op.RESIZE: _no("cannot resize a deleted process"),
        Op.CLOSE_IO: _no("cannot close the stdin of a deleted process"),
        Op.SET_EXITED: Ignore(),
    },
}

TRANSITIONS: Mapping[ProcessKind, Mapping[ProcessState, Mapping[Operation, Rule]]] = (
    types.MappingProxyType({
        ProcessKind.INIT: types.MappingProxyType(_INIT_TABLE),
        ProcessKind.RESTORING_INIT: types.MappingProxyType(_RESTORING_INIT_TABLE),
        ProcessKind.EXEC: types.MappingProxyType(_EXEC_TABLE),
    })
)


def transition_rule(kind: ProcessKind, state: ProcessState, operation: Operation) -> Rule:
    """What `operation` does to a `kind` process in `state`."""
    try:
        return TRANSITIONS[kind][state][operation]
    except KeyError:
        # Only reachable for exec processes asked an init-only operation.
        return _no(f"cannot {operation.value} an exec process")


@dataclasses.dataclass(frozen=True)
class Stdio:
    """A process's stdio as containerd names it ("" = none)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


#: Runs one runc command that starts a process: (console socket path, io) -> None.
Launcher = Callable[[str | None, ProcessIO | None], Awaitable[None]]


class Process:
    """What the init and the exec processes share: state, lock, exit record, stdio."""

    def __init__(self, id: str, stdio: Stdio, *, namespace: str, container_id: str,
                 io_uid: int = 0, io_gid: int = 0) -> None:
        self.id = id
        self.stdio = stdio
        self.namespace = namespace
        self.container_id = container_id
        self.io_uid = io_uid
        self.io_gid = io_gid
        self._state = ProcessState.CREATED
        self._lock = asyncio.Lock()
        self._pid = 0
        self._exit: Exit | None = None
        self._finished = asyncio.Event()
        self._io: ProcessIO | None = None

    # -- observation (never blocks) -----------------------------------------------

    @property
    def kind(self) -> ProcessKind:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def state(self) -> ProcessState:
        return self._state

    @property
    def exit(self) -> Exit | None:
        """The exit, once the process has exited (or was deleted without one)."""
        return self._exit

    @property
    def exit_status(self) -> int:
        return self._exit.status if self._exit else 0

    @property
    def exited_at(self) -> datetime.datetime | None:
        return self._exit.at if self._exit else None

    @property
    def reported_state(self) -> ProcessState:
        """The state containerd is told about (State RPC, exec processes' view)."""
        return self.state

    def rule(self, operation: Operation) -> Rule:
        return transition_rule(self.kind, self._state, operation)

    async def wait(self) -> Exit:
        """Block until the process has exited (or was deleted); its exit."""
        await self._finished.wait()
        assert self._exit is not None
        return self._exit

    # -- the state machine ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _operation(self, operation: Operation) -> AsyncIterator[Proceed | Ignore]:
        """Hold the lock, apply the table's rule for `operation`, move the state.

        Refused operations raise before the body runs. The body sees Ignore and must
        then do nothing. If the body fails, a `during` state is rolled back.
        """
        async with self._lock:
            rule = self.rule(operation)
            if isinstance(rule, Refuse):
                raise rule.exception()
            # The lock is held throughout, so nothing else moves the state meanwhile.
            before = self._state
            if isinstance(rule, Proceed) and rule.during is not None:
                self._state = rule.during
            try:
                yield rule
            except BaseException:
                self._state = before
                raise
            if isinstance(rule, Proceed) and rule.then is not None:
                self._state = rule.then

    def _record_exit(self, status: int, at: datetime.datetime) -> None:
        if self._exit is None:
            self._exit = Exit(pid=self._pid, status=status, at=at)
        self._finished.set()

    async def set_exited(self, status: int, at: datetime.datetime | None = None) -> None:
        """The reaper saw this process exit with `status` (128+signal when killed)."""
        at = at or datetime.datetime.now(datetime.UTC)
        async with self._operation(Operation.SET_EXITED) as rule:
            if isinstance(rule, Ignore):
                return
            self._record_exit(status, at)

    async def resize(self, width: int, height: int) -> None:
        """Resize the pty; a process without a terminal ignores it, as runc's shim does."""
        async with self._operation(Operation.RESIZE):
            master = self._io.console_fd if self._io is not None else None
            if master is not None:
                resize(master, width, height)

    async def close_io(self) -> None:
        """Close the process's stdin (the writer side the shim holds)."""
        async with self._operation(Operation.CLOSE_IO):
            if self._io is not None:
                self._io.close_stdin()

    # -- stdio plumbing ------------------------------------------------------------

    def _open_io(self) -> ProcessIO:
        return ProcessIO.open(
            self.stdio.stdin, self.stdio.stdout, self.stdio.stderr,
            terminal=self.stdio.terminal, uid=self.io_uid, gid=self.io_gid,
            container_id=self.container_id, namespace=self.namespace,
        )

    async def _launch(self, launcher: Launcher, pid_file: Path) -> int:
        """Run `launcher` with this process's stdio wired up; returns the new pid.

        A terminal process gets a console socket; runc sends the pty master over it
        and the shim copies the pty to and from the FIFOs. Otherwise runc gets the
        stdio fds and the container inherits them.
        """
        if self._io is None:
            self._io = self._open_io()
        if self.stdio.terminal:
            # The io owns the master from here on (it closes it).
            self._io.attach_console(await _launch_with_console(launcher))
        else:
            await launcher(None, self._io)
        return read_pid_file(pid_file)

    async def _drain_and_close_io(self) -> None:
        """Let the last output reach its destination, then close (Delete)."""
        if self._io is not None:
            try:
                await self._io.wait_copied(IO_DRAIN_TIMEOUT_S)
            except (DeadlineExceeded, TimeoutError):
                log.warning("%s: stdio still copying after %.0fs; closing it",
                            self.id, IO_DRAIN_TIMEOUT_S)
        self._close_io_now()

    def _close_io_now(self) -> None:
        if self._io is not None:
            self._io.close()
            self._io = None

    def _release_waiters_after_delete(self, status: int = UNKNOWN_EXIT_STATUS) -> None:
        # A process deleted before it exited (a created init that runc delete
        # killed, an exec never started) gets a status of its own so Wait returns.
        self._record_exit(status, datetime.datetime.now(datetime.UTC))


class RestoreStrategy(Protocol):
    """Brings a checkpointed init back to life; returns the restored init's pid.

    Called from `InitProcess.start()` with the process lock held; it must not call
    the process's own operations, only `process.launch(...)` and its attributes.
    """

    async def restore(self, process: InitProcess) -> int: ...

    async def release(self, process: InitProcess) -> None:
        """The init is deleted (restored or not): let go of what Create prepared for it
        (a temporary copy of the images), or wait until that is done."""


class RuncRestore:
    """The default restore: `runc restore --detach` from the checkpoint directory."""

    async def restore(self, process: InitProcess) -> int:
        image_path = process.checkpoint_dir
        if not image_path:
            raise FailedPrecondition(f"{process.id}: no checkpoint to restore from")
        work_path = process.criu_work_path or str(process.bundle / "criu-restore")
        os.makedirs(work_path, exist_ok=True)

        async def run_restore(console_socket: str | None, io: ProcessIO | None) -> None:
            await process.runc.restore(
                process.id, str(process.bundle), image_path=image_path, work_path=work_path,
                pid_file=str(process.pid_file), console_socket=console_socket, io=io,
                detach=True, no_pivot=process.no_pivot_root,
            )

        return await process.launch(run_restore)

    async def release(self, process: InitProcess) -> None:
        return None


class InitProcess(Process):
    """The container's init: runc create / start / kill / delete, pause and resume."""

    def __init__(self, *, id: str, bundle: Path, runc: Runc, stdio: Stdio, namespace: str,
                 io_uid: int = 0, io_gid: int = 0, no_pivot_root: bool = False,
                 no_new_keyring: bool = False, checkpoint: str = "",
                 criu_work_path: str = "",
                 restore_strategy: RestoreStrategy | None = None) -> None:
        super().__init__(id, stdio, namespace=namespace, container_id=id,
                         io_uid=io_uid, io_gid=io_gid)
        self.bundle = bundle
        self.runc = runc
        self.no_pivot_root = no_pivot_root
        self.no_new_keyring = no_new_keyring
        self.checkpoint_dir = checkpoint
        self.criu_work_path = criu_work_path
        self.restore_strategy: RestoreStrategy = restore_strategy or RuncRestore()
        self.pid_file = bundle / "init.pid"
        self._created = False
        self._checkpoint: asyncio.Future[None] | None = None
        self._checkpoint_entry = ProcessState.RUNNING
        self._abort_reason: str | None = None

    @property
    def kind(self) -> ProcessKind:
        if self.checkpoint_dir and self._state is ProcessState.CREATED:
            return ProcessKind.RESTORING_INIT
        return ProcessKind.INIT

    async def create(self) -> None:
        """`runc create` (or, from a checkpoint, only prepare stdio: pid stays 0)."""
        async with self._lock:
            if self._created:
                raise FailedPrecondition(f"{self.id}: init process already created")
            self._created = True
            self._io = self._open_io()
            if self.checkpoint_dir:
                return
            try:
                self._pid = await self._launch(self._run_create, self.pid_file)
            except ContainerExists:
                self._close_io_now()  # someone else's container: leave it alone
                raise
            except BaseException:
                # runc may have got as far as a created container (the console never
                # arrived, the pid file is unreadable): leave nothing behind.
                try:
                    await self.runc.delete(self.id, force=True)
                except KybernateError as err:
                    log.debug("%s: cleanup after failed create: %s", self.id, err)
                self._close_io_now()
                raise

    async def _run_create(self, console_socket: str | None, io: ProcessIO | None) -> None:
        await self.runc.create(
            self.id, str(self.bundle), pid_file=str(self.pid_file),
            console_socket=console_socket, io=io, no_pivot=self.no_pivot_root,
            no_new_keyring=self.no_new_keyring,
        )

    async def launch(self, launcher: Launcher) -> int:
        """For restore strategies: run a command that starts this init with its stdio.

        The command must write the pid to `self.pid_file`; returns that pid.
        """
        return await self._launch(launcher, self.pid_file)

    async def start(self) -> int:
        """`runc start`, or the restore for an init created from a checkpoint."""
        async with self._operation(Operation.START):
            if self.checkpoint_dir:
                self._pid = await self.restore_strategy.restore(self)
            else:
                await self.runc.start(self.id)
        return self._pid

    async def kill(self, signal: int, *, all: bool = False) -> None:
        """Signal the init, or with `all` every process of the container.

        During a checkpoint the kill first aborts it: the checkpointer's cancellation
        path SIGKILLs a container whose state it left undefined. A signal that then
        finds the process gone has done its job.
        """
        aborted = await self._abort_checkpoint(f"signal {signal} was sent to {self.id}")
        try:
            async with self._operation(Operation.KILL_ALL if all else Operation.KILL):
                try:
                    await self.runc.kill(self.id, signal, all=all)
                except ProcessNotFound:
                    raise NotFound("process already finished") from None
        except NotFound:
            if not aborted:
                raise
            log.info("%s: killed while its checkpoint was aborted", self.id)

    async def delete(self) -> Exit:
        """`runc delete`, close stdio; the exit (unknown status if it never exited)."""
        async with self._operation(Operation.DELETE):
            if self.checkpoint_dir:
                await self.restore_strategy.release(self)  # the images' copy, restored or not
            # runc first: deleting a created container kills its init, which is what
            # lets the stdio copy see end of file.
            try:
                await self.runc.delete(self.id)
            except ContainerNotFound:
                pass  # runc already forgot it (after a checkpoint with exit, a failed restore)
            await self._drain_and_close_io()
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
            self._release_waiters_after_delete()
        assert self._exit is not None
        return self._exit

    async def pause(self) -> None:
        async with self._operation(Operation.PAUSE):
            await self.runc.pause(self.id)

    async def resume(self) -> None:
        async with self._operation(Operation.RESUME):
            await self.runc.resume(self.id)

    async def update(self, resources: dict[str, Any]) -> None:
        """`runc update` with OCI LinuxResources."""
        async with self._operation(Operation.UPDATE):
            await self.runc.update(self.id, resources)

    async def admit_exec(self) -> None:
        """Raise unless an exec may be added to this container now."""
        async with self._lock:
            rule = self.rule(Operation.EXEC)
            if isinstance(rule, Refuse):
                raise rule.exception()

    async def checkpoint(self, run: Callable[[], Awaitable[None]]) -> None:
        """Run a checkpoint (`run`) in the CHECKPOINTING state.

        The process lock is held only to enter that state, never while the checkpoint
        runs (it may wait on a hung agent for minutes): every other operation is
        decided by the table at once, and a Kill aborts the checkpoint, which then
        fails with Cancelled. Afterwards the process is back in the state it entered
        from, unless it exited meanwhile.
        """
        async with self._lock:
            rule = self.rule(Operation.CHECKPOINT)
            if isinstance(rule, Refuse):
                raise rule.exception()
            assert isinstance(rule, Proceed) and rule.during is not None
            entry = self._checkpoint_entry = self._state
            self._state = rule.during
            task = self._checkpoint = asyncio.ensure_future(run())
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (current is not None and current.cancelling()) or self._abort_reason is None:
                raise  # our caller is being cancelled, not aborted by a Kill
            raise Cancelled(f"checkpoint of {self.id} abandoned: {self._abort_reason}") from None
        finally:
            self._checkpoint = None
            self._abort_reason = None
            if self._state is ProcessState.CHECKPOINTING:  # no exit landed meanwhile
                self._state = entry

    async def _abort_checkpoint(self, reason: str) -> bool:
        """Cancel the checkpoint in flight and wait for its cancellation path (the kill
        policy) to finish; whether there was one."""
        task = self._checkpoint
        if task is None or task.done():
            return False
        log.warning("%s: aborting its checkpoint: %s", self.id, reason)
        self._abort_reason = reason
        task.cancel(reason)
        await asyncio.wait([task])
        return True

    @property
    def reported_state(self) -> ProcessState:
        # containerd has no word for a checkpoint in progress: it sees what it left.
        if self._state is ProcessState.CHECKPOINTING:
            return self._checkpoint_entry
        return self._state

    async def set_exited(self, status: int, at: datetime.datetime | None = None) -> None:
        was_paused = self._state in (ProcessState.PAUSED, ProcessState.PAUSING)
        await super().set_exited(status, at)
        if was_paused:
            # The init died frozen-adjacent: thaw so the rest of the cgroup can die.
            try:
                await self.runc.resume(self.id)
            except KybernateError as err:
                log.debug("%s: resume after exit: %s", self.id, err)


class ExecProcess(Process):
    """An extra process in a running container: `runc exec --detach`."""

    def __init__(self, *, id: str, container_id: str, parent: InitProcess, runc: Runc,
                 spec: dict[str, Any], stdio: Stdio, namespace: str, work_dir: Path,
                 io_uid: int = 0, io_gid: int = 0) -> None:
        super().__init__(id, stdio, namespace=namespace, container_id=container_id,
                         io_uid=io_uid, io_gid=io_gid)
        self.parent = parent
        self.runc = runc
        # runc decides about a console from the spec; keep it in step with the request.
        self.spec = {**spec, "terminal": stdio.terminal}
        self.pid_file = work_dir / f"exec-{id}.pid"

    @property
    def kind(self) -> ProcessKind:
        return ProcessKind.EXEC

    @property
    def state(self) -> ProcessState:
        # A running exec is paused whenever its container is.
        parent_state = self.parent.reported_state
        if self._state is ProcessState.RUNNING and parent_state in (
                ProcessState.PAUSED, ProcessState.PAUSING):
            return parent_state
        return self._state

    async def start(self) -> int:
        async with self._operation(Operation.START):
            if self.parent.state is ProcessState.CHECKPOINTING:
                # runc exec would stall on the frozen cgroup, and CRIU would miss it.
                raise FailedPrecondition("cannot start an exec while its container is being checkpointed")
            try:
                self._pid = await self._launch(self._run_exec, self.pid_file)
            except BaseException:
                self._close_io_now()  # runc exec cleans up its own half-started process
                raise
        return self._pid

    async def _run_exec(self, console_socket: str | None, io: ProcessIO | None) -> None:
        await self.runc.exec(self.container_id, self.spec, pid_file=str(self.pid_file),
                             console_socket=console_socket, io=io)

    async def kill(self, signal: int) -> None:
        """Signal the exec process directly (runc kill only reaches the init)."""
        async with self._operation(Operation.KILL):
            if self._pid <= 0:  # os.kill(0, ...) would signal our own process group
                raise FailedPrecondition("process not created")
            try:
                os.kill(self._pid, signal)
            except ProcessLookupError:
                raise NotFound("process already finished") from None

    async def delete(self) -> Exit:
        async with self._operation(Operation.DELETE):
            await self._drain_and_close_io()
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
            self._release_waiters_after_delete(NEVER_STARTED_EXEC_STATUS)
        assert self._exit is not None
        return self._exit


def read_pid_file(path: Path) -> int:
    """The pid runc wrote to `path`."""
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise Internal(f"cannot read pid file {path}: {err.strerror}") from None
    try:
        pid = int(text)
    except ValueError:
        raise Internal(f"pid file {path} holds {text[:40]!r}, not a pid") from None
    if pid <= 0:
        raise Internal(f"pid file {path} holds invalid pid {pid}")
    return pid


async def _launch_with_console(launcher: Launcher) -> int:
    """Run `launcher` with a fresh console socket; the pty master fd runc sent."""
    # In the system temp dir, not the bundle: unix socket paths are limited to 108
    # bytes and bundle paths under /run/containerd can be longer.
    with ConsoleSocket.create() as socket:
        await launcher(socket.path, None)
        return await socket.receive_master(timeout=CONSOLE_TIMEOUT_S)


__all__ = [
    "EXEC_OPERATIONS",
    "EXEC_STATES",
    "NEVER_STARTED_EXEC_STATUS",
    "TRANSITIONS",
    "UNKNOWN_EXIT_STATUS",
    "ExecProcess",
    "Ignore",
    "InitProcess",
    "Operation",
    "Proceed",
    "Process",
    "ProcessKind",
    "ProcessState",
    "Refuse",
    "RestoreStrategy",
    "Rule",
    "RuncRestore",
    "Stdio",
    "read_pid_file",
    "transition_rule",
]
