"""Reaping every child of the shim, as child subreaper.

The shim is the parent (or, through PR_SET_CHILD_SUBREAPER, the adoptive parent) of
every container process: runc's create and exec leave their init and exec processes
re-parented to us. One `Reaper` per shim process owns `waitpid`: it reaps with
`waitpid(-1, WNOHANG)` on SIGCHLD and fans each exit out to every subscription, and it
keeps a bounded record of recent exits so that a pid whose exit was reaped before
anyone asked for it (a container that dies during `runc create`) is never lost.

Consequence for the rest of the shim: no other code may wait for children. Commands
run through `Reaper.run` / `Reaper.spawn`, never through `subprocess` waits or
asyncio's child watchers, which would race with `waitpid(-1)` and lose exits.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import datetime
import errno
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Self

from kybernate.errors import DeadlineExceeded, FailedPrecondition, Internal

PR_SET_CHILD_SUBREAPER = 36

#: Exits kept for late `wait_for` calls. A shim sees a handful of processes per
#: container; this bound only guards against a runaway exec loop.
DEFAULT_EXIT_HISTORY = 4096

# Same meaning as in `subprocess`, so callers can pass either.
DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE


@dataclasses.dataclass(frozen=True)
class Exit:
    """One reaped child: its pid, exit code (128+signal when killed), and when."""

    pid: int
    status: int
    at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a finished command left: exit code (128+signal when killed) and output."""

    returncode: int
    stdout: bytes
    stderr: bytes


@dataclasses.dataclass
class Child:
    """A started, not yet reaped, child; pipe fds are ours to read/write and close."""

    pid: int
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None

    def close_pipes(self) -> None:
        """Close whichever of our pipe ends are still open."""
        for name in ("stdin", "stdout", "stderr"):
            fd = getattr(self, name)
            if fd is not None:
                _close_quietly(fd)
                setattr(self, name, None)


def exit_code_from_wait_status(wait_status: int) -> int:
    """Translate a raw wait status into the shell convention containerd reports."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    raise ValueError(f"wait status {wait_status:#x} is neither an exit nor a signal")


def set_child_subreaper() -> None:
    """Make this process adopt its orphaned descendants (prctl PR_SET_CHILD_SUBREAPER)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class ExitSubscription:
    """Every exit reaped after `Reaper.subscribe()`, in reaping order, until `close()`."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._queue: asyncio.Queue[Exit | None] = asyncio.Queue()
        self._closed = False

    def _deliver(self, exit_: Exit) -> None:
        if not self._closed:
            self._queue.put_nowait(exit_)

    def close(self) -> None:
        """Stop receiving exits; a pending `__anext__` ends the iteration."""
        if self._closed:
            return
        self._closed = True
        self._reaper._unsubscribe(self)
        self._queue.put_nowait(None)

    @property
    def closed(self) -> bool:
        """Whether `close()` was called (or the reaper stopped)."""
        return self._closed

    def __aiter__(self) -> AsyncIterator[Exit]:
        return self

    async def __anext__(self) -> Exit:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # later calls end too
            raise StopAsyncIteration
        return item

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Reaper:
    """Child subreaper: reaps all children on the running loop and reports their exits.

    States: created → started (`start()`) → stopped (`stop()`). Use exactly one per
    process; a second one would steal the first one's exits.
    """

    def __init__(self, *, exit_history: int = DEFAULT_EXIT_HISTORY) -> None:
        if exit_history < 1:
            raise ValueError("exit_history must be at least 1")
        self._history_limit = exit_history
        self._history: collections.OrderedDict[int, Exit] = collections.OrderedDict()
        self._waiters: dict[int, list[asyncio.Future[Exit]]] = {}
        self._subscriptions: list[ExitSubscription] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------

    def start(self, *, subreaper: bool = True) -> None:
        """Become child subreaper and reap on SIGCHLD on the running loop."""
        if self._loop is not None:
            raise FailedPrecondition("reaper already started")
        if self._stopped:
            raise FailedPrecondition("reaper was stopped; create a new one")
        loop = asyncio.get_running_loop()
        if subreaper:
            set_child_subreaper()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._loop = loop
        # Children that exited before the handler was installed sent a SIGCHLD
        # nobody handled; reap them now.
        self.reap()

    def stop(self) -> None:
        """Stop handling SIGCHLD; end all subscriptions and fail pending waiters."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_signal_handler(signal.SIGCHLD)
        for sub in list(self._subscriptions):
            sub.close()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(FailedPrecondition("reaper stopped"))
        self._waiters.clear()

    @property
    def running(self) -> bool:
        """Whether SIGCHLD is being handled."""
        return self._loop is not None and not self._stopped

    # -- reaping ---------------------------------------------------------------

    def reap(self) -> list[Exit]:
        """Reap every child that has exited; runs from the SIGCHLD handler."""
        reaped: list[Exit] = []
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break  # no children at all
            except InterruptedError:
                continue
            if pid == 0:
                break  # children exist, none has exited
            try:
                status = exit_code_from_wait_status(wait_status)
            except ValueError:
                continue  # stopped/continued reports: not an exit
            exit_ = Exit(pid=pid, status=status, at=datetime.datetime.now(datetime.UTC))
            self._record(exit_)
            reaped.append(exit_)
        return reaped

    def _record(self, exit_: Exit) -> None:
        self._history.pop(exit_.pid, None)
        self._history[exit_.pid] = exit_
        while len(self._history) > self._history_limit:
            self._history.popitem(last=False)
        for fut in self._waiters.pop(exit_.pid, ()):
            if not fut.done():
                fut.set_result(exit_)
        for sub in list(self._subscriptions):
            sub._deliver(exit_)

    # -- consumers -------------------------------------------------------------

    def subscribe(self) -> ExitSubscription:
        """A new subscription receiving every exit reaped from now on."""
        if self._stopped:
            raise FailedPrecondition("reaper stopped")
        sub = ExitSubscription(self)
        self._subscriptions.append(sub)
        return sub

    def _unsubscribe(self, sub: ExitSubscription) -> None:
        try:
            self._subscriptions.remove(sub)
        except ValueError:
            pass

    def exited(self, pid: int) -> Exit | None:
        """The recorded exit of `pid`, if it was reaped and is still remembered."""
        return self._history.get(pid)

    def forget(self, pid: int) -> None:
        """Drop a recorded exit, e.g. before reusing knowledge of a recycled pid."""
        self._history.pop(pid, None)

    async def wait_for(self, pid: int, timeout: float | None = None) -> Exit:
        """The exit of `pid`, whether it was reaped already or is still to come."""
        known = self._history.get(pid)
        if known is not None:
            return known
        if self._stopped:
            raise FailedPrecondition("reaper stopped")
        fut: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(pid, []).append(fut)
        try:
            if timeout is None:
                return await asyncio.shield(fut)
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise DeadlineExceeded(f"pid {pid} did not exit within {timeout}s") from None
        finally:
            waiters = self._waiters.get(pid)
            if waiters is not None and fut in waiters and not fut.done():
                waiters.remove(fut)
                fut.cancel()
                if not waiters:
                    del self._waiters[pid]

    # -- running commands ------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = DEVNULL,
        stdout: int | None = DEVNULL,
        stderr: int | None = DEVNULL,
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        start_new_session: bool = False,
    ) -> Child:
        """Start `argv`; its exit comes through this reaper (use `wait_for(child.pid)`).

        Each stdio argument is a file descriptor, DEVNULL, or PIPE (we get the other
        end in the returned Child). The caller owns those pipe ends.
        """
        if not self.running:
            raise FailedPrecondition("reaper is not running; call start() on the loop first")
        if not argv:
            raise ValueError("empty argv")
        proc = _UnwaitedPopen(
            list(argv), stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds),
            env=dict(env) if env is not None else None, cwd=cwd, close_fds=True,
            start_new_session=start_new_session,
        )
        child = Child(pid=proc.pid)
        # Take the raw pipe fds away from Popen's file objects so closing is ours alone.
        for name in ("stdin", "stdout", "stderr"):
            fileobj = getattr(proc, name)
            if fileobj is not None:
                setattr(child, name, os.dup(fileobj.fileno()))
                fileobj.close()
                setattr(proc, name, None)
        # No SIGCHLD can be handled between the fork and here (same thread, no
        # await), so an exit already recorded for this pid belongs to an earlier
        # process that had the same number.
        self._history.pop(child.pid, None)
        return child

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        input: bytes | None = None,
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run `argv` to completion and collect its output.

        stdin: an fd, or None for /dev/null (or for `input` when given).
        stdout/stderr: an fd (or DEVNULL) the child writes to, or None to capture
        into the result. On timeout the child is SIGKILLed and DeadlineExceeded raised.
        """
        if input is not None and stdin is not None:
            raise ValueError("give either stdin or input, not both")
        child = self.spawn(
            argv,
            stdin=PIPE if input is not None else (DEVNULL if stdin is None else stdin),
            stdout=PIPE if stdout is None else stdout,
            stderr=PIPE if stderr is None else stderr,
            pass_fds=pass_fds, env=env, cwd=cwd,
        )
        loop = asyncio.get_running_loop()
        try:
            async def feed() -> None:
                if input is not None and child.stdin is not None:
                    await write_all(loop, child.stdin, input)
                    _close_quietly(child.stdin)  # EOF for the child
                    child.stdin = None

            async def collect() -> tuple[Exit, bytes, bytes]:
                feeding = feed()
                out_task = read_to_end(loop, child.stdout) if child.stdout is not None else _no_bytes()
                err_task = read_to_end(loop, child.stderr) if child.stderr is not None else _no_bytes()
                _, out, err, exit_ = await asyncio.gather(
                    feeding, out_task, err_task, self.wait_for(child.pid)
                )
                return exit_, out, err

            try:
                async with asyncio.timeout(timeout):
                    exit_, out, err = await collect()
            except TimeoutError:
                _kill_quietly(child.pid)
                raise DeadlineExceeded(
                    f"{argv[0]} did not finish within {timeout}s; killed"
                ) from None
            except BaseException:
                _kill_quietly(child.pid)
                raise
        finally:
            child.close_pipes()
        return CommandResult(returncode=exit_.status, stdout=out, stderr=err)


class _UnwaitedPopen(subprocess.Popen):  # type: ignore[type-arg]
    """A Popen that never waits for its child: the Reaper owns every exit status.

    Popen.__del__ would poll (waitpid) a child it thinks alive and park it in
    subprocess's module-level `_active` list, where later Popen() calls waitpid it
    again; either would steal the exit from the reaper.
    """

    def __del__(self) -> None:
        pass

    def _internal_poll(self, *args: Any, **kwargs: Any) -> int | None:
        return self.returncode

    def _wait(self, timeout: float | None) -> int:
        raise Internal("this child is reaped by the Reaper; use Reaper.wait_for")


# -- non-blocking fd helpers shared by the runtime ---------------------------------


async def read_to_end(loop: asyncio.AbstractEventLoop, fd: int, limit: int = 64 << 20) -> bytes:
    """Read `fd` until EOF on the loop (fd is set non-blocking); at most `limit` bytes kept."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    size = 0
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        nonlocal size
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_exception(exc)
                return
            if not data:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)
                return
            if size < limit:
                chunks.append(data[: limit - size])
                size += len(data)

    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


async def write_all(loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` on the loop (fd is set non-blocking).

    A reader that went away (EPIPE) ends the write silently: the command's exit
    status says what happened.
    """
    os.set_blocking(fd, False)
    view = memoryview(data)
    done: asyncio.Future[None] = loop.create_future()

    def on_writable() -> None:
        nonlocal view
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                return
            except BrokenPipeError:
                break
            except OSError as exc:
                loop.remove_writer(fd)
                if not done.done():
                    done.set_exception(exc)
                return
            view = view[written:]
        loop.remove_writer(fd)
        if not done.done():
            done.set_result(None)

    if view:
        loop.add_writer(fd, on_writable)
        try:
            await done
        finally:
            loop.remove_writer(fd)


async def _no_bytes() -> bytes:
    return b""


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
