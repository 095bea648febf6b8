"""ProcessIO with real FIFOs, files, logging binaries and a real runc terminal."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kybernate.errors import FailedPrecondition, InvalidArgument
from kybernate.runtime.console import ConsoleSocket, resize, window_size
from kybernate.runtime.reaper import Reaper, read_to_end, write_all
from kybernate.runtime.runc import Runc
from kybernate.runtime.stdio import ProcessIO, StdioKind, binary_logger_argv, stdio_kind

from tests.support import runc_sandbox
from tests.support.bundle import make_bundle
from tests.support.runc_sandbox import with_reaper

ID = f"kyb-stdio-{os.getpid()}"
NS = "kyb-test"


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"kyb-stdio-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fifos(tmp: Path) -> tuple[str, str, str]:
    paths = tuple(str(tmp / name) for name in ("stdin", "stdout", "stderr"))
    for path in paths:
        os.mkfifo(path)
    return paths  # type: ignore[return-value]


def client_reader(path: str) -> int:
    """What ctr does: open the FIFO's read end before the shim opens its write end."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def spawn_with(reaper: Reaper, io: ProcessIO, argv: list[str]) -> int:
    stdin, stdout, stderr = io.runc_fds()
    child = reaper.spawn(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                         stdout=stdout if stdout is not None else subprocess.DEVNULL,
                         stderr=stderr if stderr is not None else subprocess.DEVNULL)
    io.close_after_start()
    return child.pid


def test_stdio_kinds_and_logger_argv() -> None:
    assert stdio_kind("", "", "") is StdioKind.NULL
    assert stdio_kind("/a", "/b", "/c") is StdioKind.FIFO
    assert stdio_kind("", "file:///var/log/x", "") is StdioKind.FILE
    assert stdio_kind("", "binary:///bin/log?x=1", "") is StdioKind.BINARY
    with pytest.raises(InvalidArgument):
        stdio_kind("", "http://x/y", "")
    assert binary_logger_argv("binary:///usr/bin/logger?tag=web&level=") == [
        "/usr/bin/logger", "tag", "web", "level", ""]
    with pytest.raises(InvalidArgument):
        binary_logger_argv("binary://relative")


def test_null_io_gives_runc_dev_null() -> None:
    async def body(reaper: Reaper) -> None:
        io = ProcessIO.open("", "", "", terminal=False, container_id=ID, namespace=NS)
        assert io.runc_fds() == (None, None, None)
        await io.wait_copied(0.1)
        io.close()

    with_reaper(body)


def test_fifo_roundtrip_stdin_eof_closes_process_input(tmp: Path) -> None:
    stdin, stdout, stderr = fifos(tmp)

    async def body(reaper: Reaper) -> None:
        loop = asyncio.get_running_loop()
        out_r, err_r = client_reader(stdout), client_reader(stderr)
        io = ProcessIO.open(stdin, stdout, stderr, terminal=False, container_id=ID, namespace=NS)
        pid = spawn_with(reaper, io, ["sh", "-c", "cat; echo done-err >&2"])
        # No writer on the stdin FIFO yet: that must not read as EOF.
        await asyncio.sleep(0.3)
        assert reaper.exited(pid) is None
        # The client connects, writes, and closes its input.
        in_w = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
        await write_all(loop, in_w, b"hello through fifos\n")
        os.close(in_w)
        out, err = await asyncio.gather(read_to_end(loop, out_r), read_to_end(loop, err_r))
        assert out == b"hello through fifos\n"
        assert err == b"done-err\n"
        assert (await reaper.wait_for(pid, timeout=5)).status == 0
        await io.wait_copied(5)
        io.close()
        os.close(out_r)
        os.close(err_r)

    with_reaper(body)


def test_large_output_with_a_slow_client(tmp: Path) -> None:
    _, stdout, _ = fifos(tmp)
    payload_size = 4 << 20  # far more than the pipe and FIFO buffers together

    async def body(reaper: Reaper) -> None:
        loop = asyncio.get_running_loop()
        out_r = client_reader(stdout)
        io = ProcessIO.open("", stdout, "", terminal=False, container_id=ID, namespace=NS)
        pid = spawn_with(reaper, io, [
            sys.executable, "-c",
            f"import sys; sys.stdout.buffer.write(bytes(range(256)) * {payload_size // 256})"])
        await asyncio.sleep(0.5)  # the client is slow: the shim must wait, not drop
        data = await read_to_end(loop, out_r, limit=payload_size * 2)
        assert len(data) == payload_size
        assert hashlib.sha256(data).digest() == hashlib.sha256(bytes(range(256)) * (payload_size // 256)).digest()
        assert (await reaper.wait_for(pid, timeout=10)).status == 0
        io.close()
        os.close(out_r)

    with_reaper(body)


def test_close_stdin_ends_input_while_client_keeps_writing_end(tmp: Path) -> None:
    stdin, stdout, _ = fifos(tmp)

    async def body(reaper: Reaper) -> None:
        loop = asyncio.get_running_loop()
        out_r = client_reader(stdout)
        io = ProcessIO.open(stdin, stdout, "", terminal=False, container_id=ID, namespace=NS)
        in_w = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
        pid = spawn_with(reaper, io, ["wc", "-c"])
        await write_all(loop, in_w, b"12345")
        await asyncio.sleep(0.2)
        io.close_stdin()  # CloseIO: the client never closed its end
        assert (await reaper.wait_for(pid, timeout=5)).status == 0
        await io.wait_copied(5)
        assert (await read_to_end(loop, out_r)).strip() == b"5"
        io.close()
        os.close(in_w)
        os.close(out_r)

    with_reaper(body)


def test_wait_copied_gives_up_while_an_heir_holds_stdout(tmp: Path) -> None:
    _, stdout, _ = fifos(tmp)

    async def body(reaper: Reaper) -> None:
        out_r = client_reader(stdout)
        io = ProcessIO.open("", stdout, "", terminal=False, container_id=ID, namespace=NS)
        pid = spawn_with(reaper, io, ["sh", "-c", "sleep 30 & echo $!"])
        await reaper.wait_for(pid, timeout=5)
        try:
            assert await io.wait_copied(0.3) is False
        finally:
            await asyncio.sleep(0.1)
            heir = int(os.read(out_r, 100))
            os.kill(heir, signal.SIGKILL)
        # Once the heir is gone, the copy ends.
        assert await io.wait_copied(5) is True
        assert (await reaper.wait_for(heir, timeout=5)).status == 128 + signal.SIGKILL
        io.close()
        os.close(out_r)

    with_reaper(body)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_close_releases_every_fd_and_bad_paths_fail_cleanly(tmp: Path) -> None:
    stdin, stdout, stderr = fifos(tmp)

    async def body(reaper: Reaper) -> None:
        readers = [client_reader(stdout), client_reader(stderr)]
        before = open_fds()
        io = ProcessIO.open(stdin, stdout, stderr, terminal=False, container_id=ID, namespace=NS)
        pid = spawn_with(reaper, io, ["true"])
        await reaper.wait_for(pid, timeout=5)
        await io.wait_copied(5)
        io.close()
        assert open_fds() == before
        with pytest.raises(FailedPrecondition) as missing:
            ProcessIO.open("", str(tmp / "absent"), "", terminal=False, container_id=ID, namespace=NS)
        assert "absent" in str(missing.value)
        assert open_fds() == before
        for fd in readers:
            os.close(fd)

    with_reaper(body)


def test_file_logging_appends_both_streams(tmp: Path) -> None:
    log = tmp / "logs" / "ctr.log"
    log.parent.mkdir()
    log.write_bytes(b"earlier\n")

    async def body(reaper: Reaper) -> None:
        uri = f"file://{log}"
        io = ProcessIO.open("", uri, uri, terminal=False, container_id=ID, namespace=NS)
        pid = spawn_with(reaper, io, ["sh", "-c", "echo to-out; sleep 0.1; echo to-err >&2"])
        assert (await reaper.wait_for(pid, timeout=5)).status == 0
        await io.wait_copied(5)
        io.close()

    with_reaper(body)
    assert log.read_bytes() == b"earlier\nto-out\nto-err\n"


def test_binary_logger_gets_fds_env_args_and_is_waited_for(tmp: Path) -> None:
    logger = tmp / "logger.sh"
    logger.write_text(
        "#!/bin/sh\n"
        # $1/$2 = out PATH, $3/$4 = err PATH (query order)
        'echo "$CONTAINER_ID $CONTAINER_NAMESPACE" > "$2.env"\n'
        "sleep 0.3\n"
        'touch "$2.ready"\n'
        "exec 5>&-\n"
        'cat <&3 > "$2" &\n'
        'cat <&4 > "$4"\n'
        "wait\n"
    )
    logger.chmod(0o755)
    out_file, err_file = tmp / "out.txt", tmp / "err.txt"

    async def body(reaper: Reaper) -> None:
        uri = f"binary://{logger}?out={out_file}&err={err_file}"
        io = ProcessIO.open("", uri, uri, terminal=False, container_id=ID, namespace=NS)
        # open() returned only after the logger closed its ready fd.
        assert Path(f"{out_file}.ready").exists()
        assert io.logger_pid is not None
        pid = spawn_with(reaper, io, ["sh", "-c", "echo via-logger; echo err-via-logger >&2"])
        assert (await reaper.wait_for(pid, timeout=5)).status == 0
        # The logger exits by itself once both pipes reach EOF.
        assert (await reaper.wait_for(io.logger_pid, timeout=5)).status == 0
        io.close()

    with_reaper(body)
    assert out_file.read_bytes() == b"via-logger\n"
    assert err_file.read_bytes() == b"err-via-logger\n"
    assert Path(f"{out_file}.env").read_text() == f"{ID} {NS}\n"


def test_pipes_are_owned_by_io_uid_gid(tmp: Path) -> None:
    stdin, stdout, stderr = fifos(tmp)

    async def body(reaper: Reaper) -> None:
        readers = [client_reader(stdout), client_reader(stderr)]
        io = ProcessIO.open(stdin, stdout, stderr, terminal=False, uid=4321, gid=8765,
                            container_id=ID, namespace=NS)
        try:
            for fd in io.runc_fds():
                assert fd is not None
                st = os.fstat(fd)
                assert (st.st_uid, st.st_gid) == (4321, 8765)
        finally:
            io.close_after_start()
            io.close()
            for fd in readers:
                os.close(fd)

    with_reaper(body)


@pytest.mark.parametrize("output", ["fifo", "file", "binary"])
def test_terminal_through_runc_console_socket(tmp: Path, output: str) -> None:
    stdin, stdout_fifo, _ = fifos(tmp)
    cid = f"kyb-tty-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cgroup = f"/kyb-tty-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bundle = make_bundle(tmp / "bundle", ["sh", "-c", "stty size; read line; echo got:$line"],
                         terminal=True, cgroups_path=cgroup)
    root = tmp / "runc"
    logged = tmp / "tty.log"
    logger = tmp / "logger.sh"
    logger.write_text('#!/bin/sh\nexec 5>&-\ncat <&3 > "$2"\n')
    logger.chmod(0o755)
    stdout = {"fifo": stdout_fifo, "file": f"file://{logged}",
              "binary": f"binary://{logger}?out={logged}"}[output]

    async def body(reaper: Reaper) -> None:
        loop = asyncio.get_running_loop()
        runc = Runc(reaper, root=str(root), log_dir=str(tmp))
        out_r = client_reader(stdout_fifo)
        io = ProcessIO.open(stdin, stdout, "", terminal=True, container_id=cid, namespace=NS)
        assert io.runc_fds() == (None, None, None)
        with ConsoleSocket.create(str(tmp)) as console:
            receiving = asyncio.ensure_future(console.receive_master(timeout=10))
            await runc.create(cid, str(bundle), pid_file=str(tmp / "pid"),
                              console_socket=console.path, io=io)
            master = await receiving
        io.attach_console(master)
        resize(master, 123, 45)
        assert window_size(master) == (123, 45)
        await runc.start(cid)
        pid = int((tmp / "pid").read_text())
        in_w = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
        await write_all(loop, in_w, b"typed\n")
        assert (await reaper.wait_for(pid, timeout=10)).status == 0
        await io.wait_copied(5)
        if io.logger_pid is not None:
            await reaper.wait_for(io.logger_pid, timeout=5)
        io.close()
        if output == "fifo":
            text = (await read_to_end(loop, out_r)).decode()
        else:
            text = logged.read_text()
        assert "45 123" in text
        assert "got:typed" in text
        os.close(in_w)
        os.close(out_r)
        await runc.delete(cid)

    try:
        with_reaper(body)
    finally:
        runc_sandbox.delete_runc_container(root, cid)
        runc_sandbox.remove_cgroup(cgroup)
