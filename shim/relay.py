"""The `start` and `delete` commands, relayed to the forking template.

containerd runs `start` and `delete` once per container each and waits for both.
Run in the command's own interpreter they import the shim's code (~30-50 ms here);
relayed, the command process imports only this module and `_socket`, sends what
containerd gave it (arguments, environment, working directory, parent pid, stdin)
to the per-containerd template (`template.py`), which already has everything loaded,
forks a worker that runs the very same `start` or `delete`, and sends back the exit
status, stdout and stderr, which the command process writes out as its own.

When no template answers (none runs yet, its code is stale, it fails mid-way),
`relay` returns None and the command runs here as before: both commands are safe to
run again (`start` finds a server already listening on the group's socket, `delete`
finds nothing left to delete).

Wire format, one SOCK_SEQPACKET message each way (no json: importing it costs `start`
~10 ms):
    request: MAGIC, action, cwd, parent pid, argc, *argv, envc, *KEY=VALUE, then the
             stdin bytes, fields joined by NUL (stdin last, so it may hold NULs)
    reply:   b"STATUS STDOUT_LEN STDERR_LEN\\n" + stdout + stderr
"""

from __future__ import annotations

import _socket
import os

from kybernate import __version__

MAGIC = b"kybernate-relay-1"
TEMPLATE_SOCKET_DIR = "/run/containerd/s"
TEMPLATE_SOCKET_PREFIX = "kybernate-template-"
CONNECT_TIMEOUT_S = 0.05
# `delete` runs `runc delete --force`, which runc's own timeout bounds at 30 s.
REPLY_TIMEOUT_S = 60.0
MAX_MESSAGE_BYTES = 1 << 20
ACTIONS = ("start", "delete")


def template_socket_path(containerd_address: str, executable: str) -> str:
    """One template per containerd address, kybernate version and interpreter."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # 3.11: no OpenSSL to load
    except ImportError:  # pragma: no cover - 3.12 and newer
        from _sha2 import sha256  # type: ignore[import-not-found]
    key = f"{containerd_address}\0{__version__}\0{executable}"
    digest = sha256(key.encode()).hexdigest()[:16]
    return f"{TEMPLATE_SOCKET_DIR}/{TEMPLATE_SOCKET_PREFIX}{digest}"


def read_stdin() -> bytes:
    """Everything containerd wrote on stdin: the create options Any, or (2.3 and newer)
    the bootstrap parameters holding them (see start_params.py); b"" for a terminal or
    none."""
    try:
        if os.isatty(0):
            return b""
        chunks = []
        while chunk := os.read(0, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return b""


def encode_request(action: str, argv: list[str], env: dict[str, str], cwd: str, ppid: int,
                   stdin: bytes) -> bytes:
    fields = [MAGIC, action.encode(), os.fsencode(cwd), str(ppid).encode(), str(len(argv)).encode(),
              *(os.fsencode(a) for a in argv), str(len(env)).encode(),
              *(os.fsencode(f"{k}={v}") for k, v in env.items())]
    return b"\0".join(fields) + b"\0" + stdin


def decode_reply(reply: bytes) -> tuple[int, bytes, bytes] | None:
    header, newline, body = reply.partition(b"\n")
    parts = header.split()
    if not newline or len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    status, out_len, err_len = (int(p) for p in parts)
    if out_len + err_len != len(body):
        return None
    return status, body[:out_len], body[out_len:]


def encode_reply(status: int, stdout: bytes, stderr: bytes) -> bytes:
    return b"%d %d %d\n" % (status, len(stdout), len(stderr)) + stdout + stderr


def relay(action: str, argv: list[str], address: str, executable: str,
          stdin: bytes) -> tuple[int, bytes, bytes] | None:
    """Run `action` in the template; (status, stdout, stderr), or None to run it here."""
    if action not in ACTIONS or not address:
        return None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(CONNECT_TIMEOUT_S)
        try:
            conn.connect(template_socket_path(address, executable))
        except OSError:
            return None
        creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], "little") != os.geteuid():
            return None  # not ours: never hand it containerd's environment
        message = encode_request(action, argv, dict(os.environ), os.getcwd(), os.getppid(), stdin)
        if len(message) > MAX_MESSAGE_BYTES:
            return None
        conn.settimeout(REPLY_TIMEOUT_S)
        try:
            conn.send(message)
            reply = conn.recv(MAX_MESSAGE_BYTES)
        except OSError:
            return None
    finally:
        conn.close()
    return decode_reply(reply)
