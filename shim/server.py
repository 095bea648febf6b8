"""The `serve` action: the long-lived shim process that `start` launched.

It takes the title containerd's shims have (`containerd-shim-kybernate-v1 -namespace NS
-id ID -address ADDR`, named `containerd-shim`), inherits the listening socket from
`start` (`-socket-fd`), becomes the child subreaper for the containers it runs, logs
into the bundle's `log` FIFO (containerd copies it into its own log), and serves
`containerd.task.v2.Task` over ttrpc until the task service asks it to shut down (or
SIGTERM/SIGINT arrive).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from setproctitle import setproctitle

if TYPE_CHECKING:
    from kybernate.shim.flags import ShimFlags

log = logging.getLogger("kybernate.shim")

LOG_FIFO = "log"
EVENT_FLUSH_TIMEOUT_S = 5.0
CALL_GRACE_S = 2.0


class FifoLogHandler(logging.Handler):
    """Writes log lines to containerd's log FIFO without ever blocking the event loop:
    when containerd is not reading (restarting, gone) a line is dropped, not queued."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="replace")
            os.write(self._fd, line)
        except (BlockingIOError, BrokenPipeError):
            pass  # no reader, or a full pipe: a lost log line beats a stalled shim
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        super().close()


def open_log_fifo(bundle: str) -> int | None:
    """containerd holds the FIFO open for reading; without a reader (containerd gone, or
    a test running us by hand) there is nowhere to log."""
    try:
        return os.open(os.path.join(bundle, LOG_FIFO), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ENXIO, errno.ENOENT):
            return None
        raise


def configure_logging(bundle: str, container_id: str, debug: bool) -> None:
    fd = open_log_fifo(bundle)
    handler: logging.Handler
    if fd is None:
        handler = logging.NullHandler()
    else:
        # Tracebacks of a crash go the same way: fd 2 is /dev/null otherwise.
        os.dup2(fd, 2)
        handler = FifoLogHandler(fd)
    handler.setFormatter(logging.Formatter(
        f'time="%(asctime)s" level=%(levelname)s msg="%(message)s" '
        f'runtime=io.containerd.kybernate.v1 id={container_id} logger=%(name)s'))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def log_task_stacks() -> None:
    """Log where every asyncio task of the shim is waiting (on SIGUSR1, for debugging)."""
    import io

    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(file=out)
        log.info("task %s:\n%s", task.get_name(), out.getvalue().rstrip())


def listening_socket(fd: int) -> socket.socket:
    if fd < 0:
        raise ValueError("serve needs the listening socket: -socket-fd is missing")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX:
        raise ValueError(f"fd {fd} is not a unix socket")
    sock.setblocking(False)
    os.set_inheritable(fd, False)  # runc and containers must not hold the shim's socket
    return sock


async def serve(flags: ShimFlags, sock: socket.socket) -> None:
    # Imported only once logging reaches containerd, so that a broken install shows
    # up in containerd's log instead of vanishing into /dev/null.
    from kybernate.runtime.reaper import Reaper
    from kybernate.shim.events import EventPublisher
    from kybernate.shim.service import TaskService
    from kybernate.shim.ttrpc import TtrpcServer

    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.set)
    loop.add_signal_handler(signal.SIGUSR1, log_task_stacks)  # like Go shims' stack dump
    reaper = Reaper()
    reaper.start()
    publisher = EventPublisher(flags.ttrpc_address, flags.namespace)
    from kybernate.shim.checkpoint import AgentCheckpointer, AgentGpuLock
    from kybernate.shim.restore import AgentRestore
    from kybernate.shim.restore_source import SpecRestoreSource

    service = TaskService(namespace=flags.namespace, shim_id=flags.id, publisher=publisher,
                          reaper=reaper, shutdown=shutdown, checkpointer=AgentCheckpointer(),
                          restore_strategy=AgentRestore(), gpu_hooks=AgentGpuLock(),
                          restore_source=SpecRestoreSource())
    server = TtrpcServer()
    service.register(server)
    socket_file = sock.getsockname()
    log.info("serving %s on %s (pid %d)", flags.id, socket_file, os.getpid())

    serving = asyncio.create_task(server.serve(sock), name="ttrpc-serve")
    stopping = asyncio.create_task(shutdown.wait(), name="shutdown")
    try:
        done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving in done and serving.exception() is not None:
            log.error("ttrpc server failed: %s", serving.exception())
    finally:
        stopping.cancel()
        # close() bounds itself: in-flight calls (a Wait on a running task) get the grace
        # period, then are cancelled. Never cancel close() itself half-way.
        await server.close(grace=CALL_GRACE_S)
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        await publisher.close(EVENT_FLUSH_TIMEOUT_S)
        if isinstance(socket_file, str) and socket_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_file)
        log.info("shim %s exiting", flags.id)


def run_server(flags: ShimFlags) -> int:
    """Process entry of `serve`; returns the exit status."""
    # Spawned (`python -m kybernate.shim ... serve`) or forked from the template, the
    # serving process shows itself as containerd's shims do.
    setproctitle(flags.process_title())
    # A container closing a pipe must not kill the shim; writes then fail with EPIPE.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    bundle = flags.bundle_path
    configure_logging(bundle, flags.id, flags.debug)
    sock = listening_socket(flags.socket_fd)
    try:
        asyncio.run(serve(flags, sock))
    except Exception:
        log.exception("shim %s failed", flags.id)
        return 1
    finally:
        sock.close()
    return 0
