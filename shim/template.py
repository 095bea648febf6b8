"""A forking template ("zygote") for the serving process.

Every container gets its own serving process, as with runc's shim. Started fresh, that
process pays an interpreter and ~110 ms of imports (asyncio, protobuf, the task
service) before it can answer containerd. The template pays that once per containerd
address: it imports everything `serve` needs, freezes the garbage collector (so the
forked children keep sharing those pages copy-on-write), and then forks one serving
process per request from `start`. A forked child resets what the template changed
(signals, session, working directory, environment) and runs the very same
`run_server` that a spawned `serve` process runs, which gives it its title.

Wire protocol, on a SOCK_SEQPACKET unix socket (one message each way, so no framing):
`start` sends a JSON `ForkRequest` with the shim's listening socket attached
(SCM_RIGHTS); the template answers `{"pid": N}` or `{"error": "..."}`. Both ends check
that the peer runs as their own uid (SO_PEERCRED).

The template never serves stale code: it records the mtimes of every module file it
loaded (kybernate's and its dependencies'), and when one changed it refuses the request (`start` falls back to a
fresh process and starts a new template) and exits. It also exits after an idle
period, when its containerd's socket is gone, and on SIGTERM; it removes its socket
whichever way it ends (SIGKILL aside, which the next template recovers from).

This module is imported by `start` for the client half, so its top level stays light:
the server half imports what it needs when it runs.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Mapping

from kybernate.errors import InvalidArgument, Unavailable
from kybernate.shim import relay
from kybernate.shim.flags import ShimFlags

# `typing` costs `start` ~5 ms of imports; type checkers treat this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import NoReturn

# Beside the shim sockets, so that containerd's state dir holds everything of ours.
TEMPLATE_SOCKET_DIR = relay.TEMPLATE_SOCKET_DIR
TEMPLATE_SOCKET_PREFIX = relay.TEMPLATE_SOCKET_PREFIX
DEFAULT_IDLE_TIMEOUT_S = 600
# How often an idle template checks that its containerd is still there.
LIVENESS_CHECK_S = 5.0
# The template is local and its answer is a fork away: anything slower means it is
# wedged, and `start` should not make containerd wait on it.
CONNECT_TIMEOUT_S = 0.05
REPLY_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 1 << 20
# A blank last argument of the template (ignored: it follows the action) that makes
# its argument area large enough for the title each forked serving process gives
# itself there (setproctitle writes it in place; see ShimFlags.process_title).
ARGV_ROOM = " " * 4096
MAX_REPLY_BYTES = 4096
PROTOCOL_VERSION = 1
# The modules a serving process imports, loaded ahead of the first fork. grpc is not
# among them: the serving process never loads it.
SERVER_MODULES = (
    "asyncio",
    "asyncio.unix_events",
    "kybernate.shim.server",
    "kybernate.shim.service",
    "kybernate.shim.events",
    "kybernate.shim.ttrpc",
    "kybernate.shim.checkpoint",
    "kybernate.shim.restore",
    "kybernate.runtime.reaper",
    # What a relayed `start` or `delete` runs in its worker.
    "kybernate.shim.relay_worker",
    "kybernate.shim.start",
    "kybernate.shim.delete",
    "kybernate.shim.bootstrap",
    "kybernate.shim.options",
    "kybernate.runtime.mount",
)
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class TemplateRefused(Unavailable):
    """The template cannot fork this request (stale code, bad request, gone mid-way);
    `start` then spawns the serving process itself."""


def template_socket_path(containerd_address: str, executable: str | None = None) -> str:
    """One template per containerd address, per kybernate version and interpreter
    (`executable`, by default this one)."""
    return relay.template_socket_path(containerd_address, executable or sys.executable)


def lock_name(socket_path: str) -> bytes:
    """An abstract unix socket name: bound by the one live template, released by the
    kernel when it dies, and never a file to clean up."""
    return b"\0" + socket_path.encode() + b".lock"


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(creds)[1])


# ---- the request ------------------------------------------------------------------

class ForkRequest:
    """What a serving process needs from `start`: its flags and containerd's environment.

    A plain class, not a dataclass: `start` imports this module and must stay light.
    """

    __slots__ = ("env", "flags")

    def __init__(self, flags: ShimFlags, env: Mapping[str, str]) -> None:
        self.flags = flags
        self.env = dict(env)

    def encode(self) -> bytes:
        f = self.flags
        return json.dumps({
            "version": PROTOCOL_VERSION,
            "flags": {"namespace": f.namespace, "address": f.address,
                      "publish_binary": f.publish_binary, "id": f.id, "bundle": f.bundle,
                      "debug": f.debug},
            "env": self.env,
        }).encode()

    @classmethod
    def decode(cls, data: bytes) -> ForkRequest:
        """Parse and validate; InvalidArgument names what is wrong."""
        try:
            message = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidArgument(f"fork request is not JSON: {err}") from None
        if not isinstance(message, dict):
            raise InvalidArgument("fork request must be a JSON object")
        if message.get("version") != PROTOCOL_VERSION:
            raise InvalidArgument(f"fork request version {message.get('version')!r} is not "
                                  f"{PROTOCOL_VERSION}")
        flags, env = message.get("flags"), message.get("env")
        if not isinstance(flags, dict) or not isinstance(env, dict):
            raise InvalidArgument("fork request needs the objects 'flags' and 'env'")
        strings = {}
        for name in ("namespace", "address", "publish_binary", "id", "bundle"):
            value = flags.get(name)
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"fork request flag {name!r} must be a non-empty string")
            strings[name] = value
        if not os.path.isabs(strings["bundle"]):
            raise InvalidArgument(f"fork request bundle {strings['bundle']!r} is not absolute")
        debug = flags.get("debug", False)
        if not isinstance(debug, bool):
            raise InvalidArgument("fork request flag 'debug' must be a boolean")
        if not all(isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                   and "\0" not in k + v for k, v in env.items()):
            raise InvalidArgument("fork request env must map variable names to strings")
        return cls(ShimFlags(namespace=strings["namespace"], address=strings["address"],
                             publish_binary=strings["publish_binary"], id=strings["id"],
                             bundle=strings["bundle"], debug=debug, action="serve"), env)


# ---- the client half, used by `start` ------------------------------------------------

def fork_from_template(flags: ShimFlags, listener: socket.socket,
                       env: Mapping[str, str]) -> int | None:
    """Have the template fork a serving process holding `listener`; its pid, or None
    when no template is listening (the caller then starts the server itself).

    Raises TemplateRefused when a template answered no (the caller falls back too)."""
    path = template_socket_path(flags.address)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with conn:
        conn.settimeout(CONNECT_TIMEOUT_S)
        try:
            conn.connect(path)
        except OSError:
            return None
        if peer_uid(conn) != os.geteuid():
            raise TemplateRefused(f"template socket {path} is served by another user")
        conn.settimeout(REPLY_TIMEOUT_S)
        request = ForkRequest(flags.replace(bundle=os.path.abspath(flags.bundle_path)), env)
        try:
            socket.send_fds(conn, [request.encode()], [listener.fileno()])
            reply = conn.recv(MAX_REPLY_BYTES)
        except OSError as err:  # it died or hung: treat it as absent
            raise TemplateRefused(f"template {path}: {err}") from None
    return parse_reply(reply)


def parse_reply(reply: bytes) -> int:
    try:
        message = json.loads(reply)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TemplateRefused(f"template answered garbage: {reply[:80]!r}") from None
    if not isinstance(message, dict):
        raise TemplateRefused(f"template answered {message!r}")
    pid = message.get("pid")
    if isinstance(pid, int) and pid > 0:
        return pid
    raise TemplateRefused(str(message.get("error") or f"template answered {message!r}"))


def template_is_running(path: str) -> bool:
    """Whether a template holds the lock for `path` (running, or starting up)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with probe:
        try:
            probe.bind(lock_name(path))
        except OSError:
            return True
    return False


def launch_template(flags: ShimFlags) -> None:
    """Start a template for `flags.address` in the background unless one is running.

    Detached like the serving process: its own session, stdio on /dev/null (containerd
    waits for end of file on `start`'s stdout and stderr)."""
    if not os.path.exists(flags.address):
        return  # no containerd there (a hand-run shim): a template would exit at once
    if template_is_running(template_socket_path(flags.address)):
        return
    argv = [sys.executable, "-I", "-m", "kybernate.shim", "-namespace", flags.namespace,
            "-address", flags.address, "template", ARGV_ROOM]
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
        os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=actions,
                       setsid=True)
    finally:
        os.close(devnull)


# ---- the server half -----------------------------------------------------------------

class SourceStamps:
    """The mtime of each loaded module's file (and the interpreter's), at load: a
    developer's edit and an upgrade of kybernate or of a dependency (protobuf) both
    change one. A few hundred stat calls per fork request: well under a millisecond."""

    def __init__(self, stamps: Mapping[str, int]) -> None:
        self._stamps = dict(stamps)

    @classmethod
    def capture(cls, modules: Iterable[ModuleType], package: str | None = None) -> SourceStamps:
        """Stamp the modules' files; only those of `package` when one is named."""
        stamps: dict[str, int] = {sys.executable: os.stat(sys.executable).st_mtime_ns}
        for module in modules:
            name = getattr(module, "__name__", "")
            source = getattr(module, "__file__", None)
            if not isinstance(source, str) or not source:
                continue
            if package is None or name == package or name.startswith(package + "."):
                stamps[source] = _mtime_ns(source)
        return cls(stamps)

    @property
    def files(self) -> list[str]:
        return sorted(self._stamps)

    def changed(self) -> list[str]:
        """Files whose mtime differs from the one recorded (a removed file counts)."""
        return [path for path, mtime in self._stamps.items() if _mtime_ns(path) != mtime]


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def preload_server_modules() -> None:
    import importlib

    for name in SERVER_MODULES:
        importlib.import_module(name)


class Template:
    """The template's accept loop: blocking, single-threaded, no event loop (so fork is
    safe), one request at a time."""

    def __init__(self, *, containerd_address: str, socket_path: str, listener: socket.socket,
                 lock: socket.socket, stamps: SourceStamps, idle_timeout: float) -> None:
        self._containerd_address = containerd_address
        self._socket_path = socket_path
        self._listener = listener
        self._lock = lock
        self._stamps = stamps
        self._idle_timeout = idle_timeout
        self._retired = False
        # Identifies our socket file: a successor may have replaced it by now.
        self._socket_inode = os.stat(socket_path).st_ino

    def serve(self) -> str:
        """Serve until a reason to stop; returns the reason."""
        import time

        idle_since = time.monotonic()
        while True:
            left = self._idle_timeout - (time.monotonic() - idle_since)
            if left <= 0:
                return "idle"
            if not os.path.exists(self._containerd_address):
                return f"containerd socket {self._containerd_address} is gone"
            self._listener.settimeout(min(left, LIVENESS_CHECK_S))
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                reap_workers()
                continue
            with conn:
                stale = self._handle(conn)
            reap_workers()
            if stale:
                return "source changed: " + ", ".join(stale)
            idle_since = time.monotonic()

    def retire(self) -> None:
        """Stop being the template: remove the socket (if still ours), release the lock.
        Done before answering a stale request, so the successor `start` launches can
        take over at once."""
        if self._retired:
            return
        self._retired = True
        try:
            if os.stat(self._socket_path).st_ino == self._socket_inode:
                os.unlink(self._socket_path)
        except OSError:
            pass
        self._listener.close()
        self._lock.close()

    def _handle(self, conn: socket.socket) -> list[str]:
        """Answer one request; returns the changed files when the code went stale."""
        conn.settimeout(REPLY_TIMEOUT_S)
        # Read before answering even a refusal: closing a unix socket with unread data
        # resets the connection, and the peer would lose the answer.
        try:
            data, fds, msg_flags, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 1)
        except OSError:
            return []
        uid = peer_uid(conn)
        if uid != os.geteuid():
            for fd in fds:
                os.close(fd)
            _answer(conn, {"error": f"permission denied: peer uid {uid}"})
            return []
        if data.startswith(relay.MAGIC + b"\0"):
            return self._relay(conn, data, fds, msg_flags)
        stale = self._stamps.changed()
        try:
            if stale:
                raise InvalidArgument("template code is stale: " + ", ".join(stale))
            if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise InvalidArgument("fork request truncated")
            if len(fds) != 1:
                raise InvalidArgument("fork request must carry exactly one socket")
            request = ForkRequest.decode(data)
        except InvalidArgument as err:
            for fd in fds:
                os.close(fd)
            if stale:
                self.retire()
            _answer(conn, {"error": str(err)})
            return stale
        try:
            pid = fork_detached(lambda: become_server(request, fds[0], close=(
                conn, self._listener, self._lock)))
        except OSError as err:
            _answer(conn, {"error": f"fork failed: {err}"})
            return []
        finally:
            os.close(fds[0])
        _answer(conn, {"pid": pid})
        return []


    def _relay(self, conn: socket.socket, data: bytes, fds: list[int], msg_flags: int) -> list[str]:
        """A relayed `start` or `delete`: run it in a forked worker, which answers."""
        from kybernate.shim.relay_worker import FALLBACK, RelayedCommand, run_relayed

        for fd in fds:
            os.close(fd)
        stale = self._stamps.changed()
        if stale:
            self.retire()
        try:
            if stale or msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("stale template or truncated request")
            command = RelayedCommand.decode(data)
            peer_pid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        _PEERCRED.size))[0]
            # One fork (each costs milliseconds here): the worker is our child, reaped
            # after the next request or liveness check; its server is its own child.
            if os.fork() == 0:
                run_relayed(command, conn, peer_pid, close=(self._listener, self._lock))
        except (ValueError, OSError):
            try:
                conn.send(FALLBACK)  # the command runs in its own process instead
            except OSError:
                pass
        return stale


def reap_workers() -> None:
    """Collect the relay workers that have exited (never blocks)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def fork_detached(child: Callable[[], NoReturn]) -> int:
    """Run `child` in a grandchild and return its pid. The intermediate child exits at
    once, so the grandchild is orphaned and reparented (to init or the nearest child
    subreaper) exactly like a serving process spawned by `start`, which exits too: the
    template is never the serving process's parent, and never reaps it."""
    read_end, write_end = os.pipe()
    try:
        intermediate = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if intermediate == 0:
        status = 1
        try:
            os.close(read_end)
            grandchild = os.fork()
            if grandchild == 0:
                os.close(write_end)
                child()
            os.write(write_end, str(grandchild).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:
            answer = reader.read()
    finally:
        os.waitpid(intermediate, 0)
    if not answer.isdigit():
        raise OSError("the intermediate child could not fork")
    return int(answer)


def _answer(conn: socket.socket, message: Mapping[str, object]) -> None:
    try:
        conn.send(json.dumps(message).encode())
    except OSError:
        pass  # the caller gave up; a forked child it never heard of serves nobody's socket


def become_server(request: ForkRequest, listen_fd: int,
                  close: Iterable[socket.socket]) -> NoReturn:
    """In the forked child: undo what is the template's, then serve like `serve` does."""
    import signal

    from kybernate.shim.server import run_server
    from setproctitle import setproctitle

    status = 1
    try:
        # Back to the defaults a freshly spawned process has (the Reaper installs its
        # own SIGCHLD handling).
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sock in close:
            sock.close()
        os.setsid()
        os.chdir(request.flags.bundle)
        # setproctitle finds the argument area it writes through the environment, so
        # the title comes before the environment is replaced (run_server sets it again).
        setproctitle(request.flags.process_title())
        os.environ.clear()
        os.environ.update(request.env)
        status = run_server(request.flags.replace(socket_fd=listen_fd))
    except BaseException:  # noqa: BLE001 - nothing may unwind into the template's loop
        status = 1
    finally:
        os._exit(status)


def claim_lock(path: str) -> socket.socket | None:
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        lock.bind(lock_name(path))
    except OSError:
        lock.close()
        return None
    return lock


def bind_template_socket(path: str) -> socket.socket:
    """Bind (mode 0600) and listen; the caller holds the lock, so a file there is a
    dead template's leftover."""
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def run_template(flags: ShimFlags) -> int:
    """Process entry of the `template` action; returns the exit status."""
    import gc
    import signal

    if not flags.address:
        raise ValueError("-address is required for template")
    idle_timeout = flags.idle_timeout if flags.idle_timeout >= 0 else DEFAULT_IDLE_TIMEOUT_S
    os.chdir("/")  # never pin the bundle of the container whose `start` launched us
    path = template_socket_path(flags.address)
    lock = claim_lock(path)
    if lock is None:
        return 0  # another template serves this address
    preload_server_modules()
    # setproctitle finds the argument area through the environment the first time it
    # is used: now, while the environment is still the template's own (a relay worker
    # takes on containerd's before it forks a server, which then sets its title).
    from setproctitle import getproctitle

    getproctitle()
    stamps = SourceStamps.capture(list(sys.modules.values()))
    listener = bind_template_socket(path)
    template = Template(containerd_address=flags.address, socket_path=path, listener=listener,
                        lock=lock, stamps=stamps, idle_timeout=idle_timeout)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    # Everything allocated so far stays put: the collector never touches (and so never
    # un-shares) these pages in the children.
    gc.freeze()
    try:
        template.serve()
    finally:
        template.retire()
    return 0
