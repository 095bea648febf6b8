"""The swrk conversation, against scripted peers for the cases real CRIU will not show
on demand (crashing mid-request, a refused notification) and against real CRIU."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from kybernate.criu import CriuClient, CriuError, DumpOptions, spawn_with_asyncio

PEER_PROLOGUE = f"""#!{sys.executable}
import os, socket, sys
from kybernate.protos import criu_rpc_pb2 as rpc
sk = socket.socket(fileno=int(sys.argv[2]))
assert sys.argv[1] == "swrk"
req = rpc.criu_req.FromString(sk.recv(1 << 16))

def send(**fields):
    sk.send(rpc.criu_resp(**fields).SerializeToString())

def notify(script):
    send(type=rpc.NOTIFY, success=True, notify=rpc.criu_notify(script=script))
    return rpc.criu_req.FromString(sk.recv(1 << 16))

def write_log(text):
    # Like CRIU: the work dir is the client's fd, reached through /proc.
    path = f"/proc/{{os.getppid()}}/fd/{{req.opts.work_dir_fd}}/{{req.opts.log_file}}"
    with open(path, "w") as log:
        log.write(text)
"""


def _peer(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-criu"
    script.write_text(PEER_PROLOGUE + body)
    script.chmod(0o755)
    return str(script)


def _opts(tmp_path: Path) -> DumpOptions:
    return DumpOptions(images_dir=tmp_path / "img", work_dir=tmp_path / "work", pid=1234,
                       root=Path("/"))


def test_notifications_are_handed_over_and_acknowledged(tmp_path: Path) -> None:
    criu = _peer(tmp_path, """
acks = [notify("pre-dump"), notify("network-lock"), notify("post-dump")]
ok = all(a.type == rpc.NOTIFY and a.notify_success for a in acks) and req.opts.pid == 1234
send(type=rpc.DUMP, success=ok)
""")
    seen: list[str] = []

    async def on_notify(script: str) -> None:
        seen.append(script)

    asyncio.run(CriuClient(criu).dump(_opts(tmp_path), notify=on_notify))
    assert seen == ["pre-dump", "network-lock", "post-dump"]


def test_failed_callback_is_reported_to_criu_and_raised(tmp_path: Path) -> None:
    criu = _peer(tmp_path, """
ack = notify("pre-dump")
if not ack.notify_success:
    write_log("(00.1) Error (criu/action-scripts.c:1): pre-dump script failed\\n")
    send(type=rpc.DUMP, success=False, cr_errno=1)
else:
    send(type=rpc.DUMP, success=True)
""")

    async def refuse(script: str) -> None:
        raise RuntimeError("GPU not locked")

    with pytest.raises(CriuError, match="GPU not locked") as caught:
        asyncio.run(CriuClient(criu).dump(_opts(tmp_path), notify=refuse))
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_criu_error_carries_its_log_line_and_path(tmp_path: Path) -> None:
    criu = _peer(tmp_path, """
write_log("(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\\n"
          "(00.2) Error (criu/mount.c:9): No mapping for 77:(null) mountpoint\\n")
send(type=rpc.DUMP, success=False, cr_errmsg="Error (criu/util.c:1534): rlimit")
""")
    with pytest.raises(CriuError) as caught:
        asyncio.run(CriuClient(criu).dump(_opts(tmp_path)))
    err = caught.value
    assert err.log_line == "Error (criu/mount.c:9): No mapping for 77:(null) mountpoint"
    assert err.log_path == tmp_path / "work" / "dump.log"
    assert str(err) == (f"CRIU dump of pid 1234 failed: {err.log_line}; log: {err.log_path}")


def test_criu_dying_mid_request_is_an_error_not_a_hang(tmp_path: Path) -> None:
    criu = _peer(tmp_path, "sys.exit(3)\n")
    with pytest.raises(CriuError, match=r"status 3\) without answering"):
        asyncio.run(asyncio.wait_for(CriuClient(criu).dump(_opts(tmp_path)), 20))


def test_custom_spawn_gets_argv_and_fds(tmp_path: Path) -> None:
    criu = _peer(tmp_path, "send(type=rpc.DUMP, success=True)\n")
    calls: list[tuple[list[str], list[int]]] = []

    async def spawn(argv: Sequence[str], pass_fds: Sequence[int]) -> int:
        calls.append((list(argv), list(pass_fds)))
        return await spawn_with_asyncio(argv, pass_fds)

    asyncio.run(CriuClient(criu, spawn=spawn).dump(_opts(tmp_path)))
    [(argv, fds)] = calls
    assert argv[:2] == [criu, "swrk"] and fds == [int(argv[2])]


def test_cancelled_call_kills_and_reaps_criu(tmp_path: Path) -> None:
    pid_file = tmp_path / "peer.pid"
    criu = _peer(tmp_path, f"""
open({str(pid_file)!r}, "w").write(str(os.getpid()))
import signal, time
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
time.sleep(600)
""")

    async def cancel_soon() -> None:
        task = asyncio.ensure_future(CriuClient(criu).dump(_opts(tmp_path)))
        while not pid_file.exists():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(cancel_soon(), 30))
    assert not Path(f"/proc/{pid_file.read_text()}").exists()


def test_real_criu_version_and_check() -> None:
    async def ask() -> str:
        client = CriuClient()
        await client.check()
        return await client.version()

    major, minor = (int(part) for part in asyncio.run(ask()).split(".")[:2])
    assert (major, minor) >= (4, 2)
