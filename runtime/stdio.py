"""A container process's stdio, the way containerd hands it to a shim.

containerd names each stream with a string:
- "" : nothing (the process gets /dev/null);
- a path, normally a FIFO containerd created (`ctr`'s default), or a plain file;
- `file:///path` : stdout and stderr appended to that file;
- `binary:///path?k=v` : a logging binary that reads stdout on fd 3, stderr on fd 4 and
  closes fd 5 when it is ready; it gets CONTAINER_ID and CONTAINER_NAMESPACE.

Without a terminal the process gets pipes and the shim copies between pipes and the
FIFOs/files on the event loop (no thread per stream). With a terminal, runc sends the
pty master through a console socket and `attach_console` copies it both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import logging
import os
import select
import signal
import stat
import urllib.parse
from collections.abc import Callable

from kybernate.errors import FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

#: containerd gives a logging binary this long to exit after SIGTERM.
LOGGER_TERM_TIMEOUT = 12.0
#: How long `open` waits for a logging binary to report ready.
LOGGER_READY_TIMEOUT = 10.0
_CHUNK = 64 * 1024


class StdioKind(enum.Enum):
    """How stdout/stderr leave the shim (chosen from stdout's form, as containerd does)."""

    NULL = "null"
    FIFO = "fifo"
    FILE = "file"
    BINARY = "binary"


def stdio_kind(stdin: str, stdout: str, stderr: str) -> StdioKind:
    """Classify containerd's stdio strings."""
    if not stdin and not stdout and not stderr:
        return StdioKind.NULL
    scheme = urllib.parse.urlsplit(stdout).scheme if stdout else ""
    if scheme in ("", "fifo"):
        return StdioKind.FIFO
    if scheme == "file":
        return StdioKind.FILE
    if scheme == "binary":
        return StdioKind.BINARY
    raise InvalidArgument(f"unsupported stdio scheme {scheme!r} in {stdout!r}")


def binary_logger_argv(uri: str) -> list[str]:
    """argv for a `binary://` logger: the path, then each query key and its first value."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.path or not os.path.isabs(parts.path):
        raise InvalidArgument(f"binary logger {uri!r} needs an absolute path")
    argv = [parts.path]
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        argv += [key, value]
    return argv


class _CopyState(enum.Enum):
    READING = "reading"      # waiting for the source to become readable
    WRITING = "writing"      # holding a chunk the destination would not take yet
    DONE = "done"


class StreamCopy:
    """Moves bytes from one non-blocking fd to another on the loop, with backpressure.

    The source is read only while nothing is pending for the destination. EOF (or EIO
    from a pty master whose slave closed) ends the copy; a destination that went away
    (EPIPE) ends it too. `on_done` runs once, on the loop, when the copy ends.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, src: int, dst: int,
                 on_done: Callable[[], None] | None = None) -> None:
        self.name = name
        self._loop = loop
        self._src = src
        self._dst = dst
        self._on_done = on_done
        self._pending = b""
        self.state = _CopyState.READING
        self.copied = 0
        self.error: OSError | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        os.set_blocking(src, False)
        os.set_blocking(dst, False)
        loop.add_reader(src, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._src, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # EIO: a pty master after the last slave fd closed, i.e. EOF.
            if exc.errno != errno.EIO:
                self._fail(exc)
            self._finish()
            return
        if not data:
            self._finish()
            return
        self._pending = data
        self._flush()
        if self._pending and self.state is not _CopyState.DONE:
            self._loop.remove_reader(self._src)
            self._loop.add_writer(self._dst, self._writable)
            self.state = _CopyState.WRITING

    def _writable(self) -> None:
        self._flush()
        if not self._pending and self.state is _CopyState.WRITING:
            self._loop.remove_writer(self._dst)
            self._loop.add_reader(self._src, self._readable)
            self.state = _CopyState.READING

    def _flush(self) -> None:
        while self._pending:
            try:
                written = os.write(self._dst, self._pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EPIPE/EIO: nobody is left to read what we copy.
                if exc.errno not in (errno.EPIPE, errno.EIO):
                    self._fail(exc)
                self._pending = b""
                self._finish()
                return
            self._pending = self._pending[written:]
            self.copied += written

    def _fail(self, exc: OSError) -> None:
        # Raising from a loop callback would leave the fd registered and spinning.
        self.error = exc
        log.warning("stdio copy %s stopped: %s", self.name, exc)

    def _finish(self) -> None:
        if self.state is _CopyState.DONE:
            return
        self.cancel()
        if self._on_done is not None:
            self._on_done()

    def cancel(self) -> None:
        """Stop copying now (pending bytes are dropped); `on_done` is not called."""
        if self.state is _CopyState.DONE:
            return
        self.state = _CopyState.DONE
        self._loop.remove_reader(self._src)
        self._loop.remove_writer(self._dst)
        if not self.done.done():
            self.done.set_result(None)


def open_fifo_for_reading(path: str) -> int:
    """Open a FIFO's read end without waiting for a writer.

    epoll reports nothing on such an fd until a writer writes or comes and goes, so a
    reader driven by the loop never mistakes "no writer yet" for EOF.
    """
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def open_fifo_for_writing(path: str) -> tuple[int, int]:
    """(writer, keeper) for a FIFO: `keeper` is a read end we hold so neither the open
    nor our writes wait for, or fail without, the client; close both when done, or the
    client never sees EOF."""
    keeper = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        os.close(keeper)
        raise
    return writer, keeper


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


class _FdSet:
    """File descriptors we own; each is closed exactly once."""

    def __init__(self) -> None:
        self._fds: set[int] = set()

    def add(self, fd: int) -> int:
        self._fds.add(fd)
        return fd

    def close(self, fd: int | None) -> None:
        if fd is not None and fd in self._fds:
            self._fds.discard(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in list(self._fds):
            self.close(fd)


class _Destination:
    """Where one or more output copies write; closed when the last copy ends."""

    def __init__(self, fds: _FdSet, writer: int, keeper: int | None = None) -> None:
        self.writer = writer
        self._keeper = keeper
        self._fds = fds
        self._users = 0

    def acquire(self) -> int:
        self._users += 1
        return self.writer

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            # Our write end and the keeper both count as writers: the client sees
            # EOF only once both are gone.
            self._fds.close(self.writer)
            self._fds.close(self._keeper)


class ProcessIO:
    """The stdio of one container process (init or exec) and the copies that serve it.

    States: open (copies running) → closed. For a terminal the console copies start
    at `attach_console`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, stdin: str, stdout: str, stderr: str,
                 terminal: bool, kind: StdioKind) -> None:
        self.stdin_path = stdin
        self.stdout_path = stdout
        self.stderr_path = stderr
        self.terminal = terminal
        self.kind = kind
        self._loop = loop
        self._fds = _FdSet()
        self._child_ends: dict[str, int] = {}   # handed to runc; closed after start
        self._our_ends: dict[str, int] = {}     # read ends of stdout/stderr pipes
        self._stdin_writer: int | None = None   # our end of the process's stdin pipe
        self._stdin_copy: StreamCopy | None = None
        self._output_copies: list[StreamCopy] = []
        self._console_fd: int | None = None
        self._console_sink: _Destination | None = None  # a binary logger's stdout pipe
        self._logger_pid: int | None = None
        self._logger_pidfd: int | None = None
        self._closed = False

    # -- construction ------------------------------------------------------------

    @classmethod
    def open(cls, stdin: str, stdout: str, stderr: str, *, terminal: bool, uid: int = 0,
             gid: int = 0, container_id: str, namespace: str) -> ProcessIO:
        """Set up stdio for a process about to be created; call on the event loop.

        Blocks at most LOGGER_READY_TIMEOUT for a `binary://` logger to report ready.
        """
        loop = asyncio.get_running_loop()
        kind = stdio_kind(stdin, stdout, stderr)
        io = cls(loop, stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal, kind=kind)
        try:
            if terminal:
                # The copies start in attach_console(); a logger must run before.
                if kind is StdioKind.BINARY:
                    io._make_console_logger_pipes(uid, gid)
                    io._start_binary_logger(stdout, container_id, namespace)
            elif kind is not StdioKind.NULL:
                io._make_pipes(uid, gid)
                if kind is StdioKind.BINARY:
                    io._start_binary_logger(stdout, container_id, namespace)
                else:
                    io._start_output_copies()
                if stdin:
                    io._start_stdin_copy(io._stdin_writer, on_eof=io.close_stdin)
        except OSError as exc:
            io.close_after_start()
            io.close()
            raise FailedPrecondition(f"stdio of {container_id}: {exc}") from exc
        except BaseException:
            io.close_after_start()
            io.close()
            raise
        return io

    def _make_pipes(self, uid: int, gid: int) -> None:
        for name, path in (("stdin", self.stdin_path), ("stdout", self.stdout_path),
                           ("stderr", self.stderr_path)):
            if not path:
                continue  # the process gets /dev/null
            read_end, write_end = (self._fds.add(fd) for fd in os.pipe2(os.O_CLOEXEC))
            if uid or gid:
                # A container user other than root must be able to reopen its stdio.
                for fd in (read_end, write_end):
                    os.fchown(fd, uid, gid)
            if name == "stdin":
                self._child_ends[name], self._stdin_writer = read_end, write_end
            else:
                self._child_ends[name], self._our_ends[name] = write_end, read_end

    def _make_console_logger_pipes(self, uid: int, gid: int) -> None:
        """A terminal has one output stream: the logger reads it on fd 3 and sees an
        empty stderr on fd 4."""
        out_r, out_w = (self._fds.add(fd) for fd in os.pipe2(os.O_CLOEXEC))
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        os.close(err_w)
        if uid or gid:
            for fd in (out_r, out_w):
                os.fchown(fd, uid, gid)
        self._our_ends["stdout"] = out_r
        self._our_ends["stderr"] = self._fds.add(err_r)
        self._console_sink = _Destination(self._fds, out_w)

    def _open_destination(self, path: str, shared: dict[str, _Destination]) -> _Destination:
        """Where one output stream goes; a file named twice shares one destination."""
        target = urllib.parse.urlsplit(path).path if self.kind is StdioKind.FILE else path
        if target in shared:
            return shared[target]
        if self.kind is StdioKind.FILE:
            os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
            dest = _Destination(self._fds, self._fds.add(os.open(
                target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)))
        elif _is_fifo(target):
            # Never shared: each copy may wait on its own fd for the FIFO to drain.
            writer, keeper = open_fifo_for_writing(target)
            return _Destination(self._fds, self._fds.add(writer), self._fds.add(keeper))
        else:
            dest = _Destination(self._fds, self._fds.add(
                os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)))
        shared[target] = dest
        return dest

    def _copy_out(self, name: str, src: int, dest: _Destination) -> None:
        def finished() -> None:
            self._fds.close(src)
            dest.release()

        self._output_copies.append(
            StreamCopy(self._loop, name, src, dest.acquire(), on_done=finished))

    def _start_output_copies(self) -> None:
        shared: dict[str, _Destination] = {}
        # file:// sends both streams to the one file.
        targets = {"stdout": self.stdout_path,
                   "stderr": self.stdout_path if self.kind is StdioKind.FILE else self.stderr_path}
        for name, path in targets.items():
            src = self._our_ends.pop(name, None)
            if src is not None:
                self._copy_out(name, src, self._open_destination(path, shared))

    def _start_stdin_copy(self, target: int | None, on_eof: Callable[[], None] | None) -> None:
        if target is None:
            return
        src = self._fds.add(open_fifo_for_reading(self.stdin_path))

        def finished() -> None:
            self._fds.close(src)
            if on_eof is not None:
                on_eof()

        self._stdin_copy = StreamCopy(self._loop, "stdin", src, target, on_done=finished)

    def _start_binary_logger(self, uri: str, container_id: str, namespace: str) -> None:
        argv = binary_logger_argv(uri)
        out_r = self._our_ends.pop("stdout", None)
        err_r = self._our_ends.pop("stderr", None)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        sources: list[int] = []
        try:
            # Move every source above the target numbers so the dup2 actions cannot
            # overwrite one another; the high copies are close-on-exec.
            sources = [_dup_above(fd if fd is not None else null, 10)
                       for fd in (out_r, err_r, ready_w)]
            actions = [(os.POSIX_SPAWN_DUP2, null, target) for target in (0, 1, 2)]
            actions += [(os.POSIX_SPAWN_DUP2, src, target) for target, src in enumerate(sources, 3)]
            env = {"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace}
            try:
                self._logger_pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            except OSError as exc:
                raise FailedPrecondition(f"cannot start logging binary {argv[0]}: {exc}") from exc
            # A pidfd keeps later signals from hitting a recycled pid once it is reaped.
            self._logger_pidfd = os.pidfd_open(self._logger_pid)
        finally:
            for fd in [*sources, ready_w, null]:
                os.close(fd)
            # The logger holds the read ends now.
            self._fds.close(out_r)
            self._fds.close(err_r)
        try:
            ready, _, _ = select.select([ready_r], [], [], LOGGER_READY_TIMEOUT)
            if not ready:
                raise Unavailable(f"logging binary {argv[0]} not ready after {LOGGER_READY_TIMEOUT}s")
        finally:
            os.close(ready_r)

    # -- runc's side -----------------------------------------------------------------

    def runc_fds(self) -> tuple[int | None, int | None, int | None]:
        """(stdin, stdout, stderr) for runc; None means /dev/null (always for a terminal)."""
        return (self._child_ends.get("stdin"), self._child_ends.get("stdout"),
                self._child_ends.get("stderr"))

    def close_after_start(self) -> None:
        """Close our copies of the child's ends, so EOF reaches us when the process ends."""
        for name in list(self._child_ends):
            self._fds.close(self._child_ends.pop(name))

    # -- terminal ----------------------------------------------------------------

    def attach_console(self, master_fd: int) -> None:
        """Take ownership of the pty master and copy it to stdout and from stdin."""
        if not self.terminal:
            raise FailedPrecondition("attach_console on a process without a terminal")
        if self._console_fd is not None:
            raise FailedPrecondition("console already attached")
        if self._closed:
            os.close(master_fd)
            raise FailedPrecondition("stdio already closed")
        self._console_fd = self._fds.add(master_fd)
        if self.stdout_path:
            # Reading and writing through separate fds keeps each copy's loop
            # registration its own.
            reader = self._fds.add(_dup_above(master_fd, 3))
            sink = self._console_sink or self._open_destination(self.stdout_path, {})
            self._copy_out("console", reader, sink)
        if self.stdin_path:
            writer = self._fds.add(_dup_above(master_fd, 3))
            self._start_stdin_copy(writer, on_eof=lambda: self._fds.close(writer))

    @property
    def console_fd(self) -> int | None:
        """The pty master, once attached (for resize)."""
        return self._console_fd

    # -- shim calls ----------------------------------------------------------------

    def close_stdin(self) -> None:
        """Close the process's input (CloseIO, or the client closed its stdin FIFO)."""
        if self._stdin_copy is not None:
            self._stdin_copy.cancel()
        if self._stdin_writer is not None:
            fd, self._stdin_writer = self._stdin_writer, None
            self._fds.close(fd)

    async def wait_copied(self, timeout: float | None = None) -> bool:
        """Wait until stdout/stderr are drained; False if `timeout` passed first.

        Output ends only when every holder of the pipes closed them, and a daemon the
        process left behind may hold them for ever: callers wait a bounded time (the
        runc shim waits 2 s), then report the exit anyway and close().
        """
        pending = [c.done for c in self._output_copies if not c.done.done()]
        if not pending:
            return True
        _, still_pending = await asyncio.wait(pending, timeout=timeout)
        if still_pending:
            log.warning("stdio not drained within %ss (%s)", timeout,
                        ", ".join(c.name for c in self._output_copies if not c.done.done()))
        return not still_pending

    def close(self) -> None:
        """Stop all copies, close every fd we own, and ask a logging binary to exit."""
        if self._closed:
            return
        self._closed = True
        for copy in self._output_copies:
            copy.cancel()
        if self._stdin_copy is not None:
            self._stdin_copy.cancel()
        self._stdin_writer = None
        self._child_ends.clear()
        self._our_ends.clear()
        self._fds.close_all()
        if self._logger_pidfd is not None:
            pidfd, self._logger_pidfd = self._logger_pidfd, None
            self._stop_logger(pidfd)

    def _stop_logger(self, pidfd: int) -> None:
        # Its pipes are closed now; SIGTERM lets it flush, SIGKILL if it lingers.
        # The shim's Reaper collects its exit.
        _signal_pidfd(pidfd, signal.SIGTERM)
        if self._loop.is_closed():
            os.close(pidfd)
            return

        def kill_and_release() -> None:
            _signal_pidfd(pidfd, signal.SIGKILL)
            os.close(pidfd)

        self._loop.call_later(LOGGER_TERM_TIMEOUT, kill_and_release)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    @property
    def logger_pid(self) -> int | None:
        """The pid of the `binary://` logger, if one runs."""
        return self._logger_pid


def _signal_pidfd(pidfd: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, sig)


def _dup_above(fd: int, minimum: int, owned: list[int] | None = None) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)
    if owned is not None:
        owned.append(new)
    return new
