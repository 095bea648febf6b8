"""Terminals: runc's console socket and pty resizing.

For a process with `terminal: true`, runc creates the pty inside the container and
sends the master fd over the unix socket named by `--console-socket` (SCM_RIGHTS,
one message). The shim keeps the master and copies it to the client's FIFOs.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import struct
import tempfile
import termios
from typing import Self

from kybernate.errors import DeadlineExceeded, Internal, InvalidArgument


class ConsoleSocket:
    """A listening unix socket in a private temp dir that receives one pty master."""

    def __init__(self, directory: str, sock: socket.socket) -> None:
        self._directory = directory
        self._sock = sock
        self.path = os.path.join(directory, "pty.sock")

    @classmethod
    def create(cls, dir: str | None = None) -> ConsoleSocket:
        """Listen on `<new temp dir under dir>/pty.sock` (kept short for sun_path)."""
        directory = tempfile.mkdtemp(prefix="pty", dir=dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            path = os.path.join(directory, "pty.sock")
            if len(path.encode()) >= 108:
                raise InvalidArgument(f"console socket path too long for a unix socket: {path}")
            sock.bind(path)
            sock.listen(1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(directory, sock)

    async def receive_master(self, timeout: float | None = None) -> int:
        """Accept runc's connection and return the pty master fd it sends (ours to close)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await loop.sock_accept(self._sock)
        except TimeoutError:
            raise DeadlineExceeded(f"no console received on {self.path} within {timeout}s") from None
        with conn:
            conn.setblocking(False)
            async with asyncio.timeout(timeout):
                fds = await _receive_fds(loop, conn)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise Internal(f"expected one pty master on {self.path}, got {len(fds)} fds")
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        """Stop listening and remove the socket's directory."""
        self._sock.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _receive_fds(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> list[int]:
    while True:
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4, socket.MSG_CMSG_CLOEXEC)
            if not fds and not _msg:
                raise Internal("console socket closed before a pty master arrived")
            return fds
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def resize(master_fd: int, width: int, height: int) -> None:
    """Set the pty's window size (TIOCSWINSZ); the foreground process gets SIGWINCH."""
    if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
        raise InvalidArgument(f"terminal size {width}x{height} out of range")
    fcntl.ioctl(master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def window_size(master_fd: int) -> tuple[int, int]:
    """(width, height) of the pty."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(master_fd, termios.TIOCGWINSZ, b"\0" * 8))
    return cols, rows
