"""The template's half of a relayed `start` or `delete` (see relay.py).

The template forks a worker per relayed command (so a `delete` waiting on runc never
holds up the next container's `start`); the worker takes on the command process's
working directory and environment, runs the same `start` or `delete` the command
would have run, captures what it would have printed, and sends that back with the
exit status. A worker's `start` forks the serving process from itself (everything is
loaded already) and puts it into the command process's cgroups, where a server that
the command spawned would have been born.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from collections.abc import Iterable
from typing import NoReturn

from kybernate.shim.flags import SHIM_NAME, ShimFlags, UsageError, parse_flags
from kybernate.shim.relay import ACTIONS, MAGIC, encode_reply

#: Sent instead of a reply when the command should run in the command process after
#: all (it decodes to None there).
FALLBACK = b"fallback\n"


class RelayedCommand:
    """A decoded relay request."""

    __slots__ = ("action", "argv", "cwd", "env", "ppid", "stdin")

    def __init__(self, *, action: str, cwd: str, ppid: int, argv: list[str], env: dict[str, str],
                 stdin: bytes) -> None:
        self.action = action
        self.cwd = cwd
        self.ppid = ppid
        self.argv = argv
        self.env = env
        self.stdin = stdin

    @classmethod
    def decode(cls, data: bytes) -> RelayedCommand:
        """Parse and validate; ValueError says what is wrong."""
        fields = _Fields(data)
        if fields.take() != MAGIC:
            raise ValueError("not a relay request")
        action, cwd = fields.take().decode(), os.fsdecode(fields.take())
        if action not in ACTIONS:
            raise ValueError(f"relay request for unknown action {action!r}")
        if not os.path.isabs(cwd):
            raise ValueError(f"relay request working directory {cwd!r} is not absolute")
        ppid = fields.number()
        argv = [os.fsdecode(fields.take()) for _ in range(fields.number())]
        env: dict[str, str] = {}
        for _ in range(fields.number()):
            key, equals, value = os.fsdecode(fields.take()).partition("=")
            if not key or not equals:
                raise ValueError("relay request environment entries must be KEY=VALUE")
            env[key] = value
        return cls(action=action, cwd=cwd, ppid=ppid, argv=argv, env=env, stdin=fields.rest())


class _Fields:
    """NUL-terminated fields read front to back; what follows the last is raw bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self) -> bytes:
        end = self._data.find(b"\0", self._at)
        if end < 0:
            raise ValueError("relay request ends inside a field")
        field, self._at = self._data[self._at:end], end + 1
        return field

    def number(self) -> int:
        field = self.take()
        if not field.isdigit() or len(field) > 9:
            raise ValueError(f"relay request field {field[:20]!r} is not a number")
        return int(field)

    def rest(self) -> bytes:
        return self._data[self._at:]


def run_relayed(command: RelayedCommand, conn: socket.socket, peer_pid: int,
                close: Iterable[socket.socket]) -> NoReturn:
    """In the forked worker: run the command as its process would have, answer, exit."""
    status, stdout = 1, b""
    captured = io.StringIO()
    try:
        for sock in close:
            sock.close()
        sys.stderr = captured  # containerd logs a command's stderr as its warnings
        os.chdir(command.cwd)
        os.environ.clear()
        os.environ.update(command.env)
        flags = parse_flags(command.argv)
        if flags.action != command.action:
            raise UsageError(f"relayed {command.action!r}, but the arguments say {flags.action!r}")
        if flags.action == "start":
            from kybernate.shim.start import start

            stdout = start(flags, containerd_pid=command.ppid, options_bytes=command.stdin,
                           launch=lambda f, sock: fork_server(f, sock, peer_pid, conn)).encode()
        else:
            from kybernate.shim.delete import delete

            stdout = delete(flags)
        status = 0
    except Exception as err:  # noqa: BLE001 - containerd shows our stderr as the failure
        print(f"{SHIM_NAME}: {command.action}: {err}", file=captured)
    finally:
        try:
            conn.send(encode_reply(status, stdout, captured.getvalue().encode()))
        except OSError:
            pass
        os._exit(0)


def fork_server(flags: ShimFlags, sock: socket.socket, peer_pid: int, conn: socket.socket) -> int:
    """The serving process for `sock`, forked from this worker (which exits right after
    answering, so the server is orphaned as a spawned one would be) and put into the
    cgroups of the command process (`peer_pid`)."""
    from kybernate.shim.start import join_own_cgroups, server_environment
    from kybernate.shim.template import ForkRequest, become_server

    request = ForkRequest(flags.replace(bundle=os.path.abspath(flags.bundle_path)), server_environment(flags))
    pid = os.fork()
    if pid == 0:
        become_server(request, sock.fileno(), close=(conn,))
    try:
        join_own_cgroups(pid, source=peer_pid)
    except BaseException:
        os.kill(pid, 9)
        raise
    return pid
