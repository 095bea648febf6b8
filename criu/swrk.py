"""A client for CRIU's RPC protocol over `criu swrk <fd>`.

One request per CRIU process: the client makes a SOCK_SEQPACKET socket pair, starts
`criu swrk N` with one end as fd N, sends a criu_req and reads criu_resp packets until
the answer to its request arrives. NOTIFY packets in between are CRIU's action-script
hooks (pre-dump, network-lock, post-dump, setup-namespaces, post-restore, ...): each is
handed to the caller's callback and acknowledged; a callback that raises is answered
with notify_success=false, which makes CRIU roll back, and the error is raised once
CRIU has answered.

How CRIU is started is pluggable: a process that is a child subreaper with its own
SIGCHLD handling (the shim) must start and reap children its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from kybernate.protos import criu_rpc_pb2 as rpc

from . import request
from .errors import CriuError
from .logparse import first_error_line, parse_criu_log
from .options import DumpOptions, RestoreOptions

log = logging.getLogger(__name__)

NotifyCallback = Callable[[str], Awaitable[None]]
"""Called with the script name of every CRIU notification, before CRIU goes on."""

SpawnFn = Callable[[Sequence[str], Sequence[int]], Awaitable[int]]
"""Runs argv with the given fds inherited at their numbers; resolves to the exit status.
Cancelling the awaitable must kill and reap the process."""

# CRIU's own packets are a few KiB at most; anything near this is a protocol error.
_MAX_PACKET = 1 << 20
# fds CRIU may attach to one packet (orphan-pts-master sends one).
_MAX_PACKET_FDS = 8
# How long CRIU gets to exit by itself once the conversation ended or failed, and
# once our caller gave up on it; then it is killed.
_EXIT_GRACE_S = 10.0
_CANCEL_GRACE_S = 1.0


async def spawn_with_asyncio(argv: Sequence[str], pass_fds: Sequence[int]) -> int:
    """The default `SpawnFn`: asyncio's subprocess; CRIU logs to its log file, so its
    stdin and stdout are /dev/null and its stderr is ours (for "can't open log")."""
    proc = await asyncio.create_subprocess_exec(
        *argv, pass_fds=tuple(pass_fds),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        return await proc.wait()
    except asyncio.CancelledError:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        raise


class CriuClient:
    """Runs CRIU requests, one `criu swrk` process each."""

    def __init__(self, criu_binary: str = "criu", *, spawn: SpawnFn | None = None) -> None:
        self._binary = criu_binary
        self._spawn = spawn or spawn_with_asyncio

    async def dump(self, opts: DumpOptions, notify: NotifyCallback | None = None) -> None:
        """Dump the process tree of `opts.pid` into `opts.images_dir`.

        Raises CriuError with CRIU's first error line and the log path on failure.
        """
        what = f"dump of pid {opts.pid}"
        with _DirFds(opts.images_dir, opts.work_dir) as (images_fd, work_fd):
            req = request.dump_request(opts, images_dir_fd=images_fd, work_dir_fd=work_fd,
                                       notify_scripts=notify is not None)
            await self._call(req, what=what, log_path=opts.log_path, notify=notify)

    async def restore(self, opts: RestoreOptions, notify: NotifyCallback | None = None) -> int:
        """Restore the images of `opts.images_dir`; the pid of the restored root task.

        With `rst_sibling` (the default) that task is the caller's child, and the
        caller must reap it.
        """
        what = f"restore from {opts.images_dir}"
        with _DirFds(opts.images_dir, opts.work_dir) as (images_fd, work_fd):
            req = request.restore_request(opts, images_dir_fd=images_fd, work_dir_fd=work_fd,
                                          notify_scripts=notify is not None)
            resp = await self._call(req, what=what, log_path=opts.log_path, notify=notify,
                                    pass_fds=[fd for fd, _ in opts.inherit_fds])
        if not resp.HasField("restore") or resp.restore.pid <= 0:
            raise CriuError(f"CRIU {what} answered without a pid; log: {opts.log_path}",
                            log_path=opts.log_path)
        return int(resp.restore.pid)

    async def version(self) -> str:
        """CRIU's version, e.g. "4.2.1" (a git id is appended when CRIU reports one)."""
        resp = await self._call(request.version_request(), what="version query", log_path=None)
        v = resp.version
        text = f"{v.major_number}.{v.minor_number}"
        if v.HasField("sublevel"):
            text += f".{v.sublevel}"
        if v.HasField("gitid") and v.gitid:
            text += f" ({v.gitid})"
        return text

    async def check(self) -> None:
        """Ask CRIU whether this kernel supports what it needs; CriuError if not."""
        await self._call(request.check_request(), what="check", log_path=None)

    async def _call(self, req: rpc.criu_req, *, what: str, log_path: Path | None,
                    notify: NotifyCallback | None = None,
                    pass_fds: Sequence[int] = ()) -> rpc.criu_resp:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        argv = [self._binary, "swrk", str(theirs.fileno())]
        spawned = asyncio.ensure_future(self._spawn(argv, [theirs.fileno(), *pass_fds]))
        session = _Session(ours, spawned, what=what, log_path=log_path)
        grace = _EXIT_GRACE_S
        try:
            resp = await session.converse(req, notify)
        except asyncio.CancelledError:
            grace = _CANCEL_GRACE_S
            raise
        finally:
            # Closing our end tells a CRIU still running that nobody listens any more.
            ours.close()
            status = await _reap(spawned, grace)
            theirs.close()
        if status != 0:
            raise _failure(what, log_path, f"criu exited ({_describe_exit(spawned)})")
        return resp


class _Session:
    """One request's conversation with a running `criu swrk`."""

    def __init__(self, sock: socket.socket, spawned: asyncio.Future[int], *, what: str,
                 log_path: Path | None) -> None:
        self._sock = sock
        self._spawned = spawned
        self._what = what
        self._log_path = log_path

    async def converse(self, req: rpc.criu_req, notify: NotifyCallback | None) -> rpc.criu_resp:
        await self._send(req)
        callback_error: BaseException | None = None
        while True:
            resp = await self._receive()
            if resp.type == rpc.NOTIFY:
                failure = await self._run_callback(resp.notify.script, notify)
                if failure is not None:
                    callback_error = callback_error or failure
                await self._send(request.notify_ack(failure is None))
                continue
            if resp.type != req.type:
                raise _failure(self._what, self._log_path,
                               f"unexpected CRIU answer of type {rpc.criu_req_type.Name(resp.type)}")
            if callback_error is not None:
                raise _failure(self._what, self._log_path,
                               f"notification callback failed: {callback_error}") from callback_error
            if not resp.success:
                raise _failure(self._what, self._log_path, _resp_reason(resp), from_criu=True)
            return resp

    async def _send(self, req: rpc.criu_req) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(self._sock, req.SerializeToString())
        except OSError as exc:  # CRIU hung up: it died or gave up on us
            raise _failure(self._what, self._log_path, f"cannot send to criu: {exc}") from exc

    async def _run_callback(self, script: str, notify: NotifyCallback | None) -> Exception | None:
        """None when the notification was handled, else the callback's error."""
        log.debug("CRIU %s: notification %s", self._what, script)
        if notify is None:
            return None
        try:
            await notify(script)
        except Exception as exc:  # noqa: BLE001 - any failure: CRIU rolls back, then we raise
            log.warning("CRIU %s: %s callback failed: %s", self._what, script, exc)
            return exc
        return None

    async def _receive(self) -> rpc.criu_resp:
        """The next packet, decoded; CriuError if CRIU exits or hangs up first."""
        receiving = asyncio.ensure_future(_recv_packet(self._sock))
        try:
            pending: set[asyncio.Future[Any]] = {receiving, self._spawned}
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receiving.done():
                receiving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiving
        if receiving.done() and not receiving.cancelled():
            data = receiving.result()
        else:
            # CRIU is gone; a last packet may still be queued.
            queued = _recv_packet_now(self._sock)
            if queued is None:
                raise _failure(self._what, self._log_path,
                               f"criu exited ({_describe_exit(self._spawned)}) without answering")
            data = queued
        if not data:
            raise _failure(self._what, self._log_path, "criu closed the connection")
        resp = rpc.criu_resp()
        try:
            resp.ParseFromString(data)
        except DecodeError as exc:
            raise _failure(self._what, self._log_path, f"undecodable CRIU answer: {exc}") from exc
        return resp


async def _recv_packet(sock: socket.socket) -> bytes:
    """One SEQPACKET packet (b"" on hang-up); fds attached to it are closed: nothing
    here needs a pty master."""
    while True:
        data = _recv_packet_now(sock)
        if data is not None:
            return data
        await _readable(sock)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _recv_packet_now(sock: socket.socket) -> bytes | None:
    """A packet if one is queued, else None."""
    try:
        data, fds, flags, _ = socket.recv_fds(sock, _MAX_PACKET, _MAX_PACKET_FDS)
    except (BlockingIOError, InterruptedError):
        return None
    for fd in fds:
        os.close(fd)
    if flags & socket.MSG_TRUNC:
        raise CriuError(f"CRIU sent a packet larger than {_MAX_PACKET} bytes")
    return data


async def _reap(spawned: asyncio.Future[int], grace: float) -> int | None:
    """CRIU's exit status; kills it (by cancelling its spawn) if it outstays `grace`."""
    try:
        async with asyncio.timeout(grace):
            return await asyncio.shield(spawned)
    except TimeoutError:
        log.warning("criu did not exit within %.1fs; killing it", grace)
        spawned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await spawned
        return None
    except asyncio.CancelledError:
        # Our caller is cancelled: still make sure CRIU does not outlive the call.
        spawned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await spawned
        raise
    except OSError as exc:
        raise CriuError(f"cannot run criu: {exc}") from exc


def _describe_exit(spawned: asyncio.Future[int]) -> str:
    if not spawned.done():
        return "still running"
    if spawned.cancelled():
        return "killed after the grace period"
    if spawned.exception() is not None:
        return f"could not run: {spawned.exception()}"
    return f"status {spawned.result()}"


def _resp_reason(resp: rpc.criu_resp) -> str:
    if resp.HasField("cr_errmsg") and resp.cr_errmsg:
        return str(resp.cr_errmsg)
    if resp.HasField("cr_errno") and resp.cr_errno:
        return f"errno {resp.cr_errno} ({os.strerror(resp.cr_errno)})"
    return "criu reported failure"


def _failure(what: str, log_path: Path | None, reason: str, *,
             from_criu: bool = False) -> CriuError:
    """A CriuError whose message leads with CRIU's own error line when the log has one.

    `reason` is what this side saw; when CRIU itself said it (`from_criu`) the log line
    is the better account and `reason` is dropped (CRIU's errmsg is its first error,
    often a harmless one).
    """
    line = parse_criu_log(log_path) if log_path is not None else None
    if from_criu and line is None:
        line = first_error_line(reason)
    message = f"CRIU {what} failed: {line or reason.strip()}"
    if line and not from_criu:
        message += f" ({reason})"
    if log_path is not None:
        message += f"; log: {log_path}"
    return CriuError(message, log_path=log_path, log_line=line)


class _DirFds:
    """Creates (mode 0700, like runc) and opens the image and work directories for the
    duration of one request."""

    def __init__(self, images_dir: Path, work_dir: Path) -> None:
        self._dirs = (images_dir, work_dir)
        self._fds: list[int] = []

    def __enter__(self) -> tuple[int, int]:
        try:
            for path in self._dirs:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as exc:
            self.__exit__()
            raise CriuError(f"cannot prepare CRIU directory: {exc}") from exc
        return self._fds[0], self._fds[1]

    def __exit__(self, *_: object) -> None:
        while self._fds:
            os.close(self._fds.pop())
