"""The forking template: its request format, and a real template process serving,
refusing and exiting (no containerd needed: a plain file stands in for its socket)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2
from kybernate.errors import InvalidArgument
from kybernate.protos import shim_pb2
from kybernate.shim import template as template_module
from kybernate.shim.flags import SHIM_NAME, ShimFlags
from kybernate.shim.start import listen_unix
from kybernate.shim.template import (
    ARGV_ROOM,
    ForkRequest,
    SourceStamps,
    TemplateRefused,
    fork_from_template,
    parse_reply,
    template_socket_path,
)
from kybernate.shim.ttrpc import TtrpcClient

from tests.support.containerd import command_line

NOBODY = 65534


def flags_for(address: str, bundle: str, container_id: str = "c1") -> ShimFlags:
    return ShimFlags(namespace="kyb-tpl", address=address, publish_binary="/usr/bin/containerd",
                     id=container_id, bundle=bundle, debug=True)


# ---- the request ------------------------------------------------------------------

def test_fork_request_round_trip() -> None:
    flags = flags_for("/run/c.sock", "/b/c1")
    request = ForkRequest(flags, {"TTRPC_ADDRESS": "/run/c.sock.ttrpc", "PATH": "/bin"})
    decoded = ForkRequest.decode(request.encode())
    assert decoded.flags == flags.replace(action="serve")
    assert decoded.env == {"TTRPC_ADDRESS": "/run/c.sock.ttrpc", "PATH": "/bin"}


def good_request() -> dict:
    return json.loads(ForkRequest(flags_for("/a", "/b"), {"A": "1"}).encode())


@pytest.mark.parametrize(("mutate", "error"), [
    (lambda m: m.update(version=99), "version 99"),
    (lambda m: m.pop("env"), "'flags' and 'env'"),
    (lambda m: m["flags"].update(id=""), "'id' must be a non-empty string"),
    (lambda m: m["flags"].update(address=5), "'address' must be a non-empty string"),
    (lambda m: m["flags"].update(bundle="relative/dir"), "is not absolute"),
    (lambda m: m["flags"].update(debug="yes"), "'debug' must be a boolean"),
    (lambda m: m["env"].update(B=1), "env must map"),
    (lambda m: m["env"].update({"A=B": "x"}), "env must map"),
])
def test_fork_request_rejects_bad_input(mutate, error: str) -> None:
    message = good_request()
    mutate(message)
    with pytest.raises(InvalidArgument, match=error):
        ForkRequest.decode(json.dumps(message).encode())
    with pytest.raises(InvalidArgument, match="not JSON"):
        ForkRequest.decode(b"\xff{")
    with pytest.raises(InvalidArgument, match="JSON object"):
        ForkRequest.decode(b"[1]")


def test_reply_parsing() -> None:
    assert parse_reply(b'{"pid": 42}') == 42
    with pytest.raises(TemplateRefused, match="stale"):
        parse_reply(b'{"error": "template code is stale: x.py"}')
    with pytest.raises(TemplateRefused, match="garbage"):
        parse_reply(b"")
    with pytest.raises(TemplateRefused):
        parse_reply(b'{"pid": 0}')


def test_socket_path_depends_on_address_and_interpreter() -> None:
    one = template_socket_path("/run/a.sock", "/usr/bin/python3")
    assert one.startswith("/run/containerd/s/kybernate-template-")
    assert len(os.path.basename(one)) == len("kybernate-template-") + 16
    assert one == template_socket_path("/run/a.sock", "/usr/bin/python3")
    assert one != template_socket_path("/run/b.sock", "/usr/bin/python3")
    assert one != template_socket_path("/run/a.sock", "/opt/venv/bin/python3")


def test_source_stamps_see_changed_and_removed_files(tmp_path: Path) -> None:
    package = f"kybtplfake{uuid.uuid4().hex[:8]}"
    modules = []
    for name in ("one", "two"):
        source = tmp_path / f"{name}.py"
        source.write_text("VALUE = 1\n")
        spec = importlib.util.spec_from_file_location(f"{package}.{name}", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    stamps = SourceStamps.capture(modules, package=package)
    assert {str(tmp_path / "one.py"), str(tmp_path / "two.py")} <= set(stamps.files)
    assert stamps.changed() == []
    stat = (tmp_path / "one.py").stat()
    os.utime(tmp_path / "one.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    (tmp_path / "two.py").unlink()
    assert sorted(stamps.changed()) == [str(tmp_path / "one.py"), str(tmp_path / "two.py")]


# ---- a real template process -------------------------------------------------------

class RunningTemplate:
    def __init__(self, process: subprocess.Popen[bytes], address: Path, path: str) -> None:
        self.process = process
        self.address = address
        self.path = path


def start_template(address: Path, idle_timeout: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-m", "kybernate.shim", "-namespace", "kyb-tpl", "-address",
         str(address), "-idle-timeout", str(idle_timeout), "template", ARGV_ROOM],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)


def wait_for_socket(path: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, f"template socket {path} never appeared"
        time.sleep(0.02)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if process.stderr:
        process.stderr.close()


@pytest.fixture
def running_template(tmp_path: Path) -> Iterator[RunningTemplate]:
    address = tmp_path / "containerd.sock"  # only its existence matters to the template
    address.touch()
    path = template_socket_path(str(address))
    process = start_template(address, idle_timeout=60)
    try:
        wait_for_socket(path, process)
        yield RunningTemplate(process, address, path)
    finally:
        stop_process(process)
        if os.path.exists(path):
            os.unlink(path)


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"template still running after {timeout}s")


def test_socket_is_root_only(running_template: RunningTemplate) -> None:
    assert os.stat(running_template.path).st_mode & 0o777 == 0o600


def test_sigterm_ends_the_template_and_removes_its_socket(
        running_template: RunningTemplate) -> None:
    running_template.process.send_signal(signal.SIGTERM)
    assert wait_exit(running_template.process, 10) == 0
    assert not os.path.exists(running_template.path)


def test_exits_after_the_idle_timeout(tmp_path: Path) -> None:
    address = tmp_path / "containerd.sock"
    address.touch()
    path = template_socket_path(str(address))
    process = start_template(address, idle_timeout=1)
    try:
        wait_for_socket(path, process)
        started = time.monotonic()
        assert wait_exit(process, 15) == 0
        assert time.monotonic() - started < 10
        assert not os.path.exists(path)
    finally:
        stop_process(process)


def test_exits_when_its_containerd_is_gone(running_template: RunningTemplate) -> None:
    running_template.address.unlink()
    assert wait_exit(running_template.process, 15) == 0
    assert not os.path.exists(running_template.path)


def test_only_one_template_per_address(running_template: RunningTemplate) -> None:
    second = start_template(running_template.address, idle_timeout=60)
    try:
        assert wait_exit(second, 20) == 0
    finally:
        stop_process(second)
    assert running_template.process.poll() is None
    assert os.path.exists(running_template.path)


def test_refuses_a_peer_of_another_uid(running_template: RunningTemplate) -> None:
    # The socket's mode already keeps other users out; open it up to prove the
    # SO_PEERCRED check holds on its own.
    os.chmod(running_template.path, 0o666)
    parent_dir_mode = os.stat(os.path.dirname(running_template.path)).st_mode & 0o777
    assert parent_dir_mode & 0o001, "others cannot reach the socket directory"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, ask for a fork, report the answer
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.settimeout(10)
                conn.connect(running_template.path)
                request = ForkRequest(flags_for("/a", "/tmp"), {})
                try:  # the template may have answered and hung up already
                    socket.send_fds(conn, [request.encode()], [conn.fileno()])
                except OSError:
                    pass
                os.write(write_end, conn.recv(4096))
            status = 0
        except BaseException as err:  # noqa: BLE001 - reported through the pipe
            os.write(write_end, repr(err).encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        reply = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, reply
    assert json.loads(reply) == {"error": f"permission denied: peer uid {NOBODY}"}
    assert running_template.process.poll() is None  # and it keeps serving


def process_state(pid: int) -> tuple[int, str]:
    """(parent pid, state letter) from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


async def task_call(path: str, method: str, request, response_type):
    client = await TtrpcClient.connect(path)
    try:
        return await client.call("containerd.task.v2.Task", method, request, response_type,
                                 timeout=10, metadata={"containerd-namespace-ttrpc": ["kyb-tpl"]})
    finally:
        await client.close()


def test_forks_a_serving_process_like_a_spawned_one(running_template: RunningTemplate,
                                                    tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2"}))
    shim_socket = f"/tmp/kyb-tpl-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    listener = listen_unix(shim_socket)
    marker = uuid.uuid4().hex
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KYB_TEMPLATE_TEST": marker,
           "TTRPC_ADDRESS": f"{running_template.address}.ttrpc"}
    flags = flags_for(str(running_template.address), str(bundle), f"c-{marker[:8]}")
    server = 0
    try:
        server = fork_from_template(flags, listener, env) or 0
        assert server > 0
        listener.close()
        # Orphaned at birth, like a spawned server once `start` exits: the template is
        # neither its parent nor anyone's.
        template_pid = running_template.process.pid
        assert process_state(server)[0] != template_pid
        assert Path(f"/proc/{template_pid}/task/{template_pid}/children").read_text() == ""
        # The child sets itself up concurrently; its title comes first in run_server.
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{server}/cmdline").read_bytes().startswith(SHIM_NAME.encode()):
            assert time.monotonic() < deadline, "the serving process never took its title"
            time.sleep(0.01)
        assert os.getsid(server) == server
        assert os.readlink(f"/proc/{server}/cwd") == str(bundle)
        # What containerd's Go shims show: `pgrep containerd-shim` finds it.
        assert command_line(server) == [SHIM_NAME, "-namespace", flags.namespace, "-id", flags.id,
                                        "-address", flags.address]
        assert Path(f"/proc/{server}/comm").read_text() == "containerd-shim\n"
        sigchld_ignored = int(next(line for line in Path(f"/proc/{server}/status").read_text()
                                   .splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        assert not sigchld_ignored & (1 << (signal.SIGCHLD - 1))
        response = asyncio.run(task_call(shim_socket, "Connect",
                                         shim_pb2.ConnectRequest(id=flags.id),
                                         shim_pb2.ConnectResponse))
        assert response.shim_pid == server
        asyncio.run(task_call(shim_socket, "Shutdown", shim_pb2.ShutdownRequest(id=flags.id),
                              empty_pb2.Empty))
        deadline = time.monotonic() + 10
        while Path(f"/proc/{server}").exists() and process_state(server)[1] != "Z":
            assert time.monotonic() < deadline, f"server {server}: {process_state(server)}"
            time.sleep(0.05)
        assert not os.path.exists(shim_socket)
        assert running_template.process.poll() is None
    finally:
        listener.close()
        if server and Path(f"/proc/{server}").exists():
            os.kill(server, signal.SIGKILL)
        if os.path.exists(shim_socket):
            os.unlink(shim_socket)


def test_stale_code_is_refused_and_the_template_exits(running_template: RunningTemplate,
                                                      tmp_path: Path) -> None:
    source = Path(template_module.__file__)
    before = source.stat()
    shim_socket = f"/tmp/kyb-tpl-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    listener = listen_unix(shim_socket)
    try:
        # Only the mtime moves (restored below): the loaded code now differs from disk.
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        with pytest.raises(TemplateRefused, match=f"stale: .*{source.name}"):
            fork_from_template(flags_for(str(running_template.address), str(tmp_path)),
                               listener, {})
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
        listener.close()
        os.unlink(shim_socket)
    assert wait_exit(running_template.process, 10) == 0
    assert not os.path.exists(running_template.path)
